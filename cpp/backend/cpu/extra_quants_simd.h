// Unpacking of the 5-bit legacy types and the K-quants (layouts in core/kquants.h), and the reading
// of eight-row group columns (kernels.h), with AVX2, for the AVX2 and AVX-512 kernel files alone
// (both are compiled with AVX2 enabled). Everything is in an anonymous namespace, so each of those
// files keeps its own copy, compiled with its own flags.
#pragma once

#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "backend/cpu/kernels.h"
#include "core/dtype.h"
#include "core/kquants.h"

namespace tmill::cpu {

namespace {

// The types unpacked here, and whether their values carry an offset (x = d q + m).
// the 32-block types unpacked here
constexpr bool is_block32(DType t) { return t == DType::q5_0 || t == DType::q5_1 || t == DType::iq4_nl; }
constexpr bool has_offset(DType t) { return t == DType::q4_1 || t == DType::q5_1 || t == DType::q4_k || t == DType::q5_k; }
// K-quants with a scale per half sub-block of 16: q2_k (and a min per half), q3_k and q6_k (signed
// scales and levels, no mins); q4_k / q5_k have one scale and one min per sub-block of 32
constexpr bool half_scales(DType t) { return t == DType::q2_k || t == DType::q3_k || t == DType::q6_k; }
constexpr bool block_mins(DType t) { return t == DType::q4_k || t == DType::q5_k; }
// a K-quant super-block's bytes
constexpr int64_t super_bytes(DType t) {
    return t == DType::q2_k ? 84 : t == DType::q3_k ? 110 : t == DType::q4_k ? 144 : t == DType::q5_k ? 176 : 210;
}

// Bytes of a row per 32 values (for prefetching ahead).
template <DType T>
constexpr size_t bytes_per_32() {
    switch (T) {
        case DType::q8_0: return 34;
        case DType::q4_0: return 18;
        case DType::q4_1: return 20;
        case DType::q5_0: return 22;
        case DType::q5_1: return 24;
        case DType::iq4_nl: return 18;
        default: return 32;
    }
}

// q5_0 / q5_1 / iq4_nl / q8_0 block i: x_j = d * q_j + m, q as signed bytes (q - 16 for q5_0, the
// codebook value for iq4_nl; m = 0 but for q5_1).
struct Quants32 {
    __m256i q;
    float d, m;
};

inline float half_at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i nibbles(__m256i bytes, bool high) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    return _mm256_and_si256(high ? _mm256_srli_epi16(bytes, 4) : bytes, mask);
}

// byte j = 0x10 where bit j of bits is set, else 0
inline __m256i fifth_bits(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

template <DType T>
inline Quants32 quants32(const uint8_t* row, int64_t i) {
    if constexpr (T == DType::q8_0) {
        const uint8_t* b = row + i * 34;
        return {load32(b + 2), half_at(b), 0.0f};
    }
    if constexpr (T == DType::iq4_nl) {
        const uint8_t* b = row + i * 18;
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
        const __m256i both = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
        const __m256i book = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIQ4NL)));
        return {_mm256_shuffle_epi8(book, both), half_at(b), 0.0f};
    }
    constexpr bool with_min = T == DType::q5_1;
    const uint8_t* b = row + i * (with_min ? 24 : 22);
    Quants32 u;
    u.d = half_at(b);
    u.m = with_min ? half_at(b + 2) : 0.0f;
    uint32_t qh;
    std::memcpy(&qh, b + kQ5QhOffset(with_min), 4);
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kQ5QhOffset(with_min) + 4));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);   // element j in byte j
    u.q = _mm256_or_si256(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), fifth_bits(qh));
    if constexpr (!with_min) u.q = _mm256_sub_epi8(u.q, _mm256_set1_epi8(16));
    return u;
}

