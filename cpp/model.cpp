#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "error.h"
#include "quants.h"
#include "safetensors.h"

namespace tmill {

// ---------------------------------------------------------------------------------------------
// Weight store

const TensorRef* WeightStore::find(const std::string& name) const {
    auto it = tensors.find(name);
    return it == tensors.end() ? nullptr : &it->second;
}

void WeightStore::add_owned(const std::string& name, DType type, std::vector<int64_t> shape,
                            std::vector<uint8_t> bytes) {
    owned.push_back(std::move(bytes));
    const std::vector<uint8_t>& b = owned.back();
    tensors[name] = TensorRef{type, std::move(shape), b.data(), b.size()};
}

namespace {

const char* const kSupportedArchs = "llama, mistral, qwen2, gpt2";

bool is_supported_arch(const std::string& arch) {
    return arch == "llama" || arch == "mistral" || arch == "qwen2" || arch == "gpt2";
}

void check_hparams(const HParams& hp, const std::string& source) {
    auto bad = [&](const std::string& what) {
        fail(ErrorKind::format, "model '" + source + "': invalid hyper-parameters: " + what);
    };
    const int64_t big = int64_t(1) << 24;
    if (hp.n_vocab <= 0 || hp.n_vocab > big) bad("vocabulary size " + std::to_string(hp.n_vocab));
    if (hp.n_embd <= 0 || hp.n_embd > big) bad("embedding size " + std::to_string(hp.n_embd));
    if (hp.n_layer <= 0 || hp.n_layer > 4096) bad("layer count " + std::to_string(hp.n_layer));
    if (hp.n_head <= 0 || hp.n_head_kv <= 0 || hp.n_head % hp.n_head_kv != 0)
        bad("head counts " + std::to_string(hp.n_head) + " / " + std::to_string(hp.n_head_kv));
    if (hp.head_dim <= 0 || hp.head_dim % 2 != 0 || hp.head_dim > 1024)
        bad("head dimension " + std::to_string(hp.head_dim));
    if (hp.n_ff <= 0 || hp.n_ff > big) bad("feed-forward size " + std::to_string(hp.n_ff));
    if (hp.n_ctx_train <= 0) bad("context length " + std::to_string(hp.n_ctx_train));
    if (!(hp.norm_eps > 0.0f) || !(hp.rope_theta > 0.0f)) bad("norm epsilon or rope theta");
}

// Tensor names in HF checkpoints -> GGUF-style names. Returns "" for tensors we ignore.
struct HfName { std::string name; bool transpose; };

HfName map_hf_name(const std::string& arch, std::string hf) {
    static const std::pair<const char*, const char*> llama_layer[] = {
        {"input_layernorm.weight", "attn_norm.weight"},
        {"self_attn.q_proj.weight", "attn_q.weight"},     {"self_attn.q_proj.bias", "attn_q.bias"},
        {"self_attn.k_proj.weight", "attn_k.weight"},     {"self_attn.k_proj.bias", "attn_k.bias"},
        {"self_attn.v_proj.weight", "attn_v.weight"},     {"self_attn.v_proj.bias", "attn_v.bias"},
        {"self_attn.o_proj.weight", "attn_output.weight"}, {"self_attn.o_proj.bias", "attn_output.bias"},
        {"post_attention_layernorm.weight", "ffn_norm.weight"},
        {"mlp.gate_proj.weight", "ffn_gate.weight"},      {"mlp.up_proj.weight", "ffn_up.weight"},
        {"mlp.down_proj.weight", "ffn_down.weight"},      {"mlp.gate_proj.bias", "ffn_gate.bias"},
        {"mlp.up_proj.bias", "ffn_up.bias"},              {"mlp.down_proj.bias", "ffn_down.bias"},
    };
    // GPT-2 uses Conv1D, whose weights are stored [in, out]: those are transposed on load.
    static const std::pair<const char*, const char*> gpt2_layer[] = {
        {"ln_1.weight", "attn_norm.weight"},          {"ln_1.bias", "attn_norm.bias"},
        {"attn.c_attn.weight", "attn_qkv.weight"},    {"attn.c_attn.bias", "attn_qkv.bias"},
        {"attn.c_proj.weight", "attn_output.weight"}, {"attn.c_proj.bias", "attn_output.bias"},
        {"ln_2.weight", "ffn_norm.weight"},           {"ln_2.bias", "ffn_norm.bias"},
        {"mlp.c_fc.weight", "ffn_up.weight"},         {"mlp.c_fc.bias", "ffn_up.bias"},
        {"mlp.c_proj.weight", "ffn_down.weight"},     {"mlp.c_proj.bias", "ffn_down.bias"},
    };
    bool gpt2 = arch == "gpt2";
    if (gpt2) {
        if (hf.rfind("transformer.", 0) == 0) hf = hf.substr(12);
        if (hf == "wte.weight") return {"token_embd.weight", false};
        if (hf == "wpe.weight") return {"position_embd.weight", false};
        if (hf == "ln_f.weight") return {"output_norm.weight", false};
        if (hf == "ln_f.bias") return {"output_norm.bias", false};
        if (hf == "lm_head.weight") return {"output.weight", false};
    } else {
        if (hf == "model.embed_tokens.weight") return {"token_embd.weight", false};
        if (hf == "model.norm.weight") return {"output_norm.weight", false};
        if (hf == "lm_head.weight") return {"output.weight", false};
    }
    const std::string prefix = gpt2 ? "h." : "model.layers.";
    if (hf.rfind(prefix, 0) != 0) return {"", false};
    size_t dot = hf.find('.', prefix.size());
    if (dot == std::string::npos) return {"", false};
    std::string index = hf.substr(prefix.size(), dot - prefix.size());
    std::string rest = hf.substr(dot + 1);
    if (gpt2) {
        for (const auto& [from, to] : gpt2_layer)
            if (rest == from) return {"blk." + index + "." + to, rest.find(".weight") != std::string::npos &&
                                                                     rest.rfind("ln_", 0) != 0};
    } else {
        for (const auto& [from, to] : llama_layer)
            if (rest == from) return {"blk." + index + "." + to, false};
    }
    return {"", false};
}

// Converts a 2-D [rows, cols] (row-major) tensor of any float type to f32 [cols, rows].
std::vector<uint8_t> transpose_to_f32(const SafetensorInfo& t) {
    int64_t rows = t.shape[0], cols = t.shape[1];
    std::vector<float> src(static_cast<size_t>(rows * cols));
    dequantize_row(t.type, t.data, src.data(), rows * cols);
    std::vector<uint8_t> out(src.size() * sizeof(float));
    float* dst = reinterpret_cast<float*>(out.data());
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[static_cast<size_t>(r * cols + c)];
    return out;
}

}  // namespace

HParams hparams_from_gguf(const GGUFFile& f) {
    HParams hp;
    hp.arch = f.get_string("general.architecture");
    if (!is_supported_arch(hp.arch))
        fail(ErrorKind::unsupported, "model architecture '" + hp.arch + "' is not supported (supported: " +
                                         kSupportedArchs + ")");
    const std::string a = hp.arch + ".";
    hp.n_embd = f.get_int(a + "embedding_length");
    hp.n_layer = f.get_int(a + "block_count");
    hp.n_head = f.get_int(a + "attention.head_count");
    hp.n_head_kv = f.get_int_or(a + "attention.head_count_kv", hp.n_head);
    hp.n_ff = f.get_int(a + "feed_forward_length");
    hp.n_ctx_train = f.get_int(a + "context_length");
    hp.head_dim = hp.n_head > 0 ? f.get_int_or(a + "attention.key_length", hp.n_embd / hp.n_head) : 0;
    if (hp.is_gpt2()) {
        hp.norm_eps = static_cast<float>(f.get_real_or(a + "attention.layer_norm_epsilon", 1e-5));
        hp.rope_style = RopeStyle::none;
    } else {
        hp.norm_eps = static_cast<float>(f.get_real_or(a + "attention.layer_norm_rms_epsilon", 1e-5));
        hp.rope_theta = static_cast<float>(f.get_real_or(a + "rope.freq_base", 10000.0));
        // llama.cpp's converter permutes llama Q/K rows so that RoPE rotates adjacent pairs;
        // qwen2 keeps the HF layout (rotate halves).
        hp.rope_style = hp.arch == "qwen2" ? RopeStyle::halves : RopeStyle::adjacent;
        int64_t rope_dim = f.get_int_or(a + "rope.dimension_count", hp.head_dim);
        if (rope_dim != hp.head_dim)
            fail(ErrorKind::unsupported, "partial rotary embeddings (rope dimension " + std::to_string(rope_dim) +
                                             " of head dimension " + std::to_string(hp.head_dim) + ") are not supported");
        if (const GGUFValue* st = f.find(a + "rope.scaling.type"))
            if (st->type == GGUFType::string && st->str != "none")
                fail(ErrorKind::unsupported, "rope scaling '" + st->str + "' is not supported");
        hp.sliding_window = f.get_int_or(a + "attention.sliding_window", 0);
    }
    const GGUFTensorInfo* embd = f.find_tensor("token_embd.weight");
    if (!embd || embd->shape.size() != 2)
        fail(ErrorKind::format, "GGUF model lacks a 2-D token_embd.weight tensor");
    hp.n_vocab = embd->shape[1];
    hp.tied_embeddings = f.find_tensor("output.weight") == nullptr;
    return hp;
}

std::shared_ptr<Model> Model::from_gguf(const std::string& path, const LoadOptions& options) {
    auto gguf = std::make_shared<GGUFFile>(path);
    HParams hp = hparams_from_gguf(*gguf);
    WeightStore store;
    store.source = path;
    store.files.push_back(gguf->file());
    for (const GGUFTensorInfo& t : gguf->tensors()) store.tensors[t.name] = TensorRef{t.type, t.shape, t.data, t.nbytes};
    std::shared_ptr<Model> m(new Model(std::move(hp), std::move(store), options));
    m->build();
    return m;
}

std::shared_ptr<Model> Model::from_safetensors(const std::vector<std::string>& files, const HParams& hp,
                                               const LoadOptions& options) {
    if (!is_supported_arch(hp.arch))
        fail(ErrorKind::unsupported, "model architecture '" + hp.arch + "' is not supported (supported: " +
                                         kSupportedArchs + ")");
    if (files.empty()) fail(ErrorKind::format, "no safetensors files given");
    WeightStore store;
    store.source = files.front();
    for (const std::string& path : files) {
        SafetensorsFile st(path);
        store.files.push_back(st.file());
        for (const auto& [hf_name, t] : st.tensors()) {
            HfName mapped = map_hf_name(hp.arch, hf_name);
            if (mapped.name.empty()) continue;
            if (!t.supported)
                fail(ErrorKind::unsupported, "tensor '" + hf_name + "' in '" + path + "' has dtype " + t.dtype_name +
                                                 " (supported: F32, F16, BF16)");
            if (store.find(mapped.name))
                fail(ErrorKind::format, "tensor '" + hf_name + "' appears in more than one safetensors file");
            std::vector<int64_t> shape(t.shape.rbegin(), t.shape.rend());  // to ggml order
            if (mapped.transpose) {
                if (t.shape.size() != 2) fail(ErrorKind::format, "tensor '" + hf_name + "' must be 2-D");
                store.add_owned(mapped.name, DType::f32, {t.shape[0], t.shape[1]}, transpose_to_f32(t));
            } else {
                store.tensors[mapped.name] = TensorRef{t.type, shape, t.data, t.nbytes};
            }
        }
    }
    std::shared_ptr<Model> m(new Model(hp, std::move(store), options));
    m->build();
    return m;
}

Model::Model(HParams hp, WeightStore weights, const LoadOptions& options)
    : hp_(std::move(hp)), weights_(std::move(weights)), options_(options), backend_(make_cpu_backend(options.n_threads, options.int8_prefill)) {
    if (options_.convert) {
        const DType t = options_.weight_type;
        if (!(t == DType::f32 || t == DType::f16 || t == DType::bf16 || t == DType::q8_0 || t == DType::q4_0 ||
              t == DType::q4_1))
            fail(ErrorKind::invalid_arg, "weights cannot be converted to " + dtype_name(t) +
                                             " (f32, f16, bf16, q8_0, q4_0, q4_1)");
    }
}

const TensorRef* Model::converted(const std::string& name, const TensorRef& t, int64_t rows, int64_t cols) {
    const DType to = options_.weight_type;
    if (!options_.convert || t.type == to || cols % dtype_info(to).block_size != 0) return &t;
    // row by row through float: the same numbers `tokenmill convert` writes
    std::vector<uint8_t> bytes(row_bytes(to, cols) * static_cast<size_t>(rows));
    std::vector<float> row(static_cast<size_t>(cols));
    const size_t src_stride = row_bytes(t.type, cols), dst_stride = row_bytes(to, cols);
    for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(t.type, t.data + r * src_stride, row.data(), cols);
        quantize_row(to, row.data(), bytes.data() + r * dst_stride, cols);
    }
    weights_.add_owned(name, to, t.shape, std::move(bytes));   // replaces the mapped tensor
    return weights_.find(name);
}

