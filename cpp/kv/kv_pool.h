// A KV pool: one budget of memory for the keys and values of many sequences, cut into blocks of
// block_size positions (every layer, K and V, every KV head of those positions). A paged KVCache holds
// a table of the blocks its positions live in; blocks are reference-counted, so sequences that share a
// prompt prefix share its blocks (a block is copied before a sequence writes into a shared one).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "kv/kv_cache.h"

namespace tmill {

class Model;

class KVPool {
public:
    // n_blocks blocks of block_size positions, stored as config says (no fp16 ring: residual_len 0)
    KVPool(std::shared_ptr<const Model> model, int64_t n_blocks, int64_t block_size, const KVCacheConfig& config);
    ~KVPool();
    KVPool(const KVPool&) = delete;
    KVPool& operator=(const KVPool&) = delete;

    const Model& model() const { return *model_; }
    int64_t n_blocks() const { return n_blocks_; }
    int64_t block_size() const { return block_size_; }
    int64_t free_blocks() const;
    const KVCacheConfig& config() const { return config_; }
    size_t bytes() const { return bytes_; }
    // bytes one block takes (all layers, K and V)
    static size_t bytes_per_block(const Model& model, int64_t block_size, const KVCacheConfig& config);

    // a free block with one reference, or -1 when none is free
    int32_t allocate();
    void retain(int32_t block);
    void release(int32_t block);
    int refcount(int32_t block) const;
    // copies every layer's K and V rows of block `from` into block `to`
    void copy_block(int32_t from, int32_t to);
    // layer l's K or V store, paged over `table`
    KVStore store(size_t layer, bool value, const int32_t* table) const;

private:
    void check(int32_t block) const;

    std::shared_ptr<const Model> model_;
    int64_t n_blocks_, block_size_;
    KVCacheConfig config_;
    std::vector<KVStore> k_, v_;    // per layer: n_blocks * n_kv_heads * block_size rows
    std::vector<int> refs_;
    std::vector<int32_t> free_;
    std::vector<uint8_t*> memory_;
    size_t bytes_ = 0;
    mutable std::mutex mutex_;
};

}  // namespace tmill
