// AVX-512 kernels of the opt-in int8 trades: int8 prefill (sixteen rows per VPDPBUSD against x
// rounded to int8) and int8 decode's Q8_0 rows in their file layout. Part of the AVX-512 level
// (kernels_avx512.cpp), compiled with its flags.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/kernels_avx512_common.h"
#include "core/quants.h"

namespace tmill::cpu {

namespace {

using namespace avx512;

// ---- opt-in fast prefill of 4-bit weights: sixteen rows per register, x as one int8 part

// Two eight-row groups -> per block column: 16 float scales, (q4_1) 16 float minimums, then eight
// 64-byte steps of quants as bytes 0..15, step s holding in int32 lane r the elements 4s..4s+3
// (s < 4) or 16 + 4(s-4).. (s >= 4) of row r, so one VPDPBUSD multiplies four elements of
// sixteen rows by four broadcast bytes of x.
template <DType T>
void repack16_type(const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    GroupColumns<T> columns_a(a), columns_b(b);
    for (int64_t i = 0; i < n / 32; ++i, out += tile16_column_bytes(T)) {
        __m256 dw_a, offset_a, dw_b = _mm256_setzero_ps(), offset_b = _mm256_setzero_ps();   // zero rows without b
        const uint8_t* ca = columns_a.at(i, &dw_a, &offset_a);   // the columns' quants
        const uint8_t* cb = b ? columns_b.at(i, &dw_b, &offset_b) : nullptr;
        _mm512_storeu_ps(reinterpret_cast<float*>(out), _mm512_insertf32x8(_mm512_castps256_ps512(dw_a), dw_b, 1));
        if constexpr (T != DType::q4_0)
            _mm512_storeu_ps(reinterpret_cast<float*>(out + 64), _mm512_insertf32x8(_mm512_castps256_ps512(offset_a), offset_b, 1));
        // rows 0-3, 4-7, 8-11, 12-15: int32 lane 4 * (r % 4) + j holds bytes 4j..4j+3 of row r
        __m512i rows[4];
        for (int k = 0; k < 4; ++k) {
            const uint8_t* c = k < 2 ? ca : cb;
            rows[k] = c ? _mm512_loadu_si512(c + 64 * (k % 2)) : _mm512_setzero_si512();
        }
        uint8_t* steps = out + tile16_quants_offset(T);
        for (int nibble = 0; nibble < 2; ++nibble) {
            __m512i q[4];
            for (int k = 0; k < 4; ++k) {
                q[k] = nibble ? _mm512_and_si512(_mm512_srli_epi16(rows[k], 4), low4) : _mm512_and_si512(rows[k], low4);
                if constexpr (five_bit(T))
                    if (const uint8_t* c = k < 2 ? ca : cb)
                        q[k] = _mm512_mask_add_epi8(q[k], _cvtu64_mask64(fifth_bit_mask(c, k % 2, nibble)), q[k], _mm512_set1_epi8(16));
            }
            for (int j = 0; j < 4; ++j) {
                // lanes 0-3 <- lanes j, 4+j, 8+j, 12+j of the first source, lanes 4-7 <- the same of the second
                const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 28, 24, 20, 16, 12, 8, 4, 0),
                                                     _mm512_set1_epi32(j));
                const __m512i lo = _mm512_permutex2var_epi32(q[0], idx, q[1]);
                const __m512i hi = _mm512_permutex2var_epi32(q[2], idx, q[3]);
                _mm512_storeu_si512(steps + 64 * (4 * nibble + j), _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(1, 0, 1, 0)));
            }
        }
    }
}

void repack16(DType t, const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* out) {
    // q4_k's and q5_*'s tiles are q4_1's: a scale and an offset per row and block
    with_packed_type(t, [&](auto type) { repack16_type<decltype(type)::value>(a, b, n, out); });
}

