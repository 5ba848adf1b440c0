// The GGUF types beyond the legacy 4- and 8-bit ones: q5_0 / q5_1 (32-blocks with a fifth bit),
// iq4_nl (32-blocks of 4-bit indices into a fixed non-linear codebook) and the K-quants q2_k .. q6_k
// (super-blocks of 256 values with per-sub-block scales), all computed with natively; q5_*, q4_k,
// q5_k and q6_k also quantized to.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace tmill {

// Whether t is one of the types this header covers.
bool extra_type(DType t);
// Whether quantize_row_extra writes t (q5_0, q5_1, q4_k, q5_k, q6_k).
bool quantizes_extra(DType t);
// out[n] = row for one of these types (n a multiple of its block size); bit for bit the values of
// the reference dequantizers (float products in their order).
void dequantize_row_extra(DType t, const void* row, float* out, int64_t n);
// The reference quantizers (llama.cpp's quantize_row_*_ref without an importance matrix, which is what
// llama-quantize runs without one), byte for byte: x [n] -> blocks of t.
void quantize_row_extra(DType t, const float* x, void* out, int64_t n);

// ---- block layouts (offsets in bytes), shared by the reference code and the kernels

// q5_0 [d f16][qh u32][qs 16] (22 bytes), q5_1 [d][m][qh][qs] (24): element i takes its low four bits
// from qs[i] (i < 16) or qs[i - 16] >> 4, its fifth bit from bit i of qh.
constexpr int kQ5QhOffset(bool with_min) { return with_min ? 4 : 2; }

// iq4_nl [d f16][qs 16] (18 bytes): element i is kIQ4NL[q] with q the low nibble of qs[i] (i < 16) or
// the high one of qs[i - 16]; x = d * kIQ4NL[q].
extern const int8_t kIQ4NL[16];

// q4_k [d][dmin][scales 12][qs 128] (144 bytes) and q5_k [d][dmin][scales 12][qh 32][qs 128] (176):
// sub-block b (of 8, 32 values each) takes nibble b % 2 of qs[32 (b / 2) + l], and for q5_k bit b
// of qh[l] as its fifth bit; x = d * sc_b * q - dmin * m_b.
constexpr int kK4Scales = 4;
constexpr int kK5Qh = 16;
constexpr int kK4Qs = 16, kK5Qs = 48;
// The 6-bit scale and min of sub-block j (0..7), packed in 12 bytes.
inline void k4_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// q2_k [scales 16][qs 64][d][dmin] (84 bytes): element e = 128 h + 32 k + l is bits 2k of qs[32 h + l];
// byte e / 16 of scales holds its sub-block's scale (low nibble) and min (high); x = d sc q - dmin m.
constexpr int kK2Qs = 16, kK2D = 80;

// q3_k [hmask 32][qs 64][scales 12][d] (110 bytes): element e = 128 h + 32 k + l takes its low two bits
// from bits 2k of qs[32 h + l] and is 4 less where bit 4h + k of hmask[l] is clear; 16 signed 6-bit
// scales (low nibbles in bytes 0-7, high pairs in bytes 8-11, minus 32); x = d * scale[e / 16] * q.
constexpr int kK3Qs = 32, kK3Scales = 96, kK3D = 108;

// q6_k [ql 128][qh 64][scales 16 int8][d] (210 bytes): element e = 128 h + 32 k + l (k = 0..3) takes
// its low four bits from nibble k / 2 of ql[64 h + 32 (k % 2) + l], its high two from bits 2k of
// qh[32 h + l]; x = d * scale[e / 16] * (q - 32).
constexpr int kK6Qh = 128, kK6Scales = 192, kK6D = 208;

}  // namespace tmill