Weight Model::weight(const std::string& name, int64_t rows, int64_t cols, bool required) {
    const TensorRef* t = weights_.find(name);
    if (!t) {
        if (required) fail(ErrorKind::format, "model '" + source() + "' lacks tensor '" + name + "'");
        return Weight{};
    }
    if (t->shape.size() != 2 || t->shape[0] != cols || t->shape[1] != rows)
        fail(ErrorKind::format, "tensor '" + name + "' has shape [" +
                                    (t->shape.size() == 2 ? std::to_string(t->shape[1]) + ", " + std::to_string(t->shape[0])
                                                          : std::to_string(t->shape.size()) + " dims") +
                                    "], expected [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
    DTypeInfo info = dtype_info(t->type);
    if (!info.runnable)
        fail(ErrorKind::unsupported, "tensor '" + name + "' has type " + dtype_name(t->type) +
                                         ", which the engine cannot compute with yet");
    t = converted(name, *t, rows, cols);
    Weight w;
    w.type = t->type;
    w.rows = rows;
    w.cols = cols;
    w.data = t->data;
    w.row_stride = row_bytes(t->type, cols);
    std::string bias_name = name.substr(0, name.size() - 6) + "bias";   // "...weight" -> "...bias"
    w.bias = vector_f32(bias_name, rows, false);
    return w;
}

const float* Model::vector_f32(const std::string& name, int64_t n, bool required) {
    const TensorRef* t = weights_.find(name);
    if (!t) {
        if (required) fail(ErrorKind::format, "model '" + source() + "' lacks tensor '" + name + "'");
        return nullptr;
    }
    int64_t count = 1;
    for (int64_t d : t->shape) count *= d;
    if (count != n) fail(ErrorKind::format, "tensor '" + name + "' has " + std::to_string(count) +
                                                " elements, expected " + std::to_string(n));
    if (!dtype_info(t->type).runnable)
        fail(ErrorKind::unsupported, "tensor '" + name + "' has type " + dtype_name(t->type));
    // Small vectors are copied to aligned f32 so every op reads them directly.
    std::vector<uint8_t> bytes(static_cast<size_t>(n) * sizeof(float));
    dequantize_row(t->type, t->data, reinterpret_cast<float*>(bytes.data()), n);
    weights_.add_owned(name + "#f32", DType::f32, {n}, std::move(bytes));
    return reinterpret_cast<const float*>(weights_.owned.back().data());
}

void Model::build() {
    check_hparams(hp_, source());
    const int64_t E = hp_.n_embd, F = hp_.n_ff, V = hp_.n_vocab;
    const int64_t QD = hp_.n_head * hp_.head_dim, KD = hp_.n_head_kv * hp_.head_dim;
    const bool gpt2 = hp_.is_gpt2();
    if (gpt2 && (QD != E || KD != E)) fail(ErrorKind::format, "GPT-2 heads must span the embedding");

    tok_embd_ = weight("token_embd.weight", V, E);
    if (gpt2) pos_embd_ = weight("position_embd.weight", hp_.n_ctx_train, E);
    output_norm_.weight = vector_f32("output_norm.weight", E);
    output_norm_.bias = gpt2 ? vector_f32("output_norm.bias", E) : nullptr;
    output_ = hp_.tied_embeddings ? tok_embd_ : weight("output.weight", V, E, false);
    if (!output_) output_ = tok_embd_;

    layers_.resize(static_cast<size_t>(hp_.n_layer));
    for (int64_t l = 0; l < hp_.n_layer; ++l) {
        Layer& L = layers_[static_cast<size_t>(l)];
        const std::string p = "blk." + std::to_string(l) + ".";
        L.attn_norm.weight = vector_f32(p + "attn_norm.weight", E);
        L.ffn_norm.weight = vector_f32(p + "ffn_norm.weight", E);
        if (gpt2) {
            L.attn_norm.bias = vector_f32(p + "attn_norm.bias", E);
            L.ffn_norm.bias = vector_f32(p + "ffn_norm.bias", E);
            L.wqkv = weight(p + "attn_qkv.weight", 3 * E, E);
            // The fused projection's row blocks are Q, K and V: view them as three matrices.
            L.wq = L.wk = L.wv = L.wqkv;
            L.wq.rows = L.wk.rows = L.wv.rows = E;
            L.wk.data += E * L.wqkv.row_stride;
            L.wv.data += 2 * E * L.wqkv.row_stride;
            if (L.wqkv.bias) { L.wk.bias += E; L.wv.bias += 2 * E; }
        } else {
            L.wq = weight(p + "attn_q.weight", QD, E);
            L.wk = weight(p + "attn_k.weight", KD, E);
            L.wv = weight(p + "attn_v.weight", KD, E);
            L.w_gate = weight(p + "ffn_gate.weight", F, E);
        }
        L.wo = weight(p + "attn_output.weight", E, QD);
        L.w_up = weight(p + "ffn_up.weight", F, E);
        L.w_down = weight(p + "ffn_down.weight", E, F);
    }

    // the backend's own layouts for the matrices the forward pass multiplies by (GPT-2's Q/K/V views
    // each, not their fused parent; the embedding table only has rows looked up)
    for (Layer& L : layers_)
        for (Weight* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down})
            if (*w) backend_->pack_weight(*w);
    backend_->pack_weight(output_);
}