// Super-block s of a K-quant row: its 256 quants as bytes, 32 per sub-block (q2_k / q4_k / q5_k
// unsigned, q6_k as q - 32, q3_k as levels -4..3), the integer scales (q4_k / q5_k: one unsigned 6-bit
// scale per sub-block of 32 in sc[0..7]; q2_k: an unsigned 4-bit one, q3_k / q6_k: a signed one per half
// sub-block of 16 in sc[0..15]), the mins (q4_k / q5_k: m[0..7] per sub-block; q2_k: m[0..15] per
// half), and the super-block's d and dmin: x = d * sc * q - dmin * m.
struct KSuper {
    __m256i q[8];
    alignas(16) int8_t sc[16];
    alignas(16) uint8_t m[16];
    float d, dmin;
};

// The eight 6-bit scales and mins of a q4_k / q5_k super-block from their 12 bytes, as 32-bit words
// (k4_scale_min for all j at once): scales 0-3 and mins 0-3 are the low six bits of bytes 0-3 and
// 4-7; scales and mins 4-7 take their low four bits from bytes 8-11 and their top two from the top
// two bits of bytes 0-3 and 4-7.
inline void k4_scales_mins(const uint8_t* s, uint8_t* sc, uint8_t* m) {
    uint32_t w[3];
    std::memcpy(w, s, 12);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
    const uint32_t out[4] = {w[0] & low6, (w[2] & low4) | (((w[0] >> 6) & top2) << 4), w[1] & low6,
                             ((w[2] >> 4) & low4) | (((w[1] >> 6) & top2) << 4)};
    std::memcpy(sc, out, 8);
    std::memcpy(m, out + 2, 8);
}

template <DType T>
inline void k_super(const uint8_t* row, int64_t s, KSuper& u) {
    if constexpr (T == DType::q4_k || T == DType::q5_k) {
        constexpr bool five = T == DType::q5_k;
        const uint8_t* b = row + s * (five ? 176 : 144);
        u.d = half_at(b);
        u.dmin = half_at(b + 2);
        k4_scales_mins(b + kK4Scales, reinterpret_cast<uint8_t*>(u.sc), u.m);
        const __m256i qh = five ? load32(b + kK5Qh) : _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
            const __m256i raw = load32(b + (five ? kK5Qs : kK4Qs) + 32 * c);
            u.q[2 * c] = nibbles(raw, false);
            u.q[2 * c + 1] = nibbles(raw, true);
        }
        if constexpr (five)
            for (int j = 0; j < 8; ++j) {
                const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << j));
                const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                u.q[j] = _mm256_or_si256(u.q[j], _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            }
    } else if constexpr (T == DType::q2_k) {   // sub-block j = 4 h + k of half h (layout in kquants.h)
        const uint8_t* b = row + s * 84;
        u.d = half_at(b + kK2D);
        u.dmin = half_at(b + kK2D + 2);
        for (int i = 0; i < 16; ++i) {
            u.sc[i] = static_cast<int8_t>(b[i] & 0x0F);
            u.m[i] = static_cast<uint8_t>(b[i] >> 4);
        }
        for (int j = 0; j < 8; ++j)
            u.q[j] = _mm256_and_si256(_mm256_srl_epi16(load32(b + kK2Qs + 32 * (j / 4)), _mm_cvtsi32_si128(2 * (j % 4))),
                                      _mm256_set1_epi8(3));
    } else if constexpr (T == DType::q3_k) {   // sub-block j = 4 h + k of half h (layout in kquants.h)
        const uint8_t* b = row + s * 110;
        u.d = half_at(b + kK3D);
        u.dmin = 0.0f;
        const uint8_t* sc = b + kK3Scales;
        for (int i = 0; i < 16; ++i) {
            const int low = (i < 8 ? sc[i] : sc[i - 8] >> 4) & 0x0F, high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
            u.sc[i] = static_cast<int8_t>((low | (high << 4)) - 32);
        }
        const __m256i hmask = load32(b);
        for (int j = 0; j < 8; ++j) {
            const int h = j / 4, k = j % 4;
            const __m256i low = _mm256_and_si256(_mm256_srl_epi16(load32(b + kK3Qs + 32 * h), _mm_cvtsi32_si128(2 * k)),
                                                 _mm256_set1_epi8(3));
            const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << j));
            const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(hmask, bit), bit);   // the level is low - 4 where clear
            u.q[j] = _mm256_sub_epi8(low, _mm256_andnot_si256(set, _mm256_set1_epi8(4)));
        }
    } else {   // q6_k: sub-block j = 4 h + k of half h
        const uint8_t* b = row + s * 210;
        u.d = half_at(b + kK6D);
        u.dmin = 0.0f;
        std::memcpy(u.sc, b + kK6Scales, 16);
        for (int j = 0; j < 8; ++j) {
            const int h = j / 4, k = j % 4;
            const __m256i low = nibbles(load32(b + 64 * h + 32 * (k % 2)), k >= 2);
            const __m256i high = _mm256_and_si256(_mm256_srl_epi16(load32(b + kK6Qh + 32 * h), _mm_cvtsi32_si128(2 * k)),
                                                  _mm256_set1_epi8(3));
            u.q[j] = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
        }
    }
}

