#include "core/quants.h"

#include <cmath>

#include "core/error.h"
#include "core/block_math.h"
#include "core/kquants.h"

namespace tmill {

namespace {
template <typename Block>
void quantize_blocks(const float* x, Block* b, int64_t n) {
    for (int64_t i = 0; i < n / 32; ++i) quantize_block(x + i * 32, b[i]);
}
}  // namespace

float fp16_to_fp32(uint16_t h) { return half_to_float(h); }
uint16_t fp32_to_fp16(float f) { return float_to_half(f); }

void dequantize_row(DType t, const void* row, float* out, int64_t n) {
    switch (t) {
        case DType::f32:
            std::memcpy(out, row, static_cast<size_t>(n) * 4);
            return;
        case DType::f16: {
            const uint16_t* h = static_cast<const uint16_t*>(row);
            for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(h[i]);
            return;
        }
        case DType::bf16: {
            const uint16_t* h = static_cast<const uint16_t*>(row);
            for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(h[i]);
            return;
        }
        case DType::q8_0: {
            const BlockQ8_0* b = static_cast<const BlockQ8_0*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < 32; ++j) out[i * 32 + j] = d * b[i].qs[j];
            }
            return;
        }
        case DType::q4_0: {
            const BlockQ4_0* b = static_cast<const BlockQ4_0*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < 16; ++j) {
                    out[i * 32 + j] = d * ((b[i].qs[j] & 0x0F) - 8);
                    out[i * 32 + j + 16] = d * ((b[i].qs[j] >> 4) - 8);
                }
            }
            return;
        }
        case DType::q4_1: {
            const BlockQ4_1* b = static_cast<const BlockQ4_1*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d), m = fp16_to_fp32(b[i].m);
                for (int j = 0; j < 16; ++j) {
                    out[i * 32 + j] = d * (b[i].qs[j] & 0x0F) + m;
                    out[i * 32 + j + 16] = d * (b[i].qs[j] >> 4) + m;
                }
            }
            return;
        }
        case DType::nf4: {
            const BlockNF4* b = static_cast<const BlockNF4*>(row);
            for (int64_t i = 0; i < n / 32; ++i) {
                float d = fp16_to_fp32(b[i].d);
                for (int j = 0; j < 16; ++j) {
                    out[i * 32 + j] = d * kNF4[b[i].qs[j] & 0x0F];
                    out[i * 32 + j + 16] = d * kNF4[b[i].qs[j] >> 4];
                }
            }
            return;
        }
        default:
            if (extra_type(t)) return dequantize_row_extra(t, row, out, n);
            fail(ErrorKind::unsupported, "cannot compute with tensor type " + dtype_name(t));
    }
}

void quantize_row(DType t, const float* x, void* out, int64_t n) {
    switch (t) {
        case DType::f32:
            std::memcpy(out, x, static_cast<size_t>(n) * 4);
            return;
        case DType::f16: {
            uint16_t* h = static_cast<uint16_t*>(out);
            for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(x[i]);
            return;
        }
        case DType::bf16: {
            uint16_t* h = static_cast<uint16_t*>(out);
            for (int64_t i = 0; i < n; ++i) h[i] = float_to_bfloat(x[i]);
            return;
        }
        case DType::q8_0: return quantize_blocks(x, static_cast<BlockQ8_0*>(out), n);
        case DType::q4_0: return quantize_blocks(x, static_cast<BlockQ4_0*>(out), n);
        case DType::q4_1: return quantize_blocks(x, static_cast<BlockQ4_1*>(out), n);
        case DType::nf4: return quantize_blocks(x, static_cast<BlockNF4*>(out), n);
        default:
            if (quantizes_extra(t)) return quantize_row_extra(t, x, out, n);
            fail(ErrorKind::unsupported, "cannot quantize to tensor type " + dtype_name(t));
    }
}

}  // namespace tmill
