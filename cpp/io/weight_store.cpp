#include "io/weight_store.h"

#include <utility>
#include <vector>

#include "core/error.h"
#include "core/quants.h"
#include "io/safetensors.h"

namespace tmill {

const TensorRef* WeightStore::find(const std::string& name) const {
    auto it = tensors.find(name);
    return it == tensors.end() ? nullptr : &it->second;
}

const TensorRef& WeightStore::add_owned(const std::string& name, DType type, std::vector<int64_t> shape,
                                        std::vector<uint8_t> bytes) {
    owned.push_back(std::move(bytes));
    const std::vector<uint8_t>& b = owned.back();
    return tensors[name] = TensorRef{type, std::move(shape), b.data(), b.size()};
}

WeightStore weights_from_gguf(const GGUFFile& f, const std::string& source) {
    WeightStore store;
    store.source = source;
    store.files.push_back(f.file());
    for (const GGUFTensorInfo& t : f.tensors()) store.tensors[t.name] = TensorRef{t.type, t.shape, t.data, t.nbytes};
    return store;
}

namespace {

// Tensor names in HF checkpoints -> GGUF-style names. Returns "" for tensors we ignore.
struct HfName { std::string name; bool transpose; };

using NameTable = std::vector<std::pair<const char*, const char*>>;

// How a family names its tensors: a prefix some checkpoints put in front of everything, whole-model
// tensors, and the per-layer ones under layer_prefix + index + ".".
struct HfLayout {
    const char* strip;
    NameTable globals;
    const char* layer_prefix;
    NameTable layer;
    bool conv1d;   // GPT-2's Conv1D stores weights [in, out]: they are transposed on load
};

const HfLayout& hf_layout(const std::string& arch) {
    static const HfLayout llama{"", {
        {"model.embed_tokens.weight", "token_embd.weight"}, {"model.norm.weight", "output_norm.weight"},
        {"lm_head.weight", "output.weight"},
    }, "model.layers.", {
        {"input_layernorm.weight", "attn_norm.weight"},
        {"self_attn.q_proj.weight", "attn_q.weight"},     {"self_attn.q_proj.bias", "attn_q.bias"},
        {"self_attn.k_proj.weight", "attn_k.weight"},     {"self_attn.k_proj.bias", "attn_k.bias"},
        {"self_attn.v_proj.weight", "attn_v.weight"},     {"self_attn.v_proj.bias", "attn_v.bias"},
        {"self_attn.o_proj.weight", "attn_output.weight"}, {"self_attn.o_proj.bias", "attn_output.bias"},
        {"post_attention_layernorm.weight", "ffn_norm.weight"},
        {"mlp.gate_proj.weight", "ffn_gate.weight"},      {"mlp.up_proj.weight", "ffn_up.weight"},
        {"mlp.down_proj.weight", "ffn_down.weight"},      {"mlp.gate_proj.bias", "ffn_gate.bias"},
        {"mlp.up_proj.bias", "ffn_up.bias"},              {"mlp.down_proj.bias", "ffn_down.bias"},
        {"self_attn.q_norm.weight", "attn_q_norm.weight"}, {"self_attn.k_norm.weight", "attn_k_norm.weight"},
        {"self_attn.qkv_proj.weight", "attn_qkv.weight"},  {"mlp.gate_up_proj.weight", "ffn_up.weight"},   // Phi-3
    }, false};
    // Gemma 3: post_attention_layernorm norms the attention's output (llama's name for the MLP's input
    // norm), pre_feedforward_layernorm is the MLP's input norm
    static const HfLayout gemma3{"", {
        {"model.embed_tokens.weight", "token_embd.weight"}, {"model.norm.weight", "output_norm.weight"},
        {"lm_head.weight", "output.weight"},
    }, "model.layers.", {
        {"input_layernorm.weight", "attn_norm.weight"},
        {"self_attn.q_proj.weight", "attn_q.weight"},      {"self_attn.k_proj.weight", "attn_k.weight"},
        {"self_attn.v_proj.weight", "attn_v.weight"},      {"self_attn.o_proj.weight", "attn_output.weight"},
        {"self_attn.q_norm.weight", "attn_q_norm.weight"}, {"self_attn.k_norm.weight", "attn_k_norm.weight"},
        {"post_attention_layernorm.weight", "post_attention_norm.weight"},
        {"pre_feedforward_layernorm.weight", "ffn_norm.weight"},
        {"post_feedforward_layernorm.weight", "post_ffw_norm.weight"},
        {"mlp.gate_proj.weight", "ffn_gate.weight"},       {"mlp.up_proj.weight", "ffn_up.weight"},
        {"mlp.down_proj.weight", "ffn_down.weight"},
    }, false};
    static const HfLayout gpt2{"transformer.", {
        {"wte.weight", "token_embd.weight"}, {"wpe.weight", "position_embd.weight"},
        {"ln_f.weight", "output_norm.weight"}, {"ln_f.bias", "output_norm.bias"}, {"lm_head.weight", "output.weight"},
    }, "h.", {
        {"ln_1.weight", "attn_norm.weight"},          {"ln_1.bias", "attn_norm.bias"},
        {"attn.c_attn.weight", "attn_qkv.weight"},    {"attn.c_attn.bias", "attn_qkv.bias"},
        {"attn.c_proj.weight", "attn_output.weight"}, {"attn.c_proj.bias", "attn_output.bias"},
        {"ln_2.weight", "ffn_norm.weight"},           {"ln_2.bias", "ffn_norm.bias"},
        {"mlp.c_fc.weight", "ffn_up.weight"},         {"mlp.c_fc.bias", "ffn_up.bias"},
        {"mlp.c_proj.weight", "ffn_down.weight"},     {"mlp.c_proj.bias", "ffn_down.bias"},
    }, true};
    // BERT encoders, to the names llama.cpp's GGUF files use for them (the pooler is not read)
    static const HfLayout bert{"bert.", {
        {"embeddings.word_embeddings.weight", "token_embd.weight"},
        {"embeddings.position_embeddings.weight", "position_embd.weight"},
        {"embeddings.token_type_embeddings.weight", "token_types.weight"},
        {"embeddings.LayerNorm.weight", "token_embd_norm.weight"}, {"embeddings.LayerNorm.bias", "token_embd_norm.bias"},
    }, "encoder.layer.", {
        {"attention.self.query.weight", "attn_q.weight"},         {"attention.self.query.bias", "attn_q.bias"},
        {"attention.self.key.weight", "attn_k.weight"},           {"attention.self.key.bias", "attn_k.bias"},
        {"attention.self.value.weight", "attn_v.weight"},         {"attention.self.value.bias", "attn_v.bias"},
        {"attention.output.dense.weight", "attn_output.weight"},  {"attention.output.dense.bias", "attn_output.bias"},
        {"attention.output.LayerNorm.weight", "attn_output_norm.weight"},
        {"attention.output.LayerNorm.bias", "attn_output_norm.bias"},
        {"intermediate.dense.weight", "ffn_up.weight"},           {"intermediate.dense.bias", "ffn_up.bias"},
        {"output.dense.weight", "ffn_down.weight"},               {"output.dense.bias", "ffn_down.bias"},
        {"output.LayerNorm.weight", "layer_output_norm.weight"},  {"output.LayerNorm.bias", "layer_output_norm.bias"},
    }, false};
    return arch == "gpt2" ? gpt2 : arch == "bert" ? bert : arch == "gemma3" ? gemma3 : llama;
}

HfName map_hf_name(const std::string& arch, std::string hf) {
    const HfLayout& layout = hf_layout(arch);
    const std::string strip = layout.strip;
    if (!strip.empty() && hf.rfind(strip, 0) == 0) hf = hf.substr(strip.size());
    for (const auto& [from, to] : layout.globals)
        if (hf == from) return {to, false};
    const std::string prefix = layout.layer_prefix;
    if (hf.rfind(prefix, 0) != 0) return {"", false};
    size_t dot = hf.find('.', prefix.size());
    if (dot == std::string::npos) return {"", false};
    const std::string index = hf.substr(prefix.size(), dot - prefix.size());
    const std::string rest = hf.substr(dot + 1);
    for (const auto& [from, to] : layout.layer)
        if (rest == from)
            return {"blk." + index + "." + to,
                    layout.conv1d && rest.find(".weight") != std::string::npos && rest.rfind("ln_", 0) != 0};
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

WeightStore weights_from_safetensors(const std::vector<std::shared_ptr<MappedFile>>& files, const std::string& arch) {
    if (files.empty()) fail(ErrorKind::format, "no safetensors files given");
    WeightStore store;
    store.source = files.front()->path();
    for (const std::shared_ptr<MappedFile>& file : files) {
        SafetensorsFile st(file);
        store.files.push_back(file);
        for (const auto& [hf_name, t] : st.tensors()) {
            HfName mapped = map_hf_name(arch, hf_name);
            if (mapped.name.empty()) continue;
            if (!t.supported)
                fail(ErrorKind::unsupported, "tensor '" + hf_name + "' in '" + file->path() + "' has dtype " + t.dtype_name +
                                                 " (supported: F32, F16, BF16)");
            if (store.find(mapped.name))
                fail(ErrorKind::format, "tensor '" + hf_name + "' appears more than once (in '" + file->path() + "')");
            std::vector<int64_t> shape(t.shape.rbegin(), t.shape.rend());  // to ggml order
            if (mapped.transpose) {
                if (t.shape.size() != 2) fail(ErrorKind::format, "tensor '" + hf_name + "' must be 2-D");
                store.add_owned(mapped.name, DType::f32, {t.shape[0], t.shape[1]}, transpose_to_f32(t));
            } else {
                store.tensors[mapped.name] = TensorRef{t.type, shape, t.data, t.nbytes};
            }
        }
    }
    return store;
}

}  // namespace tmill