size_t Model::weight_bytes() const {
    size_t total = 0;
    for (const auto& [name, t] : weights_.tensors)
        if (name.find('#') == std::string::npos) total += t.nbytes;
    return total;
}

int64_t Model::n_params() const {
    int64_t total = 0;
    for (const auto& [name, t] : weights_.tensors) {
        if (name.find('#') != std::string::npos) continue;
        int64_t n = 1;
        for (int64_t d : t.shape) n *= d;
        total += n;
    }
    return total;
}

// ---------------------------------------------------------------------------------------------
// Forward pass

// The model's sliding window (Mistral) and the cache's local window: the narrower one applies.
int64_t Model::attention_window(const KVCache& cache) const {
    int64_t a = hp_.sliding_window, b = cache.config().local_window;
    if (a <= 0) return b;
    if (b <= 0) return a;
    return std::min(a, b);
}

void Model::ensure_workspace(int64_t T) {
    if (T <= workspace_rows_) return;
    for (float* p : workspace_) backend_->free(p);
    workspace_.clear();
    const int64_t E = hp_.n_embd, QD = hp_.n_head * hp_.head_dim, KD = hp_.n_head_kv * hp_.head_dim;
    auto make = [&](int64_t n) {
        workspace_.push_back(backend_->alloc(static_cast<size_t>(n)));
        return workspace_.back();
    };
    x_ = make(T * E);
    h_ = make(T * E);
    q_ = make(T * QD);
    k_ = make(T * KD);
    v_ = make(T * KD);
    att_ = make(T * QD);
    ff_a_ = make(T * hp_.n_ff);
    ff_b_ = make(T * hp_.n_ff);
    out_ = make(T * E);
    logits_ = make(std::min(T, kLogitRows) * hp_.n_vocab);
    workspace_rows_ = T;
}

