// The backend interface: where weights, activations and caches live, and the ops the model runs on
// them. The model code only calls these, so a CUDA or HIP backend is one more implementation of this
// class. Weight data, activation pointers (float*) and KV stores are backend memory; token ids and
// positions are host memory.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/hd.h"

namespace tmill {

// A weight matrix [rows, cols] (y = W x), rows stored contiguously in its own type.
struct Weight {
    DType type = DType::f32;
    int64_t rows = 0;
    int64_t cols = 0;
    const uint8_t* data = nullptr;
    size_t row_stride = 0;           // bytes between rows
    const float* bias = nullptr;     // [rows] or null
    const uint8_t* packed = nullptr; // the same values in a layout of the backend's own, or null

    explicit operator bool() const { return data != nullptr; }
};

// How the rows of a pass are computed (Backend::set_rows_mode; every pass starts with `fast`).
enum class RowsMode {
    fast,        // kernels chosen by the row count: prefill tiles for many rows, integer decode kernels for few
    as_decode,   // each row with exactly the arithmetic of a one-token pass (same kernels, same summation
                 // order), so verifying k drafted tokens reproduces k decode steps bit for bit
    invariant,   // each row the same whatever other rows share the pass (prefill kernels for every row), so a
                 // scheduler's prompt chunks give what the whole prompt alone would
};

// What a weight is for: multiplied (matmul) or only looked up by rows (an embedding table).
enum class WeightUse { matmul, rows };

enum class RopeStyle {
    none,
    adjacent,   // rotate pairs (2i, 2i+1): GGUF "llama" layout (Q/K rows permuted by the converter)
    halves,     // rotate pairs (i, i + d/2): HF layout, GGUF qwen2 ("neox")
};

// One layer's K or V store: rows of head_dim values in `type`. Contiguous: [n_kv_heads, capacity]
// rows. Paged (blocks set, a KV pool's): position p lives in block blocks[p / block_size], laid out
// [block][kv head][block_size] rows, so positions are contiguous only within a block.
struct KVStore {
    DType type = DType::f32;     // f32, f16, bf16, q8_0, q4_0 or nf4
    uint8_t* data = nullptr;
    size_t row_bytes = 0;
    int64_t capacity = 0;        // rows per KV head (contiguous)
    const int32_t* blocks = nullptr;   // paged: the sequence's block table
    int64_t block_size = 0;
    int64_t n_heads = 0;               // paged: KV heads per block

    TM_HD size_t index(int64_t kv_head, int64_t pos) const {
        if (blocks)
            return (static_cast<size_t>(blocks[pos / block_size]) * static_cast<size_t>(n_heads) + static_cast<size_t>(kv_head)) *
                       static_cast<size_t>(block_size) + static_cast<size_t>(pos % block_size);
        return static_cast<size_t>(kv_head) * static_cast<size_t>(capacity) + static_cast<size_t>(pos);
    }
    TM_HD const uint8_t* row(int64_t kv_head, int64_t pos) const { return data + index(kv_head, pos) * row_bytes; }
    TM_HD uint8_t* row(int64_t kv_head, int64_t pos) { return data + index(kv_head, pos) * row_bytes; }
    // positions from pos on that follow it contiguously in memory (up to end)
    int64_t contiguous(int64_t pos, int64_t end) const {
        return blocks ? std::min(end, (pos / block_size + 1) * block_size) - pos : end - pos;
    }
};

// One layer of one sequence's cache as the attention kernels see it. Every position is stored in
// the main stores; with a ring, the newest positions also have an fp16 copy at slot p % ring
// capacity, and the newest `residual` of them are read from there.
struct KVLayerView {
    KVStore k, v;                  // main stores (capacity = the context)
    KVStore k_ring, v_ring;        // f16 copies; data null if no ring
    int64_t residual = 0;          // newest positions read from the ring
    int64_t ring_valid_from = 0;   // positions from here on have an intact ring slot (before this call)

