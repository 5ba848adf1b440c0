// A decoder-only transformer: hyper-parameters, weights (handed to the backend at load) and the
// forward pass, built from the blocks of its architecture (model/arch.h) with the seams of
// model/extension.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/gguf.h"
#include "io/weight_store.h"
#include "kv/kv_cache.h"
#include "model/arch.h"
#include "model/extension.h"

namespace tmill {

// How a model is loaded: the backend (device, threads, int8 prefill), and optionally a type every
// weight matrix is converted to (held in memory instead of used from the map).
struct LoadOptions {
    BackendOptions backend;
    bool convert = false;
    DType weight_type = DType::f32;   // with convert: f32, f16, bf16, q8_0, q4_0 or q4_1
};

// One sequence's part of a forward pass: new tokens (or embeddings) appended to its cache.
struct SequenceInput {
    KVCache* cache = nullptr;
    const int32_t* tokens = nullptr;   // [n] token ids (host), or
    const float* embeds = nullptr;     // [n, n_embd] input embeddings (host)
    int64_t n = 0;
    int32_t adapter = -1;              // adapter slot for extensions; -1: the base model
};

// The residual stream of chosen rows at one depth: the input of decoder layer `layer` (what HF
// transformers reports as hidden_states[layer]; 0 = the embeddings, n_layer = after the last layer,
// before the final norm).
struct LayerRows {
    int64_t layer = 0;
    std::vector<int64_t> rows;
    float* out = nullptr;   // [rows, n_embd] (host)
};

// A forward pass: the batch, and what comes back for which rows (rows are numbered across the batch
// in input order; any rows, in any order, repeats allowed).
struct ForwardRequest {
    std::vector<SequenceInput> batch;
    std::vector<int64_t> logit_rows;   // logits [logit_rows, n_vocab] -> logits (host)
    float* logits = nullptr;
    std::vector<int64_t> hidden_rows;  // final hidden states (after the output norm) [hidden_rows, n_embd]
    float* hidden = nullptr;
    std::vector<LayerRows> layer_rows;
    // Every row computed exactly as a one-token pass would compute it (RowsMode::as_decode).
    bool rows_as_decode = false;
    // Every sequence's outputs independent of the rest of the batch and of how its tokens were split into
    // passes (a scheduler's passes): the first decode_rows rows are decode steps (RowsMode::as_decode), the
    // rest prompt rows (RowsMode::invariant), and logits rows are computed as decode.
    bool batch_invariant = false;
    int64_t decode_rows = 0;
    // Polled between layers; returning true stops the pass with Error(interrupted) and every cache
    // as it was before the call.
    std::function<bool()> interrupted;
};

class Model : public std::enable_shared_from_this<Model> {
public:
    static std::shared_ptr<Model> from_gguf(const std::string& path, const LoadOptions& options = {});
    static std::shared_ptr<Model> from_gguf(const GGUFFile& file, const LoadOptions& options = {});
    static std::shared_ptr<Model> from_safetensors(const std::vector<std::string>& files, const HParams& hp,
                                                   const LoadOptions& options = {});
    static std::shared_ptr<Model> from_safetensors(const std::vector<std::shared_ptr<MappedFile>>& files,
                                                   const HParams& hp, const LoadOptions& options = {});
    ~Model();

    const HParams& hparams() const { return hp_; }
    const ArchSpec& spec() const { return *spec_; }
    Backend& backend() const { return *backend_; }
    std::shared_ptr<Backend> shared_backend() const { return backend_; }
    size_t weight_bytes() const;
    int64_t n_params() const;
    const std::string& source() const { return weights_.source; }

    // Runs the new tokens of every sequence through the model (one batch), appends them to their
    // caches and writes the requested outputs. Validates everything first: a bad request (or an
    // interrupted one) changes no cache.
    void forward(const ForwardRequest& request);

    // Extensions join every later forward pass (after those running now).
    void add_extension(std::shared_ptr<ForwardExtension> ext);
    void remove_extension(const ForwardExtension* ext);

private:
    struct Norm { const float* weight = nullptr; const float* bias = nullptr; };
    struct Layer {
        Norm attn_norm, ffn_norm;    // encoders: the norms after the attention and MLP residual adds
        Weight wq, wk, wv, wo;       // a fused QKV projection is split into wq, wk, wv at load
        Weight w_gate, w_up, w_down; // w_gate absent for a GELU MLP
        Norm q_norm, k_norm;         // qk-norm families: [head_dim] weights shared by every head
        Norm post_attn_norm, post_ffn_norm;   // sandwich-norm families: the blocks' outputs normed
    };
    // Activations of a pass of up to `rows` tokens (backend memory).
    struct Workspace {
        int64_t rows = 0;
        BackendBuffer x, h, q, k, v, att, ff_a, ff_b, out, logits;
    };
    struct Pass;   // one forward call's state (forward.cpp)

    Model(HParams hp, WeightStore weights, const LoadOptions& options);
    void build();
    void check_layer_tensors() const;
    Weight weight(const std::string& name, int64_t rows, int64_t cols, bool required = true,
                  WeightUse use = WeightUse::matmul);
    Weight weight_rows(const std::string& name, const TensorRef& t, int64_t row0, int64_t rows, int64_t cols,
                       WeightUse use = WeightUse::matmul);
    // replaces a weight matrix by a copy in options_.weight_type (rows whose length fits its blocks)
    // (and a type the engine only reads, K-quants and q5_*, by a copy in f16 when no type was asked for)
    const TensorRef* converted(const std::string& name, const TensorRef& t, int64_t rows, int64_t cols);
    const TensorRef* converted_to(const std::string& name, const TensorRef& t, int64_t rows, int64_t cols, DType to);
    std::vector<float> host_vector(const std::string& name, int64_t n, bool required);
    const float* vector(const std::string& name, int64_t n, bool required = true);
    void ensure_workspace(int64_t T);
    int64_t attention_window(const KVCache& cache) const;

    // blocks of the forward pass (forward.cpp)
    void validate(const ForwardRequest& req, int64_t& T) const;
    void embed(Pass& p);
    void norm(float* out, const float* in, const Norm& n, int64_t rows);
    void project_rows(Pass& p, const MatmulItem* items, int n, const float* x, const std::vector<LoraItem>& lora);
    void project(Pass& p, const MatmulItem* items, const Projection* roles, int n, const float* x, int64_t layer);
    RowsMode default_mode(const ForwardRequest& req) const;
    void attention_block(Pass& p, int64_t l);
    void mlp_block(Pass& p, int64_t l);
    void copy_layer_rows(Pass& p, int64_t layer);
    void outputs(Pass& p);

    HParams hp_;
    const ArchSpec* spec_;
    WeightStore weights_;
    LoadOptions options_;
    std::shared_ptr<Backend> backend_;   // shared with extensions whose buffers may outlive the model
    Weight tok_embd_, pos_embd_, output_;
    Weight type_embd_;           // encoders: token type embeddings (type 0 is added to every row)
    Norm output_norm_, embd_norm_;   // embd_norm_: encoders' norm of the embeddings
    std::vector<Layer> layers_;

    std::mutex forward_mutex_;   // one forward pass at a time per model (the pool is not reentrant)
    Workspace ws_;
    std::vector<std::shared_ptr<ForwardExtension>> extensions_;
    static constexpr int64_t kLogitRows = 16;   // logits are computed this many rows at a time
};

}  // namespace tmill