void Model::forward(const std::vector<SequenceInput>& batch, const std::vector<int64_t>& output_rows,
                    float* logits_out, float* hidden_out) {
    std::lock_guard<std::mutex> lock(forward_mutex_);
    const int64_t E = hp_.n_embd, V = hp_.n_vocab;
    const bool gpt2 = hp_.is_gpt2();

    // Validate everything before touching any cache, so a bad request changes nothing.
    int64_t T = 0;
    for (const SequenceInput& in : batch) {
        if (!in.cache || in.cache->model_.get() != this) fail(ErrorKind::invalid_arg, "cache belongs to another model");
        if (in.n <= 0) fail(ErrorKind::invalid_arg, "a sequence in the batch has no new tokens");
        if ((in.tokens == nullptr) == (in.embeds == nullptr))
            fail(ErrorKind::invalid_arg, "give either token ids or embeddings");
        int64_t need = in.cache->n_past_ + in.n;
        if (need > in.cache->capacity_)
            fail(ErrorKind::context, "sequence of " + std::to_string(need) + " tokens exceeds the context of " +
                                         std::to_string(in.cache->capacity_) + " tokens");
        if (gpt2 && need > hp_.n_ctx_train)
            fail(ErrorKind::context, "GPT-2 has learned positions for " + std::to_string(hp_.n_ctx_train) +
                                         " tokens; the sequence needs " + std::to_string(need));
        if (in.tokens)
            for (int64_t i = 0; i < in.n; ++i)
                if (in.tokens[i] < 0 || in.tokens[i] >= V)
                    fail(ErrorKind::invalid_arg, "token id " + std::to_string(in.tokens[i]) + " is outside the vocabulary [0, " +
                                                     std::to_string(V) + ")");
        T += in.n;
    }
    for (int64_t r : output_rows)
        if (r < 0 || r >= T) fail(ErrorKind::invalid_arg, "output row " + std::to_string(r) + " is out of range");

    ensure_workspace(T);
    Backend& be = *backend_;

    // positions [T] and one attention segment per sequence
    std::vector<int32_t> pos(static_cast<size_t>(T));
    std::vector<AttentionSegment> segs;
    int64_t row = 0;
    for (const SequenceInput& in : batch) {
        for (int64_t i = 0; i < in.n; ++i) pos[static_cast<size_t>(row + i)] = static_cast<int32_t>(in.cache->n_past_ + i);
        segs.push_back({row, in.n, in.cache->n_past_, attention_window(*in.cache), {}});
        row += in.n;
    }

    // x[T, E] = token embeddings (or the given embeddings) (+ learned positions for GPT-2)
    for (size_t s = 0; s < batch.size(); ++s) {
        const SequenceInput& in = batch[s];
        float* dst = x_ + segs[s].row0 * E;
        if (in.tokens) be.get_rows(dst, tok_embd_, in.tokens, in.n);
        else be.upload(dst, in.embeds, static_cast<size_t>(in.n * E));
    }
    if (gpt2) {
        be.get_rows(h_, pos_embd_, pos.data(), T);
        be.add(x_, h_, T * E);
    }

    const AttentionShape shape{static_cast<int>(hp_.n_head), static_cast<int>(hp_.n_head_kv),
                               static_cast<int>(hp_.head_dim), 1.0f / std::sqrt(static_cast<float>(hp_.head_dim))};
    auto norm = [&](float* out, const float* in, const Norm& n, int64_t rows) {
        if (gpt2) be.layer_norm(out, in, n.weight, n.bias, rows, E, hp_.norm_eps);
        else be.rms_norm(out, in, n.weight, rows, E, hp_.norm_eps);
    };

    for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& L = layers_[l];
        // attention block: x += Wo · attn(rope(Wq·h), rope(Wk·h), Wv·h),  h = norm(x)
        norm(h_, x_, L.attn_norm, T);
        const MatmulItem qkv[] = {{q_, &L.wq}, {k_, &L.wk}, {v_, &L.wv}};
        be.matmul_group(qkv, 3, h_, T);   // q [T, n_head * head_dim], k and v [T, n_head_kv * head_dim]
        be.rope(q_, T, shape.n_heads, shape.head_dim, pos.data(), hp_.rope_theta, hp_.rope_style);
        be.rope(k_, T, shape.n_kv_heads, shape.head_dim, pos.data(), hp_.rope_theta, hp_.rope_style);
        for (size_t s = 0; s < batch.size(); ++s) segs[s].kv = batch[s].cache->layer_view(l);
        be.kv_store(k_, v_, segs.data(), static_cast<int>(segs.size()), shape);
        be.attention(att_, q_, segs.data(), static_cast<int>(segs.size()), shape);   // [T, n_head * head_dim]
        be.matmul(h_, att_, L.wo, T);
        be.add(x_, h_, T * E);

        // feed-forward block: x += W_down · act(h),  h = norm(x)
        norm(h_, x_, L.ffn_norm, T);
        if (L.w_gate) {
            const MatmulItem gate_up[] = {{ff_a_, &L.w_gate}, {ff_b_, &L.w_up}};
            be.matmul_group(gate_up, 2, h_, T);   // gate and up [T, n_ff]
            be.swiglu(ff_a_, ff_b_, T * hp_.n_ff);
        } else {
            be.matmul(ff_a_, h_, L.w_up, T);
            be.gelu(ff_a_, T * hp_.n_ff);
        }
        be.matmul(h_, ff_a_, L.w_down, T);
        be.add(x_, h_, T * E);
    }
    for (const SequenceInput& in : batch) in.cache->advance(in.n);

    // outputs: final norm and the vocabulary projection for the requested rows only
    const int64_t R = static_cast<int64_t>(output_rows.size());
    if (R == 0) return;
    Weight x_rows;   // x viewed as a table, to gather rows with get_rows
    x_rows.type = DType::f32;
    x_rows.rows = T;
    x_rows.cols = E;
    x_rows.data = reinterpret_cast<const uint8_t*>(x_);
    x_rows.row_stride = static_cast<size_t>(E) * sizeof(float);
    std::vector<int32_t> rows32(output_rows.begin(), output_rows.end());
    be.get_rows(h_, x_rows, rows32.data(), R);   // h[R, E]
    norm(out_, h_, output_norm_, R);             // out[R, E]
    if (hidden_out) be.download(hidden_out, out_, static_cast<size_t>(R * E));
    if (logits_out) {
        // logits in chunks of rows so the buffer stays small for long prompts
        for (int64_t r0 = 0; r0 < R; r0 += kLogitRows) {
            int64_t n = std::min(kLogitRows, R - r0);
            be.matmul(logits_, out_ + r0 * E, output_, n);
            be.download(logits_out + r0 * V, logits_, static_cast<size_t>(n * V));
        }
    }
}

}  // namespace tmill