// The integer scale and min of sub-block j's first and second half
template <DType T>
inline int k_scale(const KSuper& u, int j, int half) {
    if constexpr (half_scales(T)) return u.sc[2 * j + half];
    else return static_cast<uint8_t>(u.sc[j]);
}
template <DType T>
inline int k_min(const KSuper& u, int j, int half) {
    if constexpr (T == DType::q2_k) return u.m[2 * j + half];
    else if constexpr (block_mins(T)) return u.m[j];
    else return 0;
}

// 32 signed bytes times d[0] (elements 0..15) and d[1] (16..31), plus m[0] / m[1], as floats: the
// product rounded before the sum, exactly as the reference dequantization
template <bool Offset>
inline void put_floats(__m256i q, const float* d_half, const float* m_half, float* out) {
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; ++h) {
        const __m256 d = _mm256_set1_ps(d_half[h]);
        for (int g = 0; g < 2; ++g) {
            const __m128i bytes = g == 0 ? halves[h] : _mm_unpackhi_epi64(halves[h], halves[h]);
            __m256 v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
            if constexpr (Offset) v = _mm256_add_ps(v, _mm256_set1_ps(m_half[h]));
            _mm256_storeu_ps(out + 16 * h + 8 * g, v);
        }
    }
}

// n values of a row as floats, rounded exactly as the reference dequantization: d * q + m for q5_*,
// (d * sc) * q - dmin * m for the K-quants.
template <DType T>
inline void dequantize_extra(const uint8_t* row, float* out, int64_t n) {
    if constexpr (is_block32(T)) {
        for (int64_t i = 0; i < n / 32; ++i, out += 32) {
            const Quants32 u = quants32<T>(row, i);
            const float d[2] = {u.d, u.d}, m[2] = {u.m, u.m};
            put_floats<T == DType::q5_1>(u.q, d, m, out);
        }
    } else {
        KSuper u;
        for (int64_t s = 0; s < n / 256; ++s) {
            k_super<T>(row, s, u);
            for (int j = 0; j < 8; ++j, out += 32) {
                float d[2], m[2];
                for (int h = 0; h < 2; ++h) {
                    d[h] = u.d * static_cast<float>(k_scale<T>(u, j, h));
                    m[h] = -(u.dmin * static_cast<float>(k_min<T>(u, j, h)));
                }
                put_floats<T == DType::q2_k || block_mins(T)>(u.q[j], d, m, out);
            }
        }
    }
}

// One block column of sixteen rows for dot_tile16 from their quants as bytes (rows[r][32]), scales,
// offsets and (signed tiles) level sums: each level defines it with its own transpose.
template <DType T>
void emit_column16(const uint8_t (*rows)[32], const float* scales, const float* offsets, const int32_t* level_sums,
                   uint8_t* out);

