#include "kv/kv_cache.h"

#include <algorithm>

#include "core/error.h"
#include "kv/kv_pool.h"
#include "model/model.h"

namespace tmill {

namespace {

const std::pair<const char*, DType> kKVTypes[] = {
    {"fp32", DType::f32}, {"fp16", DType::f16}, {"bf16", DType::bf16},
    {"q8", DType::q8_0},  {"q4", DType::q4_0},  {"nf4", DType::nf4},
};

// fp32 and fp16 lose nothing an fp16 ring would keep
bool needs_ring(DType t) { return t != DType::f32 && t != DType::f16; }

}  // namespace

DType kv_type_from_name(const std::string& name) {
    for (const auto& [n, t] : kKVTypes)
        if (name == n) return t;
    fail(ErrorKind::invalid_arg, "unknown KV cache kind '" + name + "' (expected fp32, fp16, bf16, q8, q4 or nf4)");
}

std::string kv_type_name(DType t) {
    for (const auto& [n, type] : kKVTypes)
        if (t == type) return n;
    return dtype_name(t);
}

void KVCacheConfig::validate(int64_t head_dim, int64_t n_layer) const {
    for (DType t : {k_type, v_type}) {
        bool known = std::any_of(std::begin(kKVTypes), std::end(kKVTypes), [&](const auto& e) { return e.second == t; });
        if (!known) fail(ErrorKind::invalid_arg, "type " + dtype_name(t) + " cannot hold a KV cache");
        if (head_dim % dtype_info(t).block_size != 0)
            fail(ErrorKind::invalid_arg, "KV cache kind " + kv_type_name(t) + " needs a head dimension that is a multiple of " +
                                             std::to_string(dtype_info(t).block_size) + "; this model's is " +
                                             std::to_string(head_dim));
    }
    if (residual_len < 0 || residual_len > (int64_t(1) << 20))
        fail(ErrorKind::invalid_arg, "cache residual length must be in [0, 1048576], got " + std::to_string(residual_len));
    if (fp16_prefix_layers < 0 || fp16_prefix_layers > n_layer)
        fail(ErrorKind::invalid_arg, "fp16 prefix layers must be in [0, " + std::to_string(n_layer) + "], got " +
                                         std::to_string(fp16_prefix_layers));
    if (local_window < 0) fail(ErrorKind::invalid_arg, "local window must be >= 0, got " + std::to_string(local_window));
}

std::vector<KVCache::LayerLayout> KVCache::layout(const Model& model, int64_t capacity, const KVCacheConfig& config) {
    const HParams& hp = model.hparams();
    if (capacity <= 0 || capacity > (int64_t(1) << 24))
        fail(ErrorKind::invalid_arg, "KV cache capacity must be in [1, 16777216], got " + std::to_string(capacity));
    config.validate(hp.head_dim, hp.n_layer);
    std::vector<LayerLayout> layers;
    for (int64_t l = 0; l < hp.n_layer; ++l) {
        bool prefix = l < config.fp16_prefix_layers;
        DType kt = prefix ? DType::f16 : config.k_type, vt = prefix ? DType::f16 : config.v_type;
        bool ring = needs_ring(kt) || needs_ring(vt);
        layers.push_back({kt, vt, ring && config.residual_len > 0 ? std::min(config.residual_len + kRingSlack, capacity) : 0});
    }
    return layers;
}

namespace {
// a cache that grows starts from at least this many positions
constexpr int64_t kMinAllocation = 64;
}  // namespace

KVStore KVCache::make_store(DType type, int64_t rows, std::vector<uint8_t*>& blocks, size_t& bytes) const {
    if (rows == 0) return KVStore{};
    const HParams& hp = model_->hparams();
    KVStore s;
    s.type = type;
    s.capacity = rows;
    s.row_bytes = row_bytes(type, hp.head_dim);
    size_t n = s.row_bytes * static_cast<size_t>(hp.n_head_kv * rows);
    s.data = model_->backend().alloc_bytes(n);
    blocks.push_back(s.data);
    bytes += n;
    return s;
}

KVCache::KVCache(std::shared_ptr<const Model> model, int64_t capacity, const KVCacheConfig& config, int64_t reserve)
    : model_(std::move(model)), capacity_(capacity), config_(config) {
    if (!model_) fail(ErrorKind::invalid_arg, "a KV cache needs a model");
    if (reserve < -1) fail(ErrorKind::invalid_arg, "reserve must be >= 0 (or -1 for the whole capacity), got " + std::to_string(reserve));
    try {
        for (const LayerLayout& l : layout(*model_, capacity, config)) {
            k_.push_back(KVStore{});
            v_.push_back(KVStore{});
            k_ring_.push_back(make_store(DType::f16, l.ring, ring_blocks_, ring_bytes_));
            v_ring_.push_back(make_store(DType::f16, l.ring, ring_blocks_, ring_bytes_));
        }
        this->reserve(reserve < 0 ? capacity_ : std::min(reserve, capacity_));
    } catch (...) {
        for (uint8_t* p : ring_blocks_) model_->backend().free_bytes(p);
        for (uint8_t* p : main_blocks_) model_->backend().free_bytes(p);
        throw;
    }
}

KVCache::KVCache(std::shared_ptr<KVPool> pool, int64_t capacity) : capacity_(capacity), pool_(std::move(pool)) {
    if (!pool_) fail(ErrorKind::invalid_arg, "a paged KV cache needs a pool");
    if (capacity <= 0 || capacity > (int64_t(1) << 24))
        fail(ErrorKind::invalid_arg, "KV cache capacity must be in [1, 16777216], got " + std::to_string(capacity));
    model_ = pool_->model().shared_from_this();
    config_ = pool_->config();
}

KVCache::~KVCache() {
    for (uint8_t* p : main_blocks_) model_->backend().free_bytes(p);
    for (uint8_t* p : ring_blocks_) model_->backend().free_bytes(p);
    for (int32_t b : table_) pool_->release(b);
}

void KVCache::adopt(const std::vector<int32_t>& blocks, int64_t n_tokens) {
    Claim claim(*this);
    if (!pool_) fail(ErrorKind::invalid_arg, "only a paged cache adopts blocks");
    if (n_past_ != 0 || !table_.empty()) fail(ErrorKind::invalid_arg, "only an empty cache adopts blocks");
    const int64_t bs = pool_->block_size();
    if (n_tokens < 0 || n_tokens > static_cast<int64_t>(blocks.size()) * bs || n_tokens > capacity_ ||
        static_cast<int64_t>(blocks.size()) > (n_tokens + bs - 1) / bs)
        fail(ErrorKind::invalid_arg, std::to_string(n_tokens) + " tokens do not fill the " + std::to_string(blocks.size()) +
                                         " blocks given (or exceed the capacity)");
    std::vector<int32_t> taken;
    try {
        for (int32_t b : blocks) {
            pool_->retain(b);
            taken.push_back(b);
        }
    } catch (...) {
        for (int32_t b : taken) pool_->release(b);
        throw;
    }
    table_ = blocks;
    n_past_ = n_tokens;
}

void KVCache::reserve(int64_t n) {
    if (n > capacity_)
        fail(ErrorKind::context, std::to_string(n) + " tokens exceed the cache's capacity of " + std::to_string(capacity_));
    if (pool_) {
        // the block the next write lands in must be this sequence's own (copy a shared one first)
        const int64_t bs = pool_->block_size();
        std::vector<int32_t> fresh;
        auto take = [&]() {
            int32_t b = pool_->allocate();
            if (b < 0) {
                for (int32_t f : fresh) pool_->release(f);
                fail(ErrorKind::resource, "the KV pool has no free block (" + std::to_string(pool_->n_blocks()) +
                                              " blocks of " + std::to_string(bs) + " positions)");
            }
            fresh.push_back(b);
            return b;
        };
        const size_t tail = static_cast<size_t>(n_past_ / bs);
        int32_t copy = -1;
        if (n > n_past_ && n_past_ % bs != 0 && pool_->refcount(table_[tail]) > 1) copy = take();
        const int64_t need = (n + bs - 1) / bs - static_cast<int64_t>(table_.size());
        for (int64_t i = 0; i < need; ++i) take();
        if (copy >= 0) {   // nothing failed: commit
            pool_->copy_block(table_[tail], copy);
            pool_->release(table_[tail]);
            table_[tail] = copy;
        }
        table_.insert(table_.end(), fresh.begin() + (copy >= 0 ? 1 : 0), fresh.end());
        allocated_ = static_cast<int64_t>(table_.size()) * bs;
        return;
    }
    if (n <= allocated_) return;
    const int64_t rows = std::min(capacity_, std::max({n, 2 * allocated_, kMinAllocation}));
    const std::vector<LayerLayout> layers = layout(*model_, capacity_, config_);
    std::vector<uint8_t*> blocks;
    size_t bytes = 0;
    std::vector<KVStore> k, v;
    Backend& be = model_->backend();
    try {
        for (const LayerLayout& l : layers) {
            k.push_back(make_store(l.k, rows, blocks, bytes));
            v.push_back(make_store(l.v, rows, blocks, bytes));
        }
    } catch (...) {
        for (uint8_t* p : blocks) be.free_bytes(p);
        throw;
    }
    // the cached rows of every KV head move to the new stores ([n_kv_heads, rows] rows each)
    const int64_t n_kv = model_->hparams().n_head_kv;
    for (size_t l = 0; l < layers.size() && n_past_ > 0; ++l)
        for (int64_t h = 0; h < n_kv; ++h) {
            be.copy_bytes(k[l].row(h, 0), k_[l].row(h, 0), k_[l].row_bytes * static_cast<size_t>(n_past_));
            be.copy_bytes(v[l].row(h, 0), v_[l].row(h, 0), v_[l].row_bytes * static_cast<size_t>(n_past_));
        }
    for (uint8_t* p : main_blocks_) be.free_bytes(p);
    main_blocks_.swap(blocks);
    k_.swap(k);
    v_.swap(v);
    main_bytes_ = bytes;
    allocated_ = rows;
}

void KVCache::truncate(int64_t n) {
    Claim claim(*this);
    if (n < 0 || n > n_past_)
        fail(ErrorKind::invalid_arg, "cannot truncate a cache of " + std::to_string(n_past_) + " tokens to " +
                                         std::to_string(n));
    n_past_ = n;
    for (auto& entry : states_) entry.second->truncate(n);
    ring_valid_from_ = std::min(ring_valid_from_, n);   // slots of the kept positions are untouched
    if (pool_) {   // blocks past the kept positions go back to the pool
        const size_t keep = static_cast<size_t>((n + pool_->block_size() - 1) / pool_->block_size());
        for (size_t i = keep; i < table_.size(); ++i) pool_->release(table_[i]);
        table_.resize(std::min(keep, table_.size()));
        allocated_ = static_cast<int64_t>(table_.size()) * pool_->block_size();
    }
}

KVCache::Claim::Claim(KVCache& cache) : cache_(&cache) {
    bool expected = false;
    if (!cache.claimed_.compare_exchange_strong(expected, true, std::memory_order_acquire))
        fail(ErrorKind::invalid_arg, "the KV cache is in use by another call (one cache serves one caller at a time)");
}

KVCache::Claim::~Claim() {
    if (cache_) cache_->claimed_.store(false, std::memory_order_release);
}

size_t KVCache::bytes() const {
    if (pool_) return table_.size() * KVPool::bytes_per_block(*model_, pool_->block_size(), config_);
    return main_bytes_ + ring_bytes_;
}

size_t KVCache::bytes_per_token(const Model& model, const KVCacheConfig& config) {
    const HParams& hp = model.hparams();
    size_t total = 0;
    for (const LayerLayout& l : layout(model, 1, config)) total += row_bytes(l.k, hp.head_dim) + row_bytes(l.v, hp.head_dim);
    return total * static_cast<size_t>(hp.n_head_kv);
}

size_t KVCache::bytes_for(const Model& model, int64_t capacity, const KVCacheConfig& config) {
    const HParams& hp = model.hparams();
    size_t ring = 0;
    for (const LayerLayout& l : layout(model, capacity, config))
        ring += 2 * row_bytes(DType::f16, hp.head_dim) * static_cast<size_t>(l.ring * hp.n_head_kv);
    return bytes_per_token(model, config) * static_cast<size_t>(capacity) + ring;
}

KVLayerView KVCache::layer_view(size_t layer) const {
    if (pool_) return KVLayerView{pool_->store(layer, false, table_.data()), pool_->store(layer, true, table_.data()), {}, {}, 0, 0};
    return KVLayerView{k_[layer], v_[layer], k_ring_[layer], v_ring_[layer], config_.residual_len, ring_valid_from_};
}

void KVCache::discard_write(int64_t n_new) {
    const int64_t kept = n_past_;
    advance(n_new);   // the ring slots the call reached count as overwritten ...
    n_past_ = kept;   // ... but none of its tokens is kept
    ring_valid_from_ = std::min(ring_valid_from_, kept);
    for (auto& entry : states_) entry.second->truncate(kept);
}

SequenceState* KVCache::sequence_state(uint64_t key) const {
    for (auto& entry : states_)
        if (entry.first == key) return entry.second.get();
    return nullptr;
}

void KVCache::set_sequence_state(uint64_t key, std::unique_ptr<SequenceState> state) const {
    for (auto& entry : states_)
        if (entry.first == key) {
            entry.second = std::move(state);
            return;
        }
    states_.emplace_back(key, std::move(state));
}

void KVCache::advance(int64_t n_new) {
    n_past_ += n_new;
    // every ringed layer has the same ring capacity; positions that far back had their slot reused
    for (const KVStore& ring : k_ring_)
        if (ring.data) {
            ring_valid_from_ = std::max(ring_valid_from_, n_past_ - ring.capacity);
            return;
        }
}

}  // namespace tmill
