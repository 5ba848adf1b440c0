// Products of weights with activations on the CPU (Backend::matmul, matmul_group, matmul_group_lora):
// which kernel each weight's product with T tokens runs on, the copies of the weights those kernels
// read, the activations prepared for them, and how the work is cut across the pool.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/lora.h"
#include "core/threadpool.h"

namespace tmill::cpu {

struct Kernels;

// what Weight::packed holds: eight-row groups (4- and 5-bit types) or Q8_0 strips of sixteen rows
inline bool packed8(const Weight& w) { return w.packed && w.type != DType::q8_0; }
inline bool q8_0_strips(const Weight& w) { return w.packed && w.type == DType::q8_0; }

class Matmul {
public:
    // int8_prefill / int8_decode: 4-bit weights meet x rounded to int8 in prefill / in decode
    // (BackendOptions)
    Matmul(ThreadPool& pool, bool int8_prefill, bool int8_decode);

    // Gives a matrix the copy its kernels read (Weight::packed, or w.data moved to a copy).
    void pack(Weight& w);

    // out_i[T, rows_i] = x[T, cols] @ W_i^T + bias_i for every item, then the LoRA additions (lora may
    // be empty), with the arithmetic mode asks for (backend.h)
    void run(const MatmulItem* items, int n_items, const float* x, int64_t T, const LoraItem* lora, int n_lora,
             LoraPlan& lora_plan, RowsMode mode);

private:
    // activations prepared for the per-row integer kernels: q [T, 2 * cols], d and sum [T, cols / 32]
    struct PreparedX {
        std::vector<int16_t> q;
        std::vector<float> d, sum;
    };

    uint8_t* pack_space(size_t bytes);
    void matmul_units(const MatmulItem* items, const std::vector<int64_t>& first_unit, const float* x, int64_t T,
                      int64_t u0, int64_t u1, int thread, int64_t k0, int64_t kn);
    void packed_tokens(const Weight& w, float* out, int64_t r0, int64_t t0, int64_t t1);
    void amx_unit(const Weight& w, float* out, int64_t T, int64_t r0, int thread);
    void q8_0_strip_unit(const Weight& w, float* out, int64_t r0, int64_t t0, int64_t t1);
    void q8_0_int8_rows(const Weight& w, float* out, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
    void tile16_unit(const Weight& w, float* out, int64_t T, int64_t u, int thread, int64_t k0, int64_t kn);
    float* scratch(int thread, int64_t n);

    bool uses_packed(const Kernels& kern, const Weight& w, int64_t T) const;
    bool uses_q8_0_strips(const Kernels& kern, const Weight& w, int64_t T) const;
    bool uses_tile(const Kernels& kern, const Weight& w, int64_t T) const;
    bool decode_sized(int64_t T) const;
    bool prefill_on_amx(const Kernels& kern, const Weight& w, int64_t T) const;
    int64_t tile_unit_rows(const Kernels& kern, const Weight& w) const;
    int64_t packed_unit_rows(const Kernels& kern) const;
    bool packed_as_sixteen(const Kernels& kern, int64_t T) const;
    bool uses_int8_x(const Kernels& kern) const;
    bool uses_amx(const Kernels& kern, const Weight& w, int64_t T) const;
    int64_t amx_min_tokens(const Kernels& kern, const Weight& w) const;
    bool uses_int8_q8_0(const Kernels& kern, const Weight& w) const;
    bool uses_tile16(const Kernels& kern, const Weight& w, int64_t T) const;
    bool rows_as_decode() const { return mode_ == RowsMode::as_decode; }
    bool invariant() const { return mode_ == RowsMode::invariant; }

    ThreadPool& pool_;
    std::vector<std::vector<float>> scratch_;   // per thread: dequantized or repacked rows of a unit
    PreparedX x32_, x256_;       // by prepare_x (32-block scales) and prepare_x_k (super-block scales, K-quants)
    std::vector<int8_t> xq8_;    // ... and for the packed 4-bit kernel [T, 4 * cols]
    std::vector<float> xd8_, xsum8_;
    std::vector<int32_t> xpart_sums_;   // ... their part sums (or int8 decode's block sums) for the Q8_0 strips [T, 2 * cols / 32]
    std::vector<int8_t> xa_;            // int8 kernels: x rounded to int8 [T, cols] ...
    std::vector<float> xsum_rounded_;   // ... and its block sums [T, cols / 32]
    std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> packed_;   // chunks of weight copies (pack_space) ...
    size_t pack_used_ = 0, pack_size_ = 0;                             // ... and the last one's use and size
    RowsMode mode_ = RowsMode::fast;   // of the product now running
    bool int8_prefill_, int8_decode_;
    bool int8_rows_ = false;   // the product now running meets x rounded to int8 on the packed and strip kernels
};

}  // namespace tmill::cpu