// Sixteen rows in their file layout (q8_0, q5_0, q5_1, iq4_nl, the K-quants) -> block columns for dot_tile16: per
// block of 32, the rows' float scales and offsets (x = scale * q + offset, as the reference dequantizer
// rounds scale: d sc for the K-quants, d for q5_*; offsets -dmin m, -16 d for q5_0, m for q5_1; q6_k:
// the second half's scales and both halves' -128 * sum of levels), then the quants (q6_k: the signed
// levels q - 32). Rows n_rows .. 15 are zero.
template <DType T>
void repack16_rows_type(const uint8_t* rows, size_t row_stride, int n_rows, int64_t k0, int64_t kn, uint8_t* out) {
    constexpr bool k = !is_block32(T) && T != DType::q8_0;
    constexpr int64_t span = k ? 256 : 32, block = k ? super_bytes(T) : static_cast<int64_t>(bytes_per_32<T>());
    constexpr int per_span = k ? 8 : 1;
    alignas(64) uint8_t staged[per_span][16][32];   // block of the span, row, quant
    alignas(64) float scales[per_span][16], offsets[per_span][16];
    alignas(64) int32_t level_sums[per_span][2][16];   // q6_k: -128 * sum of each half's levels
    std::memset(staged, 0, sizeof staged);             // rows n_rows .. 15 stay zero
    std::memset(scales, 0, sizeof scales);
    std::memset(offsets, 0, sizeof offsets);
    std::memset(level_sums, 0, sizeof level_sums);
    for (int64_t s = k0 / span; s < (k0 + kn) / span; ++s) {
        for (int r = 0; r < n_rows; ++r) {
            const uint8_t* row = rows + static_cast<size_t>(r) * row_stride;
            if (s + 2 < (k0 + kn) / span)   // sixteen streams: too many for the hardware prefetcher to follow
                for (int64_t line = 0; line < block; line += 64)
                    _mm_prefetch(reinterpret_cast<const char*>(row) + (s + 2) * block + line, _MM_HINT_T0);
            if constexpr (T == DType::iq4_nl || T == DType::q8_0) {   // signed levels: the block's scale for both halves
                const Quants32 u = quants32<T>(row, s);
                _mm256_store_si256(reinterpret_cast<__m256i*>(staged[0][r]), u.q);
                scales[0][r] = offsets[0][r] = u.d;
                const __m256i sums = _mm256_sad_epu8(_mm256_xor_si256(u.q, _mm256_set1_epi8(-128)), _mm256_setzero_si256());
                for (int h = 0; h < 2; ++h)
                    level_sums[0][h][r] = -128 * (static_cast<int>(_mm256_extract_epi64(sums, 2 * h) +
                                                                   _mm256_extract_epi64(sums, 2 * h + 1)) - 128 * 16);
            } else if constexpr (!k) {
                const Quants32 u = quants32<T>(row, s);
                const __m256i q = T == DType::q5_0 ? _mm256_add_epi8(u.q, _mm256_set1_epi8(16)) : u.q;
                _mm256_store_si256(reinterpret_cast<__m256i*>(staged[0][r]), q);
                scales[0][r] = u.d;
                offsets[0][r] = T == DType::q5_0 ? -16.0f * u.d : u.m;
            } else {
                KSuper u;
                k_super<T>(row, s, u);
                for (int j = 0; j < 8; ++j) {
                    _mm256_store_si256(reinterpret_cast<__m256i*>(staged[j][r]), u.q[j]);
                    scales[j][r] = u.d * static_cast<float>(k_scale<T>(u, j, 0));
                    if constexpr (half_scales(T)) {   // q3_k / q6_k: sums of level + bias (unsigned) over 8 bytes, then per half
                        constexpr int bias = T == DType::q6_k ? 32 : 4;
                        offsets[j][r] = u.d * static_cast<float>(k_scale<T>(u, j, 1));
                        const __m256i sums = _mm256_sad_epu8(_mm256_add_epi8(u.q[j], _mm256_set1_epi8(bias)), _mm256_setzero_si256());
                        for (int h = 0; h < 2; ++h)
                            level_sums[j][h][r] = -128 * (static_cast<int>(_mm256_extract_epi64(sums, 2 * h) +
                                                                           _mm256_extract_epi64(sums, 2 * h + 1)) - bias * 16);
                    } else {
                        offsets[j][r] = -(u.dmin * static_cast<float>(u.m[j]));
                    }
                }
            }
        }
        for (int j = 0; j < per_span; ++j, out += tile16_column_bytes(T))
            emit_column16<T>(staged[j], scales[j], offsets[j], &level_sums[j][0][0], out);
    }
}

