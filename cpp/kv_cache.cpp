#include "kv_cache.h"

#include <algorithm>

#include "error.h"
#include "model.h"

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

KVCache::KVCache(std::shared_ptr<const Model> model, int64_t capacity, const KVCacheConfig& config)
    : model_(std::move(model)), capacity_(capacity), config_(config) {
    const HParams& hp = model_->hparams();
    Backend& be = model_->backend();
    auto make = [&](DType type, int64_t rows) {
        if (rows == 0) return KVStore{};
        KVStore s;
        s.type = type;
        s.capacity = rows;
        s.row_bytes = row_bytes(type, hp.head_dim);
        size_t n = s.row_bytes * static_cast<size_t>(hp.n_head_kv * rows);
        s.data = be.alloc_bytes(n);
        blocks_.push_back(s.data);
        bytes_ += n;
        return s;
    };
    for (const LayerLayout& l : layout(*model_, capacity, config)) {
        k_.push_back(make(l.k, capacity));
        v_.push_back(make(l.v, capacity));
        k_ring_.push_back(make(DType::f16, l.ring));
        v_ring_.push_back(make(DType::f16, l.ring));
    }
}

KVCache::~KVCache() {
    for (uint8_t* p : blocks_) model_->backend().free_bytes(p);
}

void KVCache::truncate(int64_t n) {
    if (n < 0 || n > n_past_)
        fail(ErrorKind::invalid_arg, "cannot truncate a cache of " + std::to_string(n_past_) + " tokens to " +
                                         std::to_string(n));
    n_past_ = n;
    ring_valid_from_ = std::min(ring_valid_from_, n);   // slots of the kept positions are untouched
}

size_t KVCache::bytes() const { return bytes_; }

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
    return KVLayerView{k_[layer], v_[layer], k_ring_[layer], v_ring_[layer], config_.residual_len, ring_valid_from_};
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
