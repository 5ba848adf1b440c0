// Decoder-only transformer: hyper-parameters, weights (used in place from memory maps) and the
// forward pass. Two families share one forward pass:
//   llama  (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, GQA, SwiGLU, optional QKV bias
//   gpt2                                  : LayerNorm, learned positions, fused QKV, GELU, biases
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "gguf.h"
#include "kv_cache.h"
#include "mapped_file.h"

namespace tmill {

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
    bool tied_embeddings = false;

    bool is_gpt2() const { return arch == "gpt2"; }
};

// A named tensor as found in a file, in ggml dimension order (shape[0] is the row length).
struct TensorRef {
    DType type;
    std::vector<int64_t> shape;
    const uint8_t* data;
    size_t nbytes;
};

// All tensors of a model under GGUF-style names, plus whatever keeps their memory alive.
struct WeightStore {
    std::map<std::string, TensorRef> tensors;
    std::vector<std::shared_ptr<MappedFile>> files;
    std::vector<std::vector<uint8_t>> owned;   // converted or transposed copies
    std::string source;                        // path, for messages

    const TensorRef* find(const std::string& name) const;
    void add_owned(const std::string& name, DType type, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
};

// One sequence's part of a batched forward call: new tokens (or embeddings) appended to its cache.
struct SequenceInput {
    KVCache* cache;
    const int32_t* tokens = nullptr;   // [n] token ids, or
    const float* embeds = nullptr;     // [n, n_embd] input embeddings
    int64_t n = 0;
};

// How a model is loaded: threads, and optionally a type every weight matrix is converted to (held in
// memory instead of used from the map).
struct LoadOptions {
    int n_threads = 0;   // 0 = physical cores
    bool convert = false;
    DType weight_type = DType::f32;   // with convert: f32, f16, bf16, q8_0, q4_0 or q4_1
    bool int8_prefill = false;        // see make_cpu_backend
};

class Model : public std::enable_shared_from_this<Model> {
public:
    static std::shared_ptr<Model> from_gguf(const std::string& path, const LoadOptions& options = {});
    static std::shared_ptr<Model> from_safetensors(const std::vector<std::string>& files, const HParams& hp,
                                                   const LoadOptions& options = {});

    const HParams& hparams() const { return hp_; }
    Backend& backend() const { return *backend_; }
    size_t weight_bytes() const;
    int64_t n_params() const;
    const std::string& source() const { return weights_.source; }

    // Runs the new tokens of every sequence through the model (one batch), appends them to their
    // caches, and writes logits [rows, n_vocab] (and, if hidden_out is set, final hidden states
    // [rows, n_embd]) for the requested rows, numbered across the batch in input order.
    void forward(const std::vector<SequenceInput>& batch, const std::vector<int64_t>& output_rows,
                 float* logits_out, float* hidden_out);

private:
    struct Norm { const float* weight = nullptr; const float* bias = nullptr; };
    struct Layer {
        Norm attn_norm, ffn_norm;
        Weight wq, wk, wv, wqkv, wo;       // wqkv: fused (GPT-2); otherwise wq, wk, wv
        Weight w_gate, w_up, w_down;       // w_gate absent for GPT-2's GELU MLP
    };

    Model(HParams hp, WeightStore weights, const LoadOptions& options);
    void build();
    Weight weight(const std::string& name, int64_t rows, int64_t cols, bool required = true);
    // replaces a weight matrix by a copy in options_.weight_type (rows whose length fits its blocks)
    const TensorRef* converted(const std::string& name, const TensorRef& t, int64_t rows, int64_t cols);
    const float* vector_f32(const std::string& name, int64_t n, bool required = true);
    void ensure_workspace(int64_t T);
    int64_t attention_window(const KVCache& cache) const;

    HParams hp_;
    WeightStore weights_;
    LoadOptions options_;
    std::shared_ptr<Backend> backend_;
    Weight tok_embd_, pos_embd_, output_;
    Norm output_norm_;
    std::vector<Layer> layers_;

    std::mutex forward_mutex_;   // one forward pass at a time per model (the pool is not reentrant)
    int64_t workspace_rows_ = 0;
    std::vector<float*> workspace_;
    float *x_ = nullptr, *h_ = nullptr, *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *att_ = nullptr;
    float *ff_a_ = nullptr, *ff_b_ = nullptr;
    float* out_ = nullptr;      // [T, n_embd] final-normed rows that are output
    float* logits_ = nullptr;   // [min(T, kLogitRows), n_vocab]
    static constexpr int64_t kLogitRows = 16;
};

// Reads the hyper-parameters of a GGUF model (general.architecture and its keys).
HParams hparams_from_gguf(const GGUFFile& f);

}  // namespace tmill