inline void repack16_rows(DType t, const uint8_t* rows, size_t row_stride, int n_rows, int64_t k0, int64_t kn, uint8_t* out) {
    switch (t) {
        case DType::q8_0: return repack16_rows_type<DType::q8_0>(rows, row_stride, n_rows, k0, kn, out);
        case DType::q5_0: return repack16_rows_type<DType::q5_0>(rows, row_stride, n_rows, k0, kn, out);
        case DType::q5_1: return repack16_rows_type<DType::q5_1>(rows, row_stride, n_rows, k0, kn, out);
        case DType::iq4_nl: return repack16_rows_type<DType::iq4_nl>(rows, row_stride, n_rows, k0, kn, out);
        case DType::q4_k: return repack16_rows_type<DType::q4_k>(rows, row_stride, n_rows, k0, kn, out);
        case DType::q5_k: return repack16_rows_type<DType::q5_k>(rows, row_stride, n_rows, k0, kn, out);
        case DType::q3_k: return repack16_rows_type<DType::q3_k>(rows, row_stride, n_rows, k0, kn, out);
        default: return repack16_rows_type<DType::q6_k>(rows, row_stride, n_rows, k0, kn, out);   // callers check repackable16
    }
}

// fn(std::integral_constant<DType, T>{}) for the eight-row type t (callers check packable8 first): the
// one list of the types every packed kernel is instantiated for.
template <typename Fn>
inline void with_packed_type(DType t, Fn&& fn) {
    switch (t) {
        case DType::q4_1: return fn(std::integral_constant<DType, DType::q4_1>{});
        case DType::q4_k: return fn(std::integral_constant<DType, DType::q4_k>{});
        case DType::q5_0: return fn(std::integral_constant<DType, DType::q5_0>{});
        case DType::q5_1: return fn(std::integral_constant<DType, DType::q5_1>{});
        default: return fn(std::integral_constant<DType, DType::q4_0>{});
    }
}

// Block columns of an eight-row group (pack_rows8), in order i = 0, 1, ...: where column i's quants
// are, the rows' weight scales dw and their offsets per unit of x (q4_0: -8 dw, q5_0: -16 dw, q4_1 /
// q5_1: m, q4_k: d sc_j and -dmin m_j, rounded as the reference dequantizer rounds them: x = dw * q +
// offset, q unsigned). A q4_k super-block's scales and mins unpack once, at its first column, for the
// eight rows at once.
template <DType T>
class GroupColumns {
public:
    explicit GroupColumns(const uint8_t* group) : group_(group) {}

    const uint8_t* at(int64_t i, __m256* dw, __m256* offset) {
        if constexpr (T == DType::q4_k) {
            const int j = static_cast<int>(i % 8);
            if (j == 0) load_super(group_ + (i / 8) * kK4GroupSuper);
            const __m128i shift = _mm_cvtsi32_si128(8 * (j % 4));
            const __m256i sc = _mm256_and_si256(_mm256_srl_epi32(scales_[j / 4], shift), _mm256_set1_epi32(0xFF));
            const __m256i m = _mm256_and_si256(_mm256_srl_epi32(mins_[j / 4], shift), _mm256_set1_epi32(0xFF));
            *dw = _mm256_mul_ps(d_, _mm256_cvtepi32_ps(sc));
            *offset = _mm256_mul_ps(neg_dmin_, _mm256_cvtepi32_ps(m));
        } else {
            const uint8_t* c = group_ + i * packed8_column_bytes(T);
            *dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
            *offset = packed8_minimums(T)
                          ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)))
                          : _mm256_mul_ps(*dw, _mm256_set1_ps(T == DType::q5_0 ? -16.0f : -8.0f));
        }
        return group_ + packed8_quants_at(T, i);
    }

