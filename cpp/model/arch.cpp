#include "model/arch.h"

#include <cmath>
#include <cstring>

#include "core/error.h"

namespace tmill {

namespace {

const ArchSpec kArchs[] = {
    {"llama", NormKind::rms, MlpKind::swiglu, PositionKind::rope, false},
    {"mistral", NormKind::rms, MlpKind::swiglu, PositionKind::rope, false},
    {"qwen2", NormKind::rms, MlpKind::swiglu, PositionKind::rope, false},
    {"qwen3", NormKind::rms, MlpKind::swiglu, PositionKind::rope, false, false, true},
    {"phi3", NormKind::rms, MlpKind::swiglu, PositionKind::rope, true, false, false, true},
    {"gpt2", NormKind::layer, MlpKind::gelu, PositionKind::learned, true},
    {"bert", NormKind::layer, MlpKind::gelu_erf, PositionKind::learned, false, true},
    {"gemma3", NormKind::rms, MlpKind::geglu, PositionKind::rope, false, false, true, false, true, true},
};

}  // namespace

const ArchSpec* find_arch(const std::string& name) {
    for (const ArchSpec& a : kArchs)
        if (name == a.name) return &a;
    return nullptr;
}

std::string supported_archs() {
    std::string out;
    for (const ArchSpec& a : kArchs) out += (out.empty() ? "" : ", ") + std::string(a.name);
    return out;
}

const ArchSpec& arch_spec(const std::string& arch) {
    const ArchSpec* spec = find_arch(arch);
    if (!spec)
        fail(ErrorKind::unsupported, "model architecture '" + arch + "' is not supported (supported: " + supported_archs() + ")");
    return *spec;
}

void validate_hparams(const HParams& hp, const std::string& source) {
    auto bad = [&](const std::string& what) {
        fail(ErrorKind::format, "model '" + source + "': invalid hyper-parameters: " + what);
    };
    const int64_t big = int64_t(1) << 24;
    if (hp.n_vocab <= 0 || hp.n_vocab > big) bad("vocabulary size " + std::to_string(hp.n_vocab));
    if (hp.n_embd <= 0 || hp.n_embd > big) bad("embedding size " + std::to_string(hp.n_embd));
    if (hp.n_layer <= 0 || hp.n_layer > 4096) bad("layer count " + std::to_string(hp.n_layer));
    if (hp.n_head <= 0 || hp.n_head > 4096 || hp.n_head_kv <= 0 || hp.n_head % hp.n_head_kv != 0)
        bad("head counts " + std::to_string(hp.n_head) + " / " + std::to_string(hp.n_head_kv));
    if (hp.head_dim <= 0 || hp.head_dim % 2 != 0 || hp.head_dim > 1024)
        bad("head dimension " + std::to_string(hp.head_dim));
    if (hp.n_ff <= 0 || hp.n_ff > big) bad("feed-forward size " + std::to_string(hp.n_ff));
    if (hp.n_ctx_train <= 0 || hp.n_ctx_train > big) bad("context length " + std::to_string(hp.n_ctx_train));
    if (!(hp.norm_eps > 0.0f) || !std::isfinite(hp.norm_eps) || hp.norm_eps > 1.0f)
        bad("norm epsilon " + std::to_string(hp.norm_eps));
    if (!(hp.rope_theta > 0.0f) || !std::isfinite(hp.rope_theta)) bad("rope theta " + std::to_string(hp.rope_theta));
    if (hp.sliding_window < 0 || hp.sliding_window > big) bad("sliding window " + std::to_string(hp.sliding_window));
    if (!hp.local_layers.empty() && static_cast<int64_t>(hp.local_layers.size()) != hp.n_layer)
        bad(std::to_string(hp.local_layers.size()) + " local / global layer flags for " + std::to_string(hp.n_layer) + " layers");
    if (hp.rope_theta_local < 0.0f || !std::isfinite(hp.rope_theta_local)) bad("local rope theta " + std::to_string(hp.rope_theta_local));
    if (hp.attn_scale < 0.0f || !std::isfinite(hp.attn_scale)) bad("attention scale " + std::to_string(hp.attn_scale));
    if (!std::isfinite(hp.norm_offset)) bad("norm offset");
    if (!hp.rope_freq_factors.empty()) {
        if (static_cast<int64_t>(hp.rope_freq_factors.size()) != hp.head_dim / 2)
            bad(std::to_string(hp.rope_freq_factors.size()) + " rope frequency factors for head dimension " +
                std::to_string(hp.head_dim));
        for (float f : hp.rope_freq_factors)
            if (!(f > 0.0f) || !std::isfinite(f)) bad("rope frequency factor " + std::to_string(f));
    }
}

HParams hparams_from_gguf(const GGUFFile& f) {
    HParams hp;
    hp.arch = f.get_string("general.architecture");
    const ArchSpec& spec = arch_spec(hp.arch);
    const std::string a = hp.arch + ".";
    hp.n_embd = f.get_int(a + "embedding_length");
    hp.n_layer = f.get_int(a + "block_count");
    hp.n_head = f.get_int(a + "attention.head_count");
    hp.n_head_kv = f.get_int_or(a + "attention.head_count_kv", hp.n_head);
    hp.n_ff = f.get_int(a + "feed_forward_length");
    hp.n_ctx_train = f.get_int(a + "context_length");
    hp.head_dim = hp.n_head > 0 ? f.get_int_or(a + "attention.key_length", hp.n_embd / hp.n_head) : 0;
    if (spec.norm == NormKind::layer)
        hp.norm_eps = static_cast<float>(f.get_real_or(a + "attention.layer_norm_epsilon", 1e-5));
    else
        hp.norm_eps = static_cast<float>(f.get_real_or(a + "attention.layer_norm_rms_epsilon", 1e-5));
    if (spec.positions == PositionKind::learned) {
        hp.rope_style = RopeStyle::none;
    } else {
        hp.rope_theta = static_cast<float>(f.get_real_or(a + "rope.freq_base", 10000.0));
        // llama.cpp's converter permutes llama Q/K rows so that RoPE rotates adjacent pairs;
        // qwen2, qwen3 and phi3 keep the HF layout (rotate halves).
        hp.rope_style = hp.arch == "llama" || hp.arch == "mistral" ? RopeStyle::adjacent : RopeStyle::halves;
        if (hp.arch == "gemma3") {   // as llama.cpp reads Gemma 3: every sixth layer global, local RoPE base 1e4
            for (int64_t l = 0; l < hp.n_layer; ++l) hp.local_layers.push_back((l + 1) % 6 != 0);
            hp.rope_theta_local = 10000.0f;
        }
        int64_t rope_dim = f.get_int_or(a + "rope.dimension_count", hp.head_dim);
        if (rope_dim != hp.head_dim)
            fail(ErrorKind::unsupported, "partial rotary embeddings (rope dimension " + std::to_string(rope_dim) +
                                             " of head dimension " + std::to_string(hp.head_dim) + ") are not supported");
        if (const GGUFValue* st = f.find(a + "rope.scaling.type"))
            if (st->type == GGUFType::string && st->str != "none")
                fail(ErrorKind::unsupported, "rope scaling '" + st->str + "' is not supported");
        hp.sliding_window = f.get_int_or(a + "attention.sliding_window", 0);
        if (const GGUFTensorInfo* freqs = f.find_tensor("rope_freqs.weight")) {   // llama.cpp's Llama 3 rope scaling
            if (freqs->type != DType::f32 || freqs->shape.size() != 1 || freqs->shape[0] != hp.head_dim / 2)
                fail(ErrorKind::format, "rope_freqs.weight must be f32 [head_dim / 2]");
            hp.rope_freq_factors.resize(static_cast<size_t>(freqs->shape[0]));
            std::memcpy(hp.rope_freq_factors.data(), freqs->data, hp.rope_freq_factors.size() * sizeof(float));
        }
    }
    const GGUFTensorInfo* embd = f.find_tensor("token_embd.weight");
    if (!embd || embd->shape.size() != 2)
        fail(ErrorKind::format, "GGUF model lacks a 2-D token_embd.weight tensor");
    hp.n_vocab = embd->shape[1];
    hp.tied_embeddings = f.find_tensor("output.weight") == nullptr;
    return hp;
}

}  // namespace tmill
