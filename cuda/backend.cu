// The GPU backend: weights, activations and caches in device memory, every op a kernel on one
// stream. Host arrays an op takes (ids, positions, segments and their block tables, parts, routes)
// go up in one copy per op into a staging buffer that only grows; freed activation buffers are kept
// for the next allocation of the same size, so a decode step allocates nothing once warm.
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/lora.cuh"
#include "cuda/matmul.cuh"
#include "cuda/norm.cuh"
#include "cuda/rope.cuh"

#ifdef TOKENMILL_HIP_BUILD
#define TM_GPU_VENDOR "hip"
#define TM_GPU_FACTORY make_hip_backend
#else
#define TM_GPU_VENDOR "cuda"
#define TM_GPU_FACTORY make_cuda_backend
#endif

namespace tmill {
namespace TM_GPU_NS {

void check(cudaError_t err, const char* what) {
    if (err == cudaSuccess) return;
    const std::string text = cudaGetErrorString(err);
    if (err == cudaErrorMemoryAllocation)
        fail(ErrorKind::device, std::string(TM_GPU_VENDOR) + ": out of device memory (" + what + "): " + text);
    fail(ErrorKind::device, std::string(TM_GPU_VENDOR) + " runtime error in " + what + ": " + text);
}

namespace {

constexpr size_t kAlign = 256;   // device allocations and staged arrays start on this boundary

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Host arrays of one op, laid out as they will be on the device. Pointer fields that must point
// into the staged copy are recorded and set once the device address is known.
class ArgPack {
public:
    template <typename T>
    size_t put(const T* items, size_t n) {
        const size_t at = round_up(bytes_.size(), 16);
        bytes_.resize(at + n * sizeof(T));
        if (n) std::memcpy(bytes_.data() + at, items, n * sizeof(T));
        return at;
    }
    // the pointer stored at byte `field` is to become device_base + target
    void point(size_t field, size_t target) { links_.push_back({field, target}); }
    size_t size() const { return bytes_.size(); }
    uint8_t* data() { return bytes_.data(); }
    void link(const uint8_t* device_base) {
        for (const auto& [field, target] : links_) {
            const uint8_t* p = device_base + target;
            std::memcpy(bytes_.data() + field, &p, sizeof(p));
        }
    }

private:
    std::vector<uint8_t> bytes_;
    std::vector<std::pair<size_t, size_t>> links_;
};

class GpuBackend final : public Backend {
public:
    explicit GpuBackend(int index) : device_(index) {
        int count = 0;
        const cudaError_t err = cudaGetDeviceCount(&count);
        if (err != cudaSuccess || count == 0)
            fail(ErrorKind::unsupported, std::string("no " TM_GPU_VENDOR " device here (") +
                                             (err != cudaSuccess ? cudaGetErrorString(err) : "none found") + ")");
        if (index < 0 || index >= count)
            fail(ErrorKind::invalid_arg, "device " TM_GPU_VENDOR ":" + std::to_string(index) + " does not exist (" +
                                             std::to_string(count) + " present)");
        TM_CHECK(cudaSetDevice(device_));
        cudaDeviceProp prop;
        TM_CHECK(cudaGetDeviceProperties(&prop, device_));
        device_name_ = prop.name;
        TM_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }

    ~GpuBackend() override {
        // errors cannot be reported from here; the device is left as clean as it lets us
        (void)cudaSetDevice(device_);
        (void)cudaStreamSynchronize(stream_);   // nothing may still read what is freed below
        for (void* p : owned_) (void)cudaFree(p);
        release_cache();
        if (staging_) (void)cudaFree(staging_);
        if (scratch_) (void)cudaFree(scratch_);
        (void)cudaStreamDestroy(stream_);
    }

    std::string name() const override { return TM_GPU_VENDOR ":" + std::to_string(device_) + " " + device_name_; }
    int n_threads() const override { return 1; }