private:
    // k4_scales_mins for eight rows: scales and mins 0-3 in the bytes of scales_[0] / mins_[0],
    // 4-7 in scales_[1] / mins_[1], one 32-bit lane per row
    void load_super(const uint8_t* h) {
        d_ = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
        neg_dmin_ = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 16))));
        const __m256i w0 = load32(h + 32), w1 = load32(h + 64), w2 = load32(h + 96);
        const __m256i low6 = _mm256_set1_epi32(0x3f3f3f3f), low4 = _mm256_set1_epi32(0x0f0f0f0f),
                      top2 = _mm256_set1_epi32(0x03030303);
        scales_[0] = _mm256_and_si256(w0, low6);
        mins_[0] = _mm256_and_si256(w1, low6);
        scales_[1] = _mm256_or_si256(_mm256_and_si256(w2, low4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w0, 6), top2), 4));
        mins_[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w2, 4), low4),
                                   _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w1, 6), top2), 4));
    }

    const uint8_t* group_;
    __m256 d_ = _mm256_setzero_ps(), neg_dmin_ = _mm256_setzero_ps();
    __m256i scales_[2] = {}, mins_[2] = {};
};

// A q5_* group column's fifth bits (its quants at c): the mask of rows 4h..4h+3, nibble nib (bit
// 16 (r % 4) + l: value l, or 16 + l, of row r) ...
inline uint64_t fifth_bit_mask(const uint8_t* c, int h, int nib) {
    uint64_t m;
    std::memcpy(&m, c - 32 + 16 * h + 8 * nib, 8);
    return m;
}
#if defined(__AVX512BW__)
// (AVX-512 files) the fifth bits (16) of the four rows in register h of a group column (quants at c),
// added to both nibbles
inline void add_fifth_bits(const uint8_t* c, int h, __m512i& lo, __m512i& hi) {
    const __m512i sixteen = _mm512_set1_epi8(16);
    lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(fifth_bit_mask(c, h, 0)), lo, sixteen);
    hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(fifth_bit_mask(c, h, 1)), hi, sixteen);
}
#endif
// ... and row r's 32 of them, as its block's qh
inline uint32_t fifth_bits_of_row(const uint8_t* c, int r) {
    const int shift = 16 * (r % 4);
    return static_cast<uint32_t>((fifth_bit_mask(c, r / 4, 0) >> shift) & 0xFFFF) |
           static_cast<uint32_t>((fifth_bit_mask(c, r / 4, 1) >> shift) & 0xFFFF) << 16;
}

// Row r of a q5_* group column as its 32 quants in value order (q5_0: q - 16, as quants32 gives them).
template <DType T>
inline __m256i five_bit_row(const uint8_t* c, int r) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * r));
    const __m256i both = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    const __m256i q = _mm256_or_si256(both, fifth_bits(fifth_bits_of_row(c, r)));
    return T == DType::q5_0 ? _mm256_sub_epi8(q, _mm256_set1_epi8(16)) : q;
}

// A q5_* group's rows as floats, rounded as dequantize_row rounds them (d q for q5_0, d q + m for q5_1).
template <DType T>
void dequantize_packed8_five(const uint8_t* group, int64_t n, float* out, int64_t out_stride) {
    alignas(32) float d[8], m[8];
    GroupColumns<T> columns(group);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m256 dw, offset;
        const uint8_t* c = columns.at(i, &dw, &offset);
        _mm256_store_ps(d, dw);
        _mm256_store_ps(m, offset);
        for (int r = 0; r < 8; ++r) {
            const float dd[2] = {d[r], d[r]}, mm[2] = {m[r], m[r]};
            put_floats<T == DType::q5_1>(five_bit_row<T>(c, r), dd, mm, out + r * out_stride + 32 * i);
        }
    }
}

}  // namespace

}  // namespace tmill::cpu
