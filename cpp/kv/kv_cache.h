// A sequence's keys and values for every layer, stored in a chosen type per K and V: fp32, fp16,
// bf16, q8 (q8_0 blocks), q4 (q4_0 blocks) or nf4. Values are quantized as they are written and the
// attention kernels read the stored blocks. Options: the newest tokens read from fp16 copies (a ring
// per layer; older ones from the quantized store) and fp16 for the first layers.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/arch.h"

namespace tmill {

class Model;
class KVPool;

struct KVCacheConfig {
    DType k_type = DType::f32;
    DType v_type = DType::f32;
    int64_t residual_len = 0;         // newest tokens kept in fp16 (a ring per layer); 0 = none
    int64_t fp16_prefix_layers = 0;   // the first layers store K and V as fp16 whatever the types
    int64_t local_window = 0;         // attend to at most the last W positions; 0 = all

    // checks the types and sizes for a model whose heads have head_dim values
    void validate(int64_t head_dim, int64_t n_layer) const;
};

// Cache type names: "fp32", "fp16", "bf16", "q8", "q4", "nf4".
DType kv_type_from_name(const std::string& name);
std::string kv_type_name(DType t);

// What an extension keeps per sequence beside its cached positions (a memory layer's routing
// history), cut back with them: on truncate, and when a forward pass fails after writing.
class SequenceState {
public:
    virtual ~SequenceState() = default;
    virtual void truncate(int64_t n_positions) = 0;   // keep what belongs to the first n positions
};

class KVCache {
public:
    // A cache for up to `capacity` tokens. Memory for `reserve` tokens is allocated now (-1: all of
    // them); beyond that the cache grows on demand, so a long context costs only what is used.
    KVCache(std::shared_ptr<const Model> model, int64_t capacity, const KVCacheConfig& config = {},
            int64_t reserve = -1);
    // A paged cache for up to `capacity` tokens whose positions live in the pool's blocks, taken as
    // tokens arrive (Error(resource) when the pool has none left) and given back on truncate / destruction.
    KVCache(std::shared_ptr<KVPool> pool, int64_t capacity);
    ~KVCache();
    KVCache(const KVCache&) = delete;
    KVCache& operator=(const KVCache&) = delete;

    const Model& model() const { return *model_; }
    int64_t capacity() const { return capacity_; }
    int64_t allocated() const { return allocated_; }   // positions memory is allocated for
    int64_t n_past() const { return n_past_; }
    const KVCacheConfig& config() const { return config_; }
    bool paged() const { return pool_ != nullptr; }
    const std::vector<int32_t>& block_table() const { return table_; }
    // An empty paged cache takes over the first n_tokens positions held by `blocks` (shared: each
    // gets one more reference), e.g. a cached prompt prefix; writing into a shared block copies it first.
    void adopt(const std::vector<int32_t>& blocks, int64_t n_tokens);
    // Forget everything after the first n tokens (rollback); n must not exceed n_past. The ring
    // holds kRingSlack more positions than the residual, so a rollback of up to that many tokens
    // reads exactly what it read before; deeper ones read some fp16 positions quantized.
    void truncate(int64_t n);
    static constexpr int64_t kRingSlack = 16;
    // Makes room for n tokens (n <= capacity): the stores grow (at least doubling), cached rows are
    // copied, and a failed allocation leaves the cache as it was.
    void reserve(int64_t n);
    // An extension's state for this sequence (key: the extension's id), or null; set during a forward
    // pass, which holds the cache's claim.
    SequenceState* sequence_state(uint64_t key) const;
    void set_sequence_state(uint64_t key, std::unique_ptr<SequenceState> state) const;
    // the memory this cache holds now
    size_t bytes() const;
    // bytes per cached token of the main stores (the ring is a fixed extra) ...
    static size_t bytes_per_token(const Model& model, const KVCacheConfig& config);
    // ... and everything a cache of this capacity allocates when full
    static size_t bytes_for(const Model& model, int64_t capacity, const KVCacheConfig& config);

    // Held by a call that uses the cache (a forward pass, a truncate): a second call at the same
    // time fails with Error(invalid_arg) instead of corrupting it.
    class Claim {
    public:
        explicit Claim(KVCache& cache);
        ~Claim();
        Claim(Claim&& other) noexcept : cache_(other.cache_) { other.cache_ = nullptr; }
        Claim(const Claim&) = delete;
        Claim& operator=(const Claim&) = delete;

    private:
        KVCache* cache_;
    };

private:
    friend class Model;
    struct LayerLayout { DType k, v; int64_t ring; };   // ring: fp16 slots, 0 = none
    static std::vector<LayerLayout> layout(const Model& model, int64_t capacity, const KVCacheConfig& config);
    KVLayerView layer_view(size_t layer) const;
    // after a forward call appended n_new tokens: older ring slots were reused
    void advance(int64_t n_new);
    // after a forward call that wrote n_new tokens and then failed: n_past stays, and ring slots the
    // call overwrote no longer count as intact
    void discard_write(int64_t n_new);
    KVStore make_store(DType type, int64_t rows, std::vector<uint8_t*>& blocks, size_t& bytes) const;

    std::shared_ptr<const Model> model_;
    int64_t capacity_;
    KVCacheConfig config_;
    int64_t allocated_ = 0;
    int64_t n_past_ = 0;
    int64_t ring_valid_from_ = 0;   // positions from here on have an intact ring slot
    std::vector<KVStore> k_, v_, k_ring_, v_ring_;   // per layer
    std::vector<uint8_t*> main_blocks_, ring_blocks_;   // every allocation, freed with the cache
    size_t main_bytes_ = 0, ring_bytes_ = 0;
    std::atomic<bool> claimed_{false};
    mutable std::vector<std::pair<uint64_t, std::unique_ptr<SequenceState>>> states_;
    std::shared_ptr<KVPool> pool_;   // paged: where the blocks live ...
    std::vector<int32_t> table_;     // ... and which hold this sequence's positions, in order
};

}  // namespace tmill
