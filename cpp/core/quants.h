// Reference conversions between float and the storage types: exact dequantization per the GGUF
// block layouts, and the matching quantizers (round to nearest, as the GGUF reference does).
#pragma once

#include <cstdint>
#include <cstring>

#include "core/dtype.h"

namespace tmill {

float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);   // round to nearest even

inline float bf16_to_fp32(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// out[n] = row (n elements of type t, n a multiple of the block size; t runnable).
void dequantize_row(DType t, const void* row, float* out, int64_t n);

// Quantizes n floats (a multiple of t's block size) into blocks of t (f32, f16, bf16, q8_0, q4_0, q4_1,
// nf4, and the types of kquants.h that quantizes_extra names).
void quantize_row(DType t, const float* x, void* out, int64_t n);

}  // namespace tmill
