#include "model/model.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "core/kquants.h"
#include "core/quants.h"
#include "core/threadpool.h"

namespace tmill {

std::shared_ptr<Model> Model::from_gguf(const std::string& path, const LoadOptions& options) {
    return from_gguf(GGUFFile(path), options);
}

std::shared_ptr<Model> Model::from_gguf(const GGUFFile& file, const LoadOptions& options) {
    HParams hp = hparams_from_gguf(file);
    std::shared_ptr<Model> m(new Model(std::move(hp), weights_from_gguf(file, file.file()->path()), options));
    m->build();
    return m;
}

std::shared_ptr<Model> Model::from_safetensors(const std::vector<std::string>& files, const HParams& hp,
                                               const LoadOptions& options) {
    arch_spec(hp.arch);   // an unsupported architecture fails before any file is opened
    std::vector<std::shared_ptr<MappedFile>> maps;
    for (const std::string& path : files) maps.push_back(std::make_shared<MappedFile>(path));
    return from_safetensors(maps, hp, options);
}

std::shared_ptr<Model> Model::from_safetensors(const std::vector<std::shared_ptr<MappedFile>>& files, const HParams& hp,
                                               const LoadOptions& options) {
    arch_spec(hp.arch);
    std::shared_ptr<Model> m(new Model(hp, weights_from_safetensors(files, hp.arch), options));
    m->build();
    return m;
}

Model::Model(HParams hp, WeightStore weights, const LoadOptions& options)
    : hp_(std::move(hp)), spec_(&arch_spec(hp_.arch)), weights_(std::move(weights)), options_(options) {
    if (options_.convert) {
        const DType t = options_.weight_type;
        if (!(t == DType::f32 || t == DType::f16 || t == DType::bf16 || t == DType::q8_0 || t == DType::q4_0 ||
              t == DType::q4_1 || quantizes_extra(t)))
            fail(ErrorKind::invalid_arg, "weights cannot be converted to " + dtype_name(t) +
                                             " (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)");
    }
    validate_hparams(hp_, source());
    backend_ = make_backend(options_.backend);
}

Model::~Model() = default;   // the workspace goes back to the backend before the backend goes

// What a K-quant target falls back to for matrices whose rows are not whole super-blocks of 256
// (llama-quantize's choice: the legacy type of about the same size).
static DType fallback_type(DType to) {
    switch (to) {
        case DType::q4_k: return DType::q5_0;
        case DType::q5_k: return DType::q5_1;
        case DType::q6_k: return DType::q8_0;
        default: return to;
    }
}

const TensorRef* Model::converted(const std::string& name, const TensorRef& t, int64_t rows, int64_t cols) {
    // types the backend does not compute with become f16 unless a weight type was asked for
    const bool must = !backend_->computes(t.type);
    DType to = options_.convert ? options_.weight_type : DType::f16;
    if (cols % dtype_info(to).block_size != 0) to = fallback_type(to);
    if ((!options_.convert && !must) || t.type == to) return &t;
    if (cols % dtype_info(to).block_size != 0 || !backend_->computes(to)) {
        if (!must) return &t;
        return converted_to(name, t, rows, cols, DType::f16);
    }
    return converted_to(name, t, rows, cols, to);
}

const TensorRef* Model::converted_to(const std::string& name, const TensorRef& t, int64_t rows, int64_t cols, DType to) {
    // row by row through float: the same numbers `tokenmill convert` writes (rows split over threads:
    // the K-quant quantizers' searches cost ~0.1 us per value)
    std::vector<uint8_t> bytes(row_bytes(to, cols) * static_cast<size_t>(rows));
    const size_t src_stride = row_bytes(t.type, cols), dst_stride = row_bytes(to, cols);
    ThreadPool pool(options_.backend.n_threads > 0 ? options_.backend.n_threads : default_thread_count());
    std::vector<std::vector<float>> row(static_cast<size_t>(pool.size()), std::vector<float>(static_cast<size_t>(cols)));
    pool.parallel_for(rows, [&](int64_t r0, int64_t r1, int thread) {
        float* buf = row[static_cast<size_t>(thread)].data();
        for (int64_t r = r0; r < r1; ++r) {
            dequantize_row(t.type, t.data + r * src_stride, buf, cols);
            quantize_row(to, buf, bytes.data() + r * dst_stride, cols);
        }
    });
    return &weights_.add_owned(name, to, t.shape, std::move(bytes));   // replaces the mapped tensor
}

// The tensor `name` checked to be a matrix [rows, cols] of a type we compute with.
static const TensorRef& matrix_ref(const WeightStore& ws, const std::string& name, const TensorRef* t, int64_t rows,
                                   int64_t cols) {
    if (t->shape.size() != 2 || t->shape[0] != cols || t->shape[1] != rows)
        fail(ErrorKind::format, "tensor '" + name + "' has shape [" +
                                    (t->shape.size() == 2 ? std::to_string(t->shape[1]) + ", " + std::to_string(t->shape[0])
                                                          : std::to_string(t->shape.size()) + " dims") +
                                    "], expected [" + std::to_string(rows) + ", " + std::to_string(cols) + "] in '" +
                                    ws.source + "'");
    if (!dtype_info(t->type).runnable)
        fail(ErrorKind::unsupported, "tensor '" + name + "' has type " + dtype_name(t->type) +
                                         ", which the engine cannot compute with yet");
    return *t;
}

Weight Model::weight(const std::string& name, int64_t rows, int64_t cols, bool required, WeightUse use) {
    const TensorRef* t = weights_.find(name);
    if (!t) {
        if (required) fail(ErrorKind::format, "model '" + source() + "' lacks tensor '" + name + "'");
        return Weight{};
    }
    return weight_rows(name, matrix_ref(weights_, name, t, rows, cols), 0, rows, cols, use);
}

// Rows [row0, row0 + rows) of a checked matrix tensor (and of its bias), handed to the backend.
Weight Model::weight_rows(const std::string& name, const TensorRef& t, int64_t row0, int64_t rows, int64_t cols,
                          WeightUse use) {
    const TensorRef* src = converted(name, t, t.shape[1], cols);
    const std::string bias_name = name.substr(0, name.size() - 6) + "bias";   // "...weight" -> "...bias"
    std::vector<float> bias = host_vector(bias_name, t.shape[1], false);
    const uint8_t* data = src->data + static_cast<size_t>(row0) * row_bytes(src->type, cols);
    Weight w = backend_->upload_weight(src->type, rows, cols, data, bias.empty() ? nullptr : bias.data() + row0, use);
    if (w.data != data || w.packed) {   // the backend reads a copy of its own: the mapped original goes cold
        const size_t bytes = static_cast<size_t>(rows) * row_bytes(src->type, cols);
        for (const auto& file : weights_.files)
            if (file->release(data, bytes)) break;
    }
    return w;
}

std::vector<float> Model::host_vector(const std::string& name, int64_t n, bool required) {
    const TensorRef* t = weights_.find(name);
    if (!t) {
        if (required) fail(ErrorKind::format, "model '" + source() + "' lacks tensor '" + name + "'");
        return {};
    }
    int64_t count = 1;
    for (int64_t d : t->shape) count *= d;
    if (count != n) fail(ErrorKind::format, "tensor '" + name + "' has " + std::to_string(count) +
                                                " elements, expected " + std::to_string(n));
    if (!dtype_info(t->type).runnable)
        fail(ErrorKind::unsupported, "tensor '" + name + "' has type " + dtype_name(t->type));
    std::vector<float> out(static_cast<size_t>(n));
    dequantize_row(t->type, t->data, out.data(), n);
    return out;
}

const float* Model::vector(const std::string& name, int64_t n, bool required) {
    std::vector<float> host = host_vector(name, n, required);
    const std::string suffix = "norm.weight";
    if (hp_.norm_offset != 0.0f && name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
        for (float& v : host) v += hp_.norm_offset;
    return host.empty() ? nullptr : backend_->upload_vector(host.data(), host.size());
}

// Every "blk.N." tensor must belong to a layer the hyper-parameters declare: a block_count smaller
// than the file's layers would otherwise run a shorter model without a word.
void Model::check_layer_tensors() const {
    for (const auto& [name, t] : weights_.tensors) {
        if (name.rfind("blk.", 0) != 0) continue;
        size_t dot = name.find('.', 4);
        const std::string index = name.substr(4, dot == std::string::npos ? std::string::npos : dot - 4);
        bool digits = !index.empty() && index.size() < 10 &&
                      std::all_of(index.begin(), index.end(), [](char c) { return c >= '0' && c <= '9'; });
        if (!digits) fail(ErrorKind::format, "tensor '" + name + "' in '" + source() + "' has no layer number");
        if (std::stoll(index) >= hp_.n_layer)
            fail(ErrorKind::format, "tensor '" + name + "' belongs to layer " + index + " but the model declares " +
                                        std::to_string(hp_.n_layer) + " layers (block_count) in '" + source() + "'");
    }
}

void Model::build() {
    check_layer_tensors();
    const int64_t E = hp_.n_embd, F = hp_.n_ff, V = hp_.n_vocab;
    const int64_t QD = hp_.n_head * hp_.head_dim, KD = hp_.n_head_kv * hp_.head_dim;
    const ArchSpec& spec = *spec_;
    const bool layer_norm = spec.norm == NormKind::layer;

    tok_embd_ = weight("token_embd.weight", V, E, true, WeightUse::rows);
    if (spec.positions == PositionKind::learned)
        pos_embd_ = weight("position_embd.weight", hp_.n_ctx_train, E, true, WeightUse::rows);
    if (spec.encoder) {   // hidden states only: embeddings normed, no final norm, no LM head
        const TensorRef* types = weights_.find("token_types.weight");
        if (types) type_embd_ = weight("token_types.weight", types->shape.size() == 2 ? types->shape[1] : 0, E, true,
                                       WeightUse::rows);
        embd_norm_.weight = vector("token_embd_norm.weight", E);
        embd_norm_.bias = vector("token_embd_norm.bias", E);
    } else {
        output_norm_.weight = vector("output_norm.weight", E);
        output_norm_.bias = layer_norm ? vector("output_norm.bias", E) : nullptr;
        output_ = hp_.tied_embeddings ? Weight{} : weight("output.weight", V, E, false);
        if (!output_) output_ = weight("token_embd.weight", V, E);   // tied: the table again, as a matrix
    }

    layers_.resize(static_cast<size_t>(hp_.n_layer));
    for (int64_t l = 0; l < hp_.n_layer; ++l) {
        Layer& L = layers_[static_cast<size_t>(l)];
        const std::string p = "blk." + std::to_string(l) + ".";
        const std::string attn_norm = spec.encoder ? "attn_output_norm" : "attn_norm";
        const std::string ffn_norm = spec.encoder ? "layer_output_norm" : "ffn_norm";
        L.attn_norm.weight = vector(p + attn_norm + ".weight", E);
        L.ffn_norm.weight = vector(p + ffn_norm + ".weight", E);
        if (layer_norm) {
            L.attn_norm.bias = vector(p + attn_norm + ".bias", E);
            L.ffn_norm.bias = vector(p + ffn_norm + ".bias", E);
        }
        if (spec.fused_qkv) {
            // the fused projection's row blocks are Q, K and V: three matrices for the backend
            const std::string name = p + "attn_qkv.weight";
            const TensorRef* t = weights_.find(name);
            if (!t) fail(ErrorKind::format, "model '" + source() + "' lacks tensor '" + name + "'");
            const TensorRef& fused = matrix_ref(weights_, name, t, QD + 2 * KD, E);
            L.wq = weight_rows(name, fused, 0, QD, E);
            L.wk = weight_rows(name, fused, QD, KD, E);
            L.wv = weight_rows(name, fused, QD + KD, KD, E);
        } else {
            L.wq = weight(p + "attn_q.weight", QD, E);
            L.wk = weight(p + "attn_k.weight", KD, E);
            L.wv = weight(p + "attn_v.weight", KD, E);
        }
        L.wo = weight(p + "attn_output.weight", E, QD);
        if (spec.sandwich_norms) {
            L.post_attn_norm.weight = vector(p + "post_attention_norm.weight", E);
            L.post_ffn_norm.weight = vector(p + "post_ffw_norm.weight", E);
        }
        if (spec.qk_norm) {
            L.q_norm.weight = vector(p + "attn_q_norm.weight", hp_.head_dim);
            L.k_norm.weight = vector(p + "attn_k_norm.weight", hp_.head_dim);
        }
        if (spec.fused_gate_up) {   // rows [0, F) gate, [F, 2F) up
            const std::string name = p + "ffn_up.weight";
            const TensorRef* t = weights_.find(name);
            if (!t) fail(ErrorKind::format, "model '" + source() + "' lacks tensor '" + name + "'");
            const TensorRef& fused = matrix_ref(weights_, name, t, 2 * F, E);
            L.w_gate = weight_rows(name, fused, 0, F, E);
            L.w_up = weight_rows(name, fused, F, F, E);
        } else {
            if (gated(spec.mlp)) L.w_gate = weight(p + "ffn_gate.weight", F, E);
            L.w_up = weight(p + "ffn_up.weight", F, E);
        }
        L.w_down = weight(p + "ffn_down.weight", E, F);
    }
}

size_t Model::weight_bytes() const {
    size_t total = 0;
    for (const auto& [name, t] : weights_.tensors) total += t.nbytes;
    return total;
}

int64_t Model::n_params() const {
    int64_t total = 0;
    for (const auto& [name, t] : weights_.tensors) {
        int64_t n = 1;
        for (int64_t d : t.shape) n *= d;
        total += n;
    }
    return total;
}

void Model::add_extension(std::shared_ptr<ForwardExtension> ext) {
    if (!ext) fail(ErrorKind::invalid_arg, "no extension given");
    std::lock_guard<std::mutex> lock(forward_mutex_);
    if (std::find(extensions_.begin(), extensions_.end(), ext) != extensions_.end())
        fail(ErrorKind::invalid_arg, "the extension is already registered on this model");
    extensions_.push_back(std::move(ext));
}

void Model::remove_extension(const ForwardExtension* ext) {
    std::lock_guard<std::mutex> lock(forward_mutex_);
    auto it = std::find_if(extensions_.begin(), extensions_.end(), [&](const auto& e) { return e.get() == ext; });
    if (it == extensions_.end()) fail(ErrorKind::invalid_arg, "the extension is not registered on this model");
    extensions_.erase(it);
}

}  // namespace tmill