    float* alloc(size_t n_floats) override { return static_cast<float*>(take(n_floats * sizeof(float))); }
    void free(float* p) override { give_back(p); }
    uint8_t* alloc_bytes(size_t n) override { return static_cast<uint8_t*>(take(n)); }
    void free_bytes(uint8_t* p) override { give_back(p); }
    void upload(float* dst, const float* host, size_t n) override {
        use();
        TM_CHECK(cudaMemcpyAsync(dst, host, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    }
    void download(float* host, const float* src, size_t n) override {
        use();
        TM_CHECK(cudaMemcpyAsync(host, src, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
        TM_CHECK(cudaStreamSynchronize(stream_));
    }
    void copy_bytes(uint8_t* dst, const uint8_t* src, size_t n) override {
        use();
        TM_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream_));
    }

    bool computes(DType t) const override {
        switch (t) {
            case DType::f32: case DType::f16: case DType::bf16: case DType::q8_0: case DType::q4_0: case DType::q4_1:
                return true;
            default:   // q5_*, K-quants: converted at load
                return false;
        }
    }

    // Weights keep their file type and row layout; the host copy is not needed afterwards.
    Weight upload_weight(DType type, int64_t rows, int64_t cols, const uint8_t* data, const float* bias,
                         WeightUse use_as) override {
        (void)use_as;
        with_type(type, [](auto) {});   // a type the kernels lack fails here, at load
        Weight w;
        w.type = type;
        w.rows = rows;
        w.cols = cols;
        w.row_stride = row_bytes(type, cols);
        w.data = static_cast<const uint8_t*>(keep(data, w.row_stride * static_cast<size_t>(rows)));
        w.bias = bias ? upload_vector(bias, static_cast<size_t>(rows)) : nullptr;
        return w;
    }
    const float* upload_vector(const float* host, size_t n) override {
        return static_cast<const float*>(keep(host, n * sizeof(float)));
    }

    void begin_pass() override {
        use();
        rows_mode_ = RowsMode::fast;
    }
    // surfaces a fault of any kernel of the pass as this pass's error
    void end_pass() override {
        rows_mode_ = RowsMode::fast;
        TM_CHECK(cudaStreamSynchronize(stream_));
    }
    void set_rows_mode(RowsMode mode) override { rows_mode_ = mode; }

    void get_rows(float* out, const Weight& table, const int32_t* ids, int64_t T) override {
        ArgPack pack;
        const size_t at = pack.put(ids, static_cast<size_t>(T));
        const uint8_t* dev = stage(pack);
        TM_GPU_NS::get_rows(stream_, out, table, reinterpret_cast<const int32_t*>(dev + at), T);
    }

    // decode-sized calls and rows as decode: the matvec kernel (a row's value never depends on the
    // other rows); prefill and invariant rows: the tiled kernel
    void matmul(float* out, const float* x, const Weight& w, int64_t T) override {
        use();
        const bool tiled = rows_mode_ == RowsMode::invariant || (rows_mode_ == RowsMode::fast && T > kMatvecTokens);
        if (tiled) matmul_tiled(stream_, out, x, w, T);
        else matvec(stream_, out, x, w, T);
    }
    void matmul_group(const MatmulItem* items, int n_items, const float* x, int64_t T) override {
        for (int i = 0; i < n_items; ++i) matmul(items[i].out, x, *items[i].w, T);
    }

    void rms_norm(float* out, const float* x, const float* weight, int64_t T, int64_t n, float eps) override {
        use();
        TM_GPU_NS::rms_norm(stream_, out, x, weight, T, n, eps);
    }
    void layer_norm(float* out, const float* x, const float* weight, const float* bias, int64_t T, int64_t n,
                    float eps) override {
        use();
        TM_GPU_NS::layer_norm(stream_, out, x, weight, bias, T, n, eps);
    }
    void rope(float* x, int64_t T, int n_heads, int head_dim, const int32_t* pos, float theta, RopeStyle style,
              const float* freq_factors) override {
        if (style == RopeStyle::none || T <= 0) return;
        ArgPack pack;
        const size_t at_pos = pack.put(pos, static_cast<size_t>(T));
        const size_t at_ff = freq_factors ? pack.put(freq_factors, static_cast<size_t>(head_dim / 2)) : 0;
        const uint8_t* dev = stage(pack);
        TM_GPU_NS::rope(stream_, x, T, n_heads, head_dim, reinterpret_cast<const int32_t*>(dev + at_pos), theta, style,
                        freq_factors ? reinterpret_cast<const float*>(dev + at_ff) : nullptr);
    }
    void add(float* x, const float* y, int64_t n) override {
        use();
        TM_GPU_NS::add(stream_, x, y, n);
    }
    void swiglu(float* gate, const float* up, int64_t n) override {
        use();
        TM_GPU_NS::swiglu(stream_, gate, up, n);
    }
    void gelu(float* x, int64_t n) override {
        use();
        TM_GPU_NS::gelu(stream_, x, n);
    }
    void geglu(float* gate, const float* up, int64_t n) override {
        use();
        TM_GPU_NS::geglu(stream_, gate, up, n);
    }
    void scale(float* x, float s, int64_t n) override {
        use();
        TM_GPU_NS::scale(stream_, x, s, n);
    }
    void gelu_erf(float* x, int64_t n) override {
        use();
        TM_GPU_NS::gelu_erf(stream_, x, n);
    }

    void kv_store(const float* k, const float* v, const AttentionSegment* segs, int n_segs,
                  const AttentionShape& shape) override {
        check_shape(shape);
        ArgPack pack;
        const size_t at_segs = put_segments(pack, segs, n_segs);
        std::vector<RowRef> rows;
        for (int s = 0; s < n_segs; ++s)
            for (int64_t t = 0; t < segs[s].n_rows; ++t) rows.push_back({s, static_cast<int32_t>(t)});
        const size_t at_rows = pack.put(rows.data(), rows.size());
        const uint8_t* dev = stage(pack);
        TM_GPU_NS::kv_store(stream_, k, v, reinterpret_cast<const AttentionSegment*>(dev + at_segs),
                            reinterpret_cast<const RowRef*>(dev + at_rows), static_cast<int64_t>(rows.size()), shape);
    }

    // parts of kAttentionPart positions per (row, query head), whatever the rows mode: the split
    // depends on a row's own positions only
    void attention(float* out, const float* q, const AttentionSegment* segs, int n_segs, const AttentionShape& shape) override {
        check_shape(shape);
        std::vector<AttentionPart> parts;
        std::vector<int64_t> pair_first;
        for (int s = 0; s < n_segs; ++s) {
            const AttentionSegment& seg = segs[s];
            for (int64_t t = 0; t < seg.n_rows; ++t) {
                const int64_t pos = seg.causal ? seg.n_past + t : seg.n_past + seg.n_rows - 1;   // last position seen
                const int64_t start = seg.window > 0 ? std::max<int64_t>(0, pos - seg.window + 1) : 0;
                for (int h = 0; h < shape.n_heads; ++h) {
                    const int32_t pair = static_cast<int32_t>(pair_first.size());
                    pair_first.push_back(static_cast<int64_t>(parts.size()));
                    for (int64_t j = start; j <= pos; j += kAttentionPart)
                        parts.push_back({s, static_cast<int32_t>(t), h, pair, j, std::min(j + kAttentionPart, pos + 1)});
                }
            }
        }
        const int64_t n_pairs = static_cast<int64_t>(pair_first.size());
        pair_first.push_back(static_cast<int64_t>(parts.size()));
        ArgPack pack;
        const size_t at_segs = put_segments(pack, segs, n_segs);
        const size_t at_parts = pack.put(parts.data(), parts.size());
        const size_t at_first = pack.put(pair_first.data(), pair_first.size());
        const uint8_t* dev = stage(pack);
        float* partials = scratch(parts.size() * static_cast<size_t>(shape.head_dim + 2));
        TM_GPU_NS::attention(stream_, out, q, reinterpret_cast<const AttentionSegment*>(dev + at_segs),
                             reinterpret_cast<const AttentionPart*>(dev + at_parts), static_cast<int64_t>(parts.size()),
                             reinterpret_cast<const int64_t*>(dev + at_first), n_pairs, partials, shape);
    }

    void lora_add(const LoraItem* items, int n_items) override {
        std::vector<DeviceLoraItem> dev_items;
        std::vector<int64_t> u_first{0}, row_first{0};
        int64_t max_out = 0;
        for (int i = 0; i < n_items; ++i) {
            const LoraItem& it = items[i];
            dev_items.push_back({it.out, it.x, it.a->data, it.bt->data, it.a->rows, it.a->cols, it.bt->cols, it.n_rows,
                                 it.scale, it.a->type == DType::f16, it.bt->type == DType::f16});
            u_first.push_back(u_first.back() + it.n_rows * it.a->rows);
            row_first.push_back(row_first.back() + it.n_rows);
            max_out = std::max(max_out, it.bt->cols);
        }
        ArgPack pack;
        const size_t at_items = pack.put(dev_items.data(), dev_items.size());
        const size_t at_u = pack.put(u_first.data(), u_first.size());
        const size_t at_rows = pack.put(row_first.data(), row_first.size());
        const uint8_t* dev = stage(pack);
        float* u = scratch(static_cast<size_t>(u_first.back()));
        TM_GPU_NS::lora_add(stream_, reinterpret_cast<const DeviceLoraItem*>(dev + at_items), n_items,
                            reinterpret_cast<const int64_t*>(dev + at_u), reinterpret_cast<const int64_t*>(dev + at_rows),
                            u_first.back(), row_first.back(), max_out, u);
    }

    void memory_attention(float* out, const float* q, int64_t T, const MemoryRoute* routes, const MemoryGroup* groups,
                          const MemorySpan* spans, const MemoryTable& table, const AttentionShape& shape) override {
        check_shape(shape);
        int32_t n_groups = 0, n_spans = 0;
        for (int64_t t = 0; t < T; ++t) n_groups = std::max(n_groups, routes[t].group0 + routes[t].n_groups);
        for (int32_t g = 0; g < n_groups; ++g) n_spans = std::max(n_spans, groups[g].span0 + groups[g].n_spans);
        ArgPack pack;
        const size_t at_routes = pack.put(routes, static_cast<size_t>(T));
        const size_t at_groups = pack.put(groups, static_cast<size_t>(n_groups));
        const size_t at_spans = pack.put(spans, static_cast<size_t>(n_spans));
        const uint8_t* dev = stage(pack);
        TM_GPU_NS::memory_attention(stream_, out, q, T, reinterpret_cast<const MemoryRoute*>(dev + at_routes),
                                    reinterpret_cast<const MemoryGroup*>(dev + at_groups),
                                    reinterpret_cast<const MemorySpan*>(dev + at_spans), table, shape);
    }

private:
    void use() const { TM_CHECK(cudaSetDevice(device_)); }   // the calling thread's current device

    static void check_shape(const AttentionShape& shape) {
        if (shape.head_dim <= 0 || shape.head_dim > kMaxHeadDim || shape.n_kv_heads <= 0 || shape.n_heads % shape.n_kv_heads != 0)
            fail(ErrorKind::unsupported, "the GPU backend's attention takes head dimensions up to " + std::to_string(kMaxHeadDim) +
                                             " and whole GQA groups");
    }

    // The segments with every paged store's block table staged too (the positions this call
    // touches: up to n_past + n_rows), their pointers set to the staged tables.
    static size_t put_segments(ArgPack& pack, const AttentionSegment* segs, int n_segs) {
        const size_t at = pack.put(segs, static_cast<size_t>(n_segs));
        for (int s = 0; s < n_segs; ++s) {
            const AttentionSegment& seg = segs[s];
            const KVStore* stores[] = {&seg.kv.k, &seg.kv.v, &seg.kv.k_ring, &seg.kv.v_ring};
            for (const KVStore* st : stores) {
                if (!st->blocks) continue;
                const int64_t end = st == &seg.kv.k || st == &seg.kv.v ? seg.n_past + seg.n_rows : st->capacity;
                const size_t table = pack.put(st->blocks, static_cast<size_t>((end + st->block_size - 1) / st->block_size));
                const size_t field = at + static_cast<size_t>(s) * sizeof(AttentionSegment) +
                                     static_cast<size_t>(reinterpret_cast<const uint8_t*>(&st->blocks) -
                                                         reinterpret_cast<const uint8_t*>(&seg));
                pack.point(field, table);
            }
        }
        return at;
    }

    // the pack's device copy (valid for the kernels launched next on the stream)
    const uint8_t* stage(ArgPack& pack) {
        use();
        if (pack.size() > staging_bytes_) {
            if (staging_) TM_CHECK(cudaFree(staging_));   // waits for the kernels still reading it
            staging_ = nullptr;
            staging_bytes_ = 0;
            TM_CHECK(cudaMalloc(&staging_, std::max<size_t>(2 * pack.size(), 1 << 16)));
            staging_bytes_ = std::max<size_t>(2 * pack.size(), 1 << 16);
        }
        pack.link(static_cast<const uint8_t*>(staging_));
        if (pack.size()) TM_CHECK(cudaMemcpyAsync(staging_, pack.data(), pack.size(), cudaMemcpyHostToDevice, stream_));
        return static_cast<const uint8_t*>(staging_);
    }

    // per-op device scratch (attention partials, LoRA products) of n floats
    float* scratch(size_t n) {
        const size_t bytes = std::max<size_t>(n, 1) * sizeof(float);
        if (bytes > scratch_bytes_) {
            if (scratch_) TM_CHECK(cudaFree(scratch_));
            scratch_ = nullptr;
            scratch_bytes_ = 0;
            TM_CHECK(cudaMalloc(&scratch_, 2 * bytes));
            scratch_bytes_ = 2 * bytes;
        }
        return static_cast<float*>(scratch_);
    }

    // device memory owned until the backend goes: a copy of host bytes
    void* keep(const void* host, size_t n) {
        use();
        void* p = nullptr;
        {
            std::lock_guard<std::mutex> lock(memory_mutex_);
            malloc_or_retry(&p, std::max<size_t>(n, 1));
            owned_.push_back(p);
        }
        if (n) TM_CHECK(cudaMemcpyAsync(p, host, n, cudaMemcpyHostToDevice, stream_));
        return p;
    }

    // buffers: reused by size; on a full device the unused ones are released and the allocation retried
    // (caches are made and dropped on other threads than the passes', so under a lock)
    void* take(size_t n) {
        use();
        std::lock_guard<std::mutex> lock(memory_mutex_);
        const size_t bytes = round_up(std::max<size_t>(n, 1), kAlign);
        auto it = cache_.find(bytes);
        if (it != cache_.end() && !it->second.empty()) {
            void* p = it->second.back();
            it->second.pop_back();
            sizes_[p] = bytes;
            return p;
        }
        void* p = nullptr;
        malloc_or_retry(&p, bytes);
        sizes_[p] = bytes;
        return p;
    }
    void give_back(void* p) {
        if (!p) return;
        std::lock_guard<std::mutex> lock(memory_mutex_);
        auto it = sizes_.find(p);
        if (it == sizes_.end()) return;
        cache_[it->second].push_back(p);
        sizes_.erase(it);
    }
    void malloc_or_retry(void** p, size_t bytes) {
        if (cudaMalloc(p, bytes) == cudaSuccess) return;
        (void)cudaGetLastError();   // clear the failure before retrying
        TM_CHECK(cudaStreamSynchronize(stream_));
        release_cache();
        TM_CHECK(cudaMalloc(p, bytes));
    }
    void release_cache() {
        for (auto& [bytes, list] : cache_)
            for (void* q : list) (void)cudaFree(q);
        cache_.clear();
    }

    int device_;
    std::string device_name_;
    cudaStream_t stream_ = nullptr;
    RowsMode rows_mode_ = RowsMode::fast;
    std::mutex memory_mutex_;                      // guards owned_, cache_ and sizes_
    std::vector<void*> owned_;                     // weights and vectors
    std::map<size_t, std::vector<void*>> cache_;   // freed buffers by size
    std::map<void*, size_t> sizes_;                // buffers in use
    void* staging_ = nullptr;
    size_t staging_bytes_ = 0;
    void* scratch_ = nullptr;
    size_t scratch_bytes_ = 0;
};

}  // namespace
}  // namespace TM_GPU_NS

std::unique_ptr<Backend> TM_GPU_FACTORY(int device_index) { return std::make_unique<TM_GPU_NS::GpuBackend>(device_index); }

}  // namespace tmill