// Sixteen rows against eight tokens. Per block and token, with x rounded to dx * a (a = round(x / dx)):
//   row r: dw_r * dx * sum_j q_j a_j  +  (q4_0: -8 dw_r, q4_1: m_r) * dx * sum_j a_j
// -- exactly the dequantized row against the rounded x, so rounding errors meet the weights
// themselves, not the unsigned quants (sum holds dx * sum_j a_j per block). The int32 sums of eight
// VPDPBUSD per token convert once per block.
template <DType T>
void dot_tile16_type(const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d,
                     const float* const* sum, float* out) {
    constexpr int NT = kTile16Tokens;
    __m512 acc[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, w += tile16_column_bytes(T)) {
        const __m512 dw = _mm512_loadu_ps(reinterpret_cast<const float*>(w));
        const __m512 offset = T == DType::q4_1 ? _mm512_loadu_ps(reinterpret_cast<const float*>(w + 64))
                                               : _mm512_mul_ps(dw, _mm512_set1_ps(-8.0f));
        __m512i ws[8];
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) ws[s] = _mm512_loadu_si512(w + tile16_quants_offset(T) + 64 * s);
        __m512i isum[NT];
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) isum[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
            const int at = s < 4 ? 4 * s : 16 + 4 * (s - 4);
#pragma GCC unroll 8
            for (int t = 0; t < NT; ++t) {
                int32_t xs;
                __builtin_memcpy(&xs, q[t] + 32 * i + at, 4);
                isum[t] = _mm512_dpbusd_epi32(isum[t], ws[s], _mm512_set1_epi32(xs));
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(dw, _mm512_set1_ps(d[t][i])), acc[t]);
            acc[t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[t][i]), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

// One block column of sixteen rows for dot_tile16 from their quants as bytes (rows[r][32]) and their
// scales and offsets: the quants go into the steps repack16_type lays out -- step st, int32 lane r
// holding row r's quants 4 st .. 4 st + 3: a transpose of 4-byte words, rows 4p .. 4p + 3 taken from
// one pair of registers into lanes 4p .. 4p + 3.
template <DType T>
void emit_column16(const uint8_t (*rows)[32], const float* scales, const float* offsets, const int32_t* level_sums,
                   uint8_t* out) {
    std::memcpy(out, scales, 64);
    std::memcpy(out + 64, offsets, 64);
    if constexpr (signed_tile(T)) std::memcpy(out + 128, level_sums, 128);
    __m512i first[4], second[4];
    for (int p = 0; p < 4; ++p) {
        first[p] = _mm512_loadu_si512(rows[4 * p]);        // rows 4p, 4p + 1
        second[p] = _mm512_loadu_si512(rows[4 * p + 2]);   // rows 4p + 2, 4p + 3
    }
    for (int st = 0; st < 8; ++st) {
        const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(24, 16, 8, 0, 24, 16, 8, 0, 24, 16, 8, 0, 24, 16, 8, 0),
                                             _mm512_set1_epi32(st));
        __m512i step = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p)
            step = _mm512_or_si512(step, _mm512_maskz_permutex2var_epi32(static_cast<__mmask16>(0xF << (4 * p)), first[p], idx,
                                                                         second[p]));
        _mm512_storeu_si512(out + tile16_quants_offset(T) + 64 * st, step);
    }
}

// q3_k / q6_k / iq4_nl / q8_0 sixteen rows against eight tokens: each half of a block column has its own scale, and
// the levels l are signed, so x enters as unsigned bytes a + 128 and the repack's -128 * sum of levels
// starts each sum: per half h (a the rounded x, dx its block scale)
//   row r: d sc_rh * dx * sum_j l_j a_j   -- the dequantized row against the rounded x
// (these types share the layout: tile16_quants_offset is the same for them)
void dot_tile16_signed(const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d, float* out) {
    constexpr int NT = kTile16Tokens;
    constexpr DType T = DType::q6_k;
    __m512 acc[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / 32; ++i, w += tile16_column_bytes(T)) {
        const __m512 scale[2] = {_mm512_loadu_ps(reinterpret_cast<const float*>(w)),
                                 _mm512_loadu_ps(reinterpret_cast<const float*>(w + 64))};
        const __m512i start[2] = {_mm512_loadu_si512(w + 128), _mm512_loadu_si512(w + 192)};
        __m512i ws[8];
#pragma GCC unroll 8
        for (int st = 0; st < 8; ++st) ws[st] = _mm512_loadu_si512(w + tile16_quants_offset(T) + 64 * st);
        // the tokens' bytes offset once per block column, so each VPDPBUSD's x is a broadcast load
        // (offsetting each 4 bytes in a general register cost a register-to-vector move per VPDPBUSD)
        alignas(32) uint8_t xu[NT][32];
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t)
            _mm256_store_si256(reinterpret_cast<__m256i*>(xu[t]),
                               _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[t] + 32 * i)),
                                                _mm256_set1_epi8(-128)));
        asm volatile("" ::: "memory");   // read xu back from memory: broadcast loads, not lane shuffles
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
            __m512i isum[2] = {start[0], start[1]};
#pragma GCC unroll 8
            for (int st = 0; st < 8; ++st) {
                int32_t xs;
                __builtin_memcpy(&xs, xu[t] + 4 * st, 4);
                isum[st / 4] = _mm512_dpbusd_epi32(isum[st / 4], _mm512_set1_epi32(xs), ws[st]);
            }
            const __m512 dx = _mm512_set1_ps(d[t][i]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[0]), _mm512_mul_ps(scale[0], dx), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[1]), _mm512_mul_ps(scale[1], dx), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

void dot_tile16(DType t, const uint8_t* w, int64_t n, const int8_t* const* q, const float* const* d,
                const float* const* sum, float* out) {
    switch (t) {
        case DType::q4_0: return dot_tile16_type<DType::q4_0>(w, n, q, d, sum, out);
        case DType::q3_k: case DType::q6_k: case DType::iq4_nl: case DType::q8_0: return dot_tile16_signed(w, n, q, d, out);
        default: return dot_tile16_type<DType::q4_1>(w, n, q, d, sum, out);   // q4_1, q5_*, q4_k, q5_k: scale and offset
    }
}

