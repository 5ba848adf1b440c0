#include "kv/kv_pool.h"

#include "core/error.h"
#include "model/model.h"

namespace tmill {

namespace {
DType layer_type(const KVCacheConfig& c, int64_t layer, bool value) {
    if (layer < c.fp16_prefix_layers) return DType::f16;
    return value ? c.v_type : c.k_type;
}
}  // namespace

size_t KVPool::bytes_per_block(const Model& model, int64_t block_size, const KVCacheConfig& config) {
    const HParams& hp = model.hparams();
    config.validate(hp.head_dim, hp.n_layer);
    size_t total = 0;
    for (int64_t l = 0; l < hp.n_layer; ++l)
        total += row_bytes(layer_type(config, l, false), hp.head_dim) + row_bytes(layer_type(config, l, true), hp.head_dim);
    return total * static_cast<size_t>(hp.n_head_kv * block_size);
}

KVPool::KVPool(std::shared_ptr<const Model> model, int64_t n_blocks, int64_t block_size, const KVCacheConfig& config)
    : model_(std::move(model)), n_blocks_(n_blocks), block_size_(block_size), config_(config) {
    if (!model_) fail(ErrorKind::invalid_arg, "a KV pool needs a model");
    if (block_size < 1 || block_size > 4096)
        fail(ErrorKind::invalid_arg, "block_size must be in [1, 4096], got " + std::to_string(block_size));
    if (n_blocks < 1 || n_blocks > (int64_t(1) << 24))
        fail(ErrorKind::invalid_arg, "n_blocks must be in [1, 16777216], got " + std::to_string(n_blocks));
    if (config.residual_len != 0)
        fail(ErrorKind::invalid_arg, "a KV pool stores no fp16 ring: cache residual_len must be 0");
    const HParams& hp = model_->hparams();
    bytes_per_block(*model_, block_size, config);   // validates the config
    Backend& be = model_->backend();
    try {
        for (int64_t l = 0; l < hp.n_layer; ++l)
            for (bool value : {false, true}) {
                KVStore s;
                s.type = layer_type(config, l, value);
                s.row_bytes = row_bytes(s.type, hp.head_dim);
                s.block_size = block_size;
                s.n_heads = hp.n_head_kv;
                const size_t n = s.row_bytes * static_cast<size_t>(n_blocks * hp.n_head_kv * block_size);
                s.data = be.alloc_bytes(n);
                memory_.push_back(s.data);
                bytes_ += n;
                (value ? v_ : k_).push_back(s);
            }
    } catch (...) {
        for (uint8_t* p : memory_) be.free_bytes(p);
        throw;
    }
    refs_.assign(static_cast<size_t>(n_blocks), 0);
    for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

KVPool::~KVPool() {
    for (uint8_t* p : memory_) model_->backend().free_bytes(p);
}

int64_t KVPool::free_blocks() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(free_.size());
}

int32_t KVPool::allocate() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) return -1;
    int32_t b = free_.back();
    free_.pop_back();
    refs_[static_cast<size_t>(b)] = 1;
    return b;
}

void KVPool::check(int32_t block) const {
    if (block < 0 || block >= n_blocks_ || refs_[static_cast<size_t>(block)] <= 0)
        fail(ErrorKind::invalid_arg, "block " + std::to_string(block) + " is not a live block of this pool");
}

void KVPool::retain(int32_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    check(block);
    ++refs_[static_cast<size_t>(block)];
}

void KVPool::release(int32_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    check(block);
    if (--refs_[static_cast<size_t>(block)] == 0) free_.push_back(block);
}

int KVPool::refcount(int32_t block) const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (block < 0 || block >= n_blocks_) fail(ErrorKind::invalid_arg, "no block " + std::to_string(block) + " in this pool");
    return refs_[static_cast<size_t>(block)];
}

void KVPool::copy_block(int32_t from, int32_t to) {
    Backend& be = model_->backend();
    for (const std::vector<KVStore>* stores : {&k_, &v_})
        for (const KVStore& s : *stores) {
            const size_t n = s.row_bytes * static_cast<size_t>(s.n_heads * block_size_);
            be.copy_bytes(s.data + static_cast<size_t>(to) * n, s.data + static_cast<size_t>(from) * n, n);
        }
}

KVStore KVPool::store(size_t layer, bool value, const int32_t* table) const {
    KVStore s = (value ? v_ : k_)[layer];
    s.blocks = table;
    return s;
}

}  // namespace tmill
