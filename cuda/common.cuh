// What every kernel file shares: runtime error checks, warp and block reductions, and reading one
// value (or a chunk of 32) of any stored type the backend computes with. The block arithmetic is
// core/block_math.h, the CPU's own, so a value decoded here has the CPU's bits.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/vendor.cuh"   // first: the block arithmetic below uses the runtime's device functions

#include "core/block_math.h"
#include "core/dtype.h"
#include "core/error.h"

#ifdef TOKENMILL_HIP_BUILD
#define TM_GPU_NS hip_backend
#else
#define TM_GPU_NS cuda_backend
#endif

namespace tmill::TM_GPU_NS {

constexpr int kWarp = 32;   // lanes of one reduction group (a CUDA warp; half an AMD wavefront)

// A runtime failure as tokenmill's error (ErrorKind::device), naming the call and the runtime's text.
void check(cudaError_t err, const char* what);
#define TM_CHECK(call) ::tmill::TM_GPU_NS::check((call), #call)
// after a kernel launch: a bad configuration shows up here, a fault at the next synchronisation
#define TM_CHECK_LAUNCH(kernel) ::tmill::TM_GPU_NS::check(cudaGetLastError(), "launch of " kernel)

inline unsigned blocks_for(int64_t n, int per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

__device__ inline float warp_sum(float v) {
    for (int m = kWarp / 2; m > 0; m >>= 1) v += TM_SHFL_XOR(v, m);
    return v;
}
__device__ inline float warp_max(float v) {
    for (int m = kWarp / 2; m > 0; m >>= 1) v = fmaxf(v, TM_SHFL_XOR(v, m));
    return v;
}

// The sum (or maximum) over a block of blockDim.x threads (a multiple of kWarp, at most 1024),
// returned to every thread; `shared` holds 32 floats. Ends with the block synchronised.
__device__ inline float block_sum(float v, float* shared) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < n_warps; ++w) total += shared[w];   // the same order in every thread
    __syncthreads();
    return total;
}
__device__ inline float block_max(float v, float* shared) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float top = -INFINITY;
    for (int w = 0; w < n_warps; ++w) top = fmaxf(top, shared[w]);
    __syncthreads();
    return top;
}

// Value i of a row of type T (every type the backend stores weights or K/V in).
template <DType T>
__device__ inline float value_at(const uint8_t* row, int64_t i) {
    if constexpr (T == DType::f32) return reinterpret_cast<const float*>(row)[i];
    else if constexpr (T == DType::f16) return half_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
    else if constexpr (T == DType::bf16) return bfloat_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
    else {
        using Block = typename BlockOf<T>::type;
        return block_value(reinterpret_cast<const Block*>(row)[i / 32], static_cast<int>(i % 32));
    }
}

// Values [32 c, 32 c + 32) of a row of n values into v (zeros past n: float rows of any length).
template <DType T>
__device__ inline void chunk_values(const uint8_t* row, int64_t c, int64_t n, float* v) {
    if constexpr (T == DType::f32 || T == DType::f16 || T == DType::bf16) {
#pragma unroll
        for (int j = 0; j < 32; ++j) v[j] = 32 * c + j < n ? value_at<T>(row, 32 * c + j) : 0.0f;
    } else {
        using Block = typename BlockOf<T>::type;
        const Block b = reinterpret_cast<const Block*>(row)[c];
#pragma unroll
        for (int j = 0; j < 32; ++j) v[j] = block_value(b, j);
    }
}

// Calls body(tag) with tag a std::integral_constant of the runtime type t, so a generic lambda
// launches the kernel instantiated for it (decltype(tag)::value); an unexpected type is an error.
template <DType T>
using TypeTag = std::integral_constant<DType, T>;
template <typename Body>
void with_type(DType t, const Body& body) {
    switch (t) {
        case DType::f32: return body(TypeTag<DType::f32>{});
        case DType::f16: return body(TypeTag<DType::f16>{});
        case DType::bf16: return body(TypeTag<DType::bf16>{});
        case DType::q8_0: return body(TypeTag<DType::q8_0>{});
        case DType::q4_0: return body(TypeTag<DType::q4_0>{});
        case DType::q4_1: return body(TypeTag<DType::q4_1>{});
        case DType::nf4: return body(TypeTag<DType::nf4>{});
        default: fail(ErrorKind::unsupported, "the GPU backend cannot compute with tensor type " + dtype_name(t));
    }
}

}  // namespace tmill::TM_GPU_NS