// Q8_0 rows against x rounded to int8 per 32-block (int8_decode: llama.cpp's q8_0 x q8_0). Two
// blocks per register: VPDPBUSD takes x offset to unsigned (a + 128), its lanes start from the row's
// -128 * (sum of the same four weights), so every int32 lane is an exact partial sum. Each (row,
// token)'s lanes then add up in int32 per block, and its float operations are
//   acc = fma(float(S_b), dw_b * dx_b, acc) for b = 0, 1, ... in order
// whatever the tile -- and what the strip kernels (dot_q8_0_strip_int8, on VNNI and AMX) run on
// their block sums, which decode reads at this level -- so batched decode rows equal one-token
// steps bit for bit.

// v[k] for P <= 16 (row, token) pairs, each [8 lanes of block b | 8 of block b + 1] -> even[k], odd[k]:
// the pairs' whole sums of block b and of b + 1 (lane k of two vectors). v is padded to a multiple
// of four with zeros.
template <int P>
inline void block_sums_of_pairs(__m512i* v, __m512i* even, __m512i* odd) {
    constexpr int P4 = (P + 3) / 4 * 4;
    for (int k = P; k < P4; ++k) v[k] = _mm512_setzero_si512();
    __m512i x[P4 / 2], y[4];
    // per 128-bit lane: pairs 2m and 2m + 1, two partial sums each
    for (int m = 0; m < P4 / 2; ++m)
        x[m] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * m], v[2 * m + 1]), _mm512_unpackhi_epi32(v[2 * m], v[2 * m + 1]));
    // ... pairs 4j..4j + 3, one sum each (lanes 0-1 of the register: block b, 2-3: block b + 1)
    for (int j = 0; j < P4 / 4; ++j)
        y[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(x[2 * j], x[2 * j + 1]), _mm512_unpackhi_epi64(x[2 * j], x[2 * j + 1]));
    for (int j = P4 / 4; j < 4; ++j) y[j] = _mm512_setzero_si512();
    // 128-bit lanes added: z0 = [b of 0-3, b+1 of 0-3, b of 4-7, b+1 of 4-7], z1 the same for 8-15
    const __m512i z0 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i z1 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
    *even = _mm512_shuffle_i32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0));
    *odd = _mm512_shuffle_i32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1));
}

template <int NR, int NT>
void dot_q8_0_int8_tile(const uint8_t* const* rows, const int8_t* const* a, const float* const* d, int64_t n,
                        float* out) {
    constexpr int64_t block = 34;   // fp16 scale + 32 quants
    constexpr int P = NR * NT;      // (row, token) pairs, lane r * NT + t
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    const int64_t nb = n / 32;
    for (int64_t b = 0; b < nb; b += 2) {
        const bool pair = b + 1 < nb;   // an odd last block fills the low half alone
        const __mmask64 x_mask = pair ? ~__mmask64{0} : __mmask64{0xFFFFFFFF};
        __m512i xu[NT];
        alignas(64) float scale_even[16] = {}, scale_odd[16] = {};
        for (int t = 0; t < NT; ++t) xu[t] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(x_mask, a[t] + 32 * b), offset);
        __m512i s[(P + 3) / 4 * 4];
        for (int r = 0; r < NR; ++r) {
            const uint8_t* blk = rows[r] + b * block;
            _mm_prefetch(reinterpret_cast<const char*>(blk) + kDecodePrefetchBytes, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(blk) + kDecodePrefetchBytes + 64, _MM_HINT_T0);
            const __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
            const __m256i w_hi = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + block + 2))
                                      : _mm256_setzero_si256();
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(w_lo), w_hi, 1);
            uint16_t h_lo, h_hi = 0;
            std::memcpy(&h_lo, blk, 2);
            if (pair) std::memcpy(&h_hi, blk + block, 2);
            const float dw_lo = half(h_lo), dw_hi = half(h_hi);
            const __m512i start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, w));
            for (int t = 0; t < NT; ++t) {
                s[r * NT + t] = _mm512_dpbusd_epi32(start, xu[t], w);
                scale_even[r * NT + t] = dw_lo * d[t][b];
                if (pair) scale_odd[r * NT + t] = dw_hi * d[t][b + 1];
            }
        }
        __m512i even, odd;
        block_sums_of_pairs<P>(s, &even, &odd);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(even), _mm512_load_ps(scale_even), acc);
        if (pair) acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(odd), _mm512_load_ps(scale_odd), acc);
    }
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc);
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r * NT + t] = lanes[r * NT + t];
}

void dot_q8_0_int8(const void* const* rows, int n_rows, const int8_t* const* a, const float* const* d, int nt, int64_t n,
                   float* out) {
    const auto* r = reinterpret_cast<const uint8_t* const*>(rows);
    with_count_to_4(n_rows, [&](auto rows_count) {
        with_count_to_4(nt, [&](auto count) {
            dot_q8_0_int8_tile<decltype(rows_count)::value, decltype(count)::value>(r, a, d, n, out);
        });
    });
}

}  // namespace

void avx512::add_int8_kernels(Kernels& k) {
    k.repack16 = repack16;
    k.repack16_rows = repack16_rows;
    k.dot_tile16 = dot_tile16;
    k.dot_q8_0_int8 = dot_q8_0_int8;
}

}  // namespace tmill::cpu