    TM_HD bool has_ring() const { return k_ring.data != nullptr; }
    // First position the query at `pos` reads from the ring, in a call that writes positions up to
    // n_end: its newest `residual` positions, where their slots are intact (not reused by a later
    // position of the same call, nor invalid from before). Per query position, so a row of a batch
    // reads exactly what it would read if it were decoded alone.
    TM_HD int64_t ring_from(int64_t pos, int64_t n_end) const {
        if (!has_ring()) return pos + 1;
        const int64_t from = pos + 1 - residual > ring_valid_from ? pos + 1 - residual : ring_valid_from;
        return from > n_end - k_ring.capacity ? from : n_end - k_ring.capacity;
    }
};

// One sequence's slice of a batched forward: its rows in the activations and its cache layer.
struct AttentionSegment {
    int64_t row0;        // first activation row of this sequence
    int64_t n_rows;      // new tokens of this sequence
    int64_t n_past;      // tokens already in its cache (the new ones go at n_past..)
    int64_t window;      // attend to at most this many latest positions; <= 0: unlimited
    KVLayerView kv;
    bool causal = true;  // false: every row attends to all of the segment's positions (encoders)
    bool decode = false; // a batch-invariant pass's decode row: attends exactly as a lone decode step
};

struct AttentionShape {
    int n_heads;
    int n_kv_heads;
    int head_dim;
    float scale;
};

// One product of a group that shares its input: out[T, w.rows] = x @ w^T + bias.
struct MatmulItem {
    float* out;
    const Weight* w;
};

// One low-rank addition of a LoRA adapter to a projection's output, for n_rows consecutive rows:
// out[n_rows, bt.cols] += scale * (x[n_rows, a.cols] A^T) BT, with A [r, n_in] and BT = B^T [r, n_out]
// (f32 or f16 weights; out and x point at the first row). In a call, items adding to the same output
// (the same out, n_rows and bt.cols) are adjacent, in the order they add.
struct LoraItem {
    float* out;
    const float* x;
    const Weight* a;
    const Weight* bt;
    float scale;
    int64_t n_rows;
};

// Memory cross-attention (memory-augmented models): a fixed table of memory slots' keys and values
// for one memory layer, laid out [n_kv_heads][n_slots] rows of head_dim values, each row f32, or
// int8 / int4 (two per byte, low nibble first) times its own f32 scale.
enum class MemoryQuant { f32, int8, int4 };
struct MemoryTable {
    MemoryQuant quant = MemoryQuant::f32;
    int64_t n_slots = 0;
    int n_kv_heads = 0;
    int head_dim = 0;
    const uint8_t* k = nullptr;   // [n_kv_heads * n_slots] rows
    const uint8_t* v = nullptr;
    const float* k_scale = nullptr;   // [n_kv_heads * n_slots] (int8 / int4)
    const float* v_scale = nullptr;
    TM_HD size_t row_bytes() const {
        return quant == MemoryQuant::f32 ? static_cast<size_t>(head_dim) * 4
                                         : quant == MemoryQuant::int8 ? static_cast<size_t>(head_dim)
                                                                      : static_cast<size_t>(head_dim + 1) / 2;
    }
};
// What one row attends to: groups, each one softmax over the slots of its spans, whose outputs are
// summed with the groups' weights. A span is a chapter: slots [slot0, slot0 + n_slots) whose keys and
// values are scaled by kv_scale (the chapter's routing weight). (host memory)
struct MemorySpan {
    int64_t slot0, n_slots;
    float kv_scale;
};
struct MemoryGroup {
    int32_t span0, n_spans;
    float weight;
};
struct MemoryRoute {
    int32_t group0, n_groups;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    virtual int n_threads() const = 0;
    // Whether this backend's kernels compute with matrices of type t as they are; the model converts
    // the others at load (to f16, or to the weights= type).
    virtual bool computes(DType t) const { return dtype_info(t).runnable; }

    // --- memory: activations and KV stores live in backend memory (host memory for the CPU, device
    // memory for a GPU); the model reads and writes it only through upload / download and the ops.
    virtual float* alloc(size_t n_floats) = 0;
    virtual void free(float* p) = 0;
    virtual void upload(float* dst, const float* host, size_t n) = 0;
    virtual void download(float* host, const float* src, size_t n) = 0;
    // untyped memory (KV cache stores), and copies within it (a growing cache moves its rows)
    virtual uint8_t* alloc_bytes(size_t n) = 0;
    virtual void free_bytes(uint8_t* p) = 0;
    virtual void copy_bytes(uint8_t* dst, const uint8_t* src, size_t n) = 0;

