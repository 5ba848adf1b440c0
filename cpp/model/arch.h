// Model families as data: the hyper-parameters of a model and the spec of its blocks. The forward
// pass is one sequence of blocks (embed -> [attention, MLP] per layer -> output) whose parts are
// chosen by the family's ArchSpec, so a new family is a new table entry plus, where it brings a new
// kind of part, one more case in the block that uses it.
//   llama  (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, GQA, SwiGLU, optional QKV bias
//   qwen3                                 : the same with per-head RMSNorm of Q and K
//   phi3   (Phi-3 mini / medium)          : the same with fused QKV and fused gate/up projections
//   gpt2                                  : LayerNorm, learned positions, fused QKV, GELU, biases
//   bert   (BERT, MiniLM encoders)        : post-LayerNorm, learned positions + token type 0, exact GELU,
//                                           bidirectional attention, no LM head (hidden states only)
//   gemma3                                : RMSNorm before and after attention and MLP, GeGLU, qk-norm,
//                                           embeddings times sqrt(n_embd), local sliding-window layers
//                                           with their own RoPE base between global ones
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/gguf.h"

namespace tmill {

enum class NormKind { rms, layer };        // x / rms(x) * w   |  (x - mean) / std * w + b
// down(silu(gate(h)) * up(h)) | down(gelu(up(h))), tanh | erf | down(gelu_tanh(gate(h)) * up(h))
enum class MlpKind { swiglu, gelu, gelu_erf, geglu };
// whether the MLP has a gate projection (swiglu, geglu)
inline bool gated(MlpKind k) { return k == MlpKind::swiglu || k == MlpKind::geglu; }
enum class PositionKind { rope, learned }; // rotate Q and K  |  add position_embd[pos] to x

struct ArchSpec {
    const char* name;
    NormKind norm;
    MlpKind mlp;
    PositionKind positions;
    bool fused_qkv;   // one [q + k + v, n_embd] projection (GPT-2's c_attn), split at load
    bool encoder = false;   // BERT's layout: embeddings normed, each block's norm after its residual add,
                            // no final norm, attention over the whole sequence, no LM head
    bool qk_norm = false;   // RMSNorm of each query and key head (weights [head_dim]) before RoPE (Qwen3)
    bool fused_gate_up = false;   // one [gate + up, n_embd] projection (Phi-3's gate_up_proj), split at load
    bool sandwich_norms = false;  // each block's output normed before its residual add (Gemma's post norms)
    bool embed_scale = false;     // token embeddings times sqrt(n_embd) (Gemma)
};

// The spec of an architecture name, or null when it is not supported.
const ArchSpec* find_arch(const std::string& name);
// "llama, mistral, qwen2, gpt2", for messages
std::string supported_archs();

struct HParams {
    std::string arch;          // "llama", "mistral", "qwen2", "gpt2"
    int64_t n_vocab = 0;
    int64_t n_embd = 0;
    int64_t n_layer = 0;
    int64_t n_head = 0;
    int64_t n_head_kv = 0;
    int64_t head_dim = 0;
    int64_t n_ff = 0;
    int64_t n_ctx_train = 0;
    float norm_eps = 1e-5f;
    float rope_theta = 10000.0f;
    RopeStyle rope_style = RopeStyle::halves;
    int64_t sliding_window = 0;   // 0: full attention
    std::vector<float> rope_freq_factors;   // [head_dim / 2] divisors of each pair's frequency (Llama 3); empty: none
    bool tied_embeddings = false;
    float attn_scale = 0.0f;          // attention logits' scale; 0: head_dim^-0.5 (Gemma: query_pre_attn_scalar^-0.5)
    // Per layer, 1 where the layer is local (sliding_window, rope_theta_local) and 0 where it is global
    // (full attention, rope_theta); empty: every layer uses sliding_window and rope_theta (Mistral).
    std::vector<int32_t> local_layers;
    float rope_theta_local = 0.0f;    // local layers' RoPE base; 0: rope_theta
    float norm_offset = 0.0f;         // added to every norm weight at load (Gemma's HF weights: 1 + w)
};

// The architecture's spec; Error(unsupported) naming the supported ones otherwise.
const ArchSpec& arch_spec(const std::string& arch);
// Every value in range for a model we can run; Error(format) naming the first that is not.
void validate_hparams(const HParams& hp, const std::string& source);
// Reads the hyper-parameters of a GGUF model (general.architecture and its keys).
HParams hparams_from_gguf(const GGUFFile& f);

}  // namespace tmill