    // --- weights: every tensor the model computes with goes through these once, at load. `data`
    // is host memory (a memory map or a converted copy) that outlives the backend; what comes back
    // is backend memory the backend owns until it is destroyed (the CPU uses the map in place and
    // may add a copy in a layout its kernels read faster, w.packed).
    // A matrix [rows, cols] of `type`, rows contiguous, with an optional f32 bias [rows] (host),
    // used as `use` says.
    virtual Weight upload_weight(DType type, int64_t rows, int64_t cols, const uint8_t* data, const float* bias,
                                 WeightUse use) = 0;
    // An f32 vector [n] (norm weights and biases).
    virtual const float* upload_vector(const float* host, size_t n) = 0;

    // --- a forward pass's ops run between begin_pass and end_pass (the CPU holds its kernel level
    // fixed there; a device backend would synchronise its stream at the end)
    virtual void begin_pass() {}
    virtual void end_pass() {}
    // the arithmetic of the ops that follow, until the next call (attention splits each row's
    // positions as a lone row would in every mode but fast)
    virtual void set_rows_mode(RowsMode mode) { (void)mode; }

    // --- ops (shapes in comments; T = rows of the batch)
    // out[T, cols] = table[ids[t], :]  (ids host)
    virtual void get_rows(float* out, const Weight& table, const int32_t* ids, int64_t T) = 0;
    // out[T, rows] = x[T, cols] @ W^T + bias
    virtual void matmul(float* out, const float* x, const Weight& w, int64_t T) = 0;
    // the same for several weights with the same input (Q/K/V, gate/up), as one unit of work
    virtual void matmul_group(const MatmulItem* items, int n_items, const float* x, int64_t T) = 0;
    // out[T, n] = x / rms(x) * weight
    virtual void rms_norm(float* out, const float* x, const float* weight, int64_t T, int64_t n, float eps) = 0;
    // out[T, n] = (x - mean) / std * weight + bias
    virtual void layer_norm(float* out, const float* x, const float* weight, const float* bias, int64_t T,
                            int64_t n, float eps) = 0;
    // rotates x[T, n_heads * head_dim] in place at positions pos[T] (host); pair i turns at
    // theta^(-2i/head_dim) / freq_factors[i] (freq_factors null: 1, as in Llama 3's rope scaling)
    virtual void rope(float* x, int64_t T, int n_heads, int head_dim, const int32_t* pos, float theta,
                      RopeStyle style, const float* freq_factors = nullptr) = 0;
    // x[n] += y[n]
    virtual void add(float* x, const float* y, int64_t n) = 0;
    // gate[n] = silu(gate) * up
    virtual void swiglu(float* gate, const float* up, int64_t n) = 0;
    // x[n] = gelu(x), tanh approximation (GPT-2)
    virtual void gelu(float* x, int64_t n) = 0;
    // gate[n] = gelu(gate) * up, tanh approximation (Gemma's GeGLU)
    virtual void geglu(float* gate, const float* up, int64_t n) = 0;
    // x[n] *= s
    virtual void scale(float* x, float s, int64_t n) = 0;
    // x[n] = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), exact GELU (BERT)
    virtual void gelu_erf(float* x, int64_t n) = 0;
    // writes k, v [T, n_kv_heads * head_dim] of every segment into its cache at n_past.. (quantized
    // to the stores' types, and in fp16 into the ring where there is one)
    virtual void kv_store(const float* k, const float* v, const AttentionSegment* segs, int n_segs,
                          const AttentionShape& shape) = 0;
    // out[T, n_heads * head_dim] = causal softmax(q k^T * scale) v over each segment's cache, read
    // in its stored types (after kv_store of the same call)
    virtual void attention(float* out, const float* q, const AttentionSegment* segs, int n_segs,
                           const AttentionShape& shape) = 0;
    // the low-rank additions of one projection group (several projections, segments, adapters) as
    // one unit of work; every row computed alone, with the same arithmetic in every rows mode
    virtual void lora_add(const LoraItem* items, int n_items) = 0;
    // matmul_group, then lora_add of additions to its outputs (lora items read x's rows and add to
    // the items' outputs): one call, so a backend may run both in one pass over its threads
    virtual void matmul_group_lora(const MatmulItem* items, int n_items, const float* x, int64_t T,
                                   const LoraItem* lora, int n_lora) {
        matmul_group(items, n_items, x, T);
        if (n_lora > 0) lora_add(lora, n_lora);
    }
    // out[T, n_heads * head_dim] = for each row t and head h (kv head h / (n_heads / n_kv_heads)):
    //   sum over groups g of routes[t]: g.weight * sum_j p_j * s_j V_j,
    //   p = softmax over g's slots j of scale * s_j * (q_th . K_j),  s_j = kv_scale of j's span
    // (routes, groups, spans host memory); every row computed alone, the same in every rows mode
    virtual void memory_attention(float* out, const float* q, int64_t T, const MemoryRoute* routes,
                                  const MemoryGroup* groups, const MemorySpan* spans, const MemoryTable& table,
                                  const AttentionShape& shape) = 0;
};

// Backend memory of n floats, freed with the owner (workspace buffers).
class BackendBuffer {
public:
    BackendBuffer() = default;
    BackendBuffer(Backend& be, size_t n) : be_(&be), p_(be.alloc(n)) {}
    ~BackendBuffer() { reset(); }
    BackendBuffer(BackendBuffer&& o) noexcept : be_(o.be_), p_(o.p_) { o.p_ = nullptr; }
    BackendBuffer& operator=(BackendBuffer&& o) noexcept {
        if (this != &o) {
            reset();
            be_ = o.be_;
            p_ = o.p_;
            o.p_ = nullptr;
        }
        return *this;
    }
    BackendBuffer(const BackendBuffer&) = delete;
    BackendBuffer& operator=(const BackendBuffer&) = delete;
    float* get() const { return p_; }

private:
    void reset() {
        if (p_) be_->free(p_);
        p_ = nullptr;
    }
    Backend* be_ = nullptr;
    float* p_ = nullptr;
};

// A forward pass's ops between begin_pass and end_pass, ended on every exit path.
class PassScope {
public:
    explicit PassScope(Backend& be) : be_(be) { be_.begin_pass(); }
    ~PassScope() { be_.end_pass(); }
    PassScope(const PassScope&) = delete;
    PassScope& operator=(const PassScope&) = delete;

private:
    Backend& be_;
};

struct BackendOptions {
    std::string device = "cpu";   // "cpu"; "cuda" / "hip" (or "cuda:1": a device index) where built with them
    int n_threads = 0;            // CPU threads; 0 = physical cores
    // forward passes of 8+ tokens multiply 4-bit weights by activations rounded to int8 per
    // 32-block (llama.cpp's scheme; about twice the float tile's speed, logits move by a few percent
    // of their range), where the CPU has the kernel for it (AVX-512 VNNI); one-token decode stays exact
    bool int8_prefill = false;
    // decode steps (fewer than 8 rows) and rows as decode do the same with 4-bit and q8_0 weights: x
    // rounded to int8 per block, llama.cpp's decode precision (a fast draft model, batched decode
    // throughput); rows as decode equal the one-token steps of this setting
    bool int8_decode = false;
};

// The backend for a device: an unknown device is Error(invalid_arg), a known one this build lacks
// Error(unsupported); more threads than the CPUs this process may use is Error(invalid_arg).
std::unique_ptr<Backend> make_backend(const BackendOptions& options);
// Device names this build has.
std::vector<std::string> built_devices();
std::unique_ptr<Backend> make_cpu_backend(int n_threads, bool int8_prefill = false, bool int8_decode = false);
// The GPU backends (cuda/, built with TOKENMILL_CUDA; the same sources for AMD with TOKENMILL_HIP):
// the device of that index; none there is Error(unsupported), a runtime failure Error(device).
std::unique_ptr<Backend> make_cuda_backend(int device_index);
std::unique_ptr<Backend> make_hip_backend(int device_index);

}  // namespace tmill
