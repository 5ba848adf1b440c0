// Decode of the 4- and 5-bit eight-row groups two at a time, AVX-512 VNNI (kernels.h:
// dot_packed16_tokens, exact, and dot_packed16_int8_tokens).
// The eight-row kernels (kernels_avx512_int.cpp) hold four rows of 16 quant bytes per register, so
// every row's products land in four lanes that must be summed across lanes per block: 14 shuffles
// and adds per token, block and group beside its 16 VPDPBUSD, which made each further token of a
// verification pass cost half a decode step. Here two groups' four registers are transposed in
// their 128-bit lanes once per block column (eight unpacks), after which every lane holds four
// quants of one row: one VPDPBUSD with four bytes of x broadcast adds four products to each of the
// sixteen rows, and rows need no horizontal sums (as in the Q8_0 strips).
// The block sums are the same exact integers whatever the lanes, and their float operations are the
// eight-row kernels', so every (row, token) value has their bits.
#include <immintrin.h>

#include <cstddef>
#include <cstring>

#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"

namespace tmill::cpu {

namespace {

inline __m512i broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// Lane 4k + p of the transposed registers holds row k + 4p of the sixteen (groups a then b); the
// same index vector puts the lanes back in row order.
inline __m512i sixteen_row_lanes() { return _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0); }

// In every 128-bit lane, the 4 x 4 transpose of the dwords of r[0..3]: afterwards r[g] holds dword g
// of each source register's lane.
inline void transpose_dwords(__m512i* r) {
    const __m512i t0 = _mm512_unpacklo_epi32(r[0], r[1]), t1 = _mm512_unpackhi_epi32(r[0], r[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(r[2], r[3]), t3 = _mm512_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm512_unpacklo_epi64(t0, t2);
    r[1] = _mm512_unpackhi_epi64(t0, t2);
    r[2] = _mm512_unpacklo_epi64(t1, t3);
    r[3] = _mm512_unpackhi_epi64(t1, t3);
}

// Block column i of groups a and b: the rows' scales and offsets in the lanes' row order, and the
// quants' low (nib 0: values 0-15 of each row) or high (nib 1: values 16-31) nibbles as bytes, q5
// with their fifth bits, transposed so that w[g] lane l holds values 4g..4g+3 of the nibble's half
// of lane l's row.
template <DType T>
class SixteenRows {
public:
    SixteenRows(const uint8_t* a, const uint8_t* b) : a_(a), b_(b), next_unit_(2 * (b - a)) {}

    void column(int64_t i, __m512* dw, __m512* offset) {
        __m256 dwa, offa, dwb, offb;
        qa_ = a_.at(i, &dwa, &offa);
        qb_ = b_.at(i, &dwb, &offb);
        // the same column of the next unit's groups (a weight's groups lie in row order): prefetched a
        // fixed distance ahead, each of the two streams ran into the other's data and left the next
        // unit's second group to the hardware
        for (const uint8_t* q : {qa_, qb_})
            for (int line = -1; line < 2; ++line)
                _mm_prefetch(reinterpret_cast<const char*>(q) + next_unit_ + 64 * line, _MM_HINT_T0);
        *dw = _mm512_permutexvar_ps(lanes_, _mm512_insertf32x8(_mm512_zextps256_ps512(dwa), dwb, 1));
        *offset = _mm512_permutexvar_ps(lanes_, _mm512_insertf32x8(_mm512_zextps256_ps512(offa), offb, 1));
    }

    void nibbles(int nib, __m512i* w) const {
        w[0] = half(qa_, 0, nib);
        w[1] = half(qa_, 1, nib);
        w[2] = half(qb_, 0, nib);
        w[3] = half(qb_, 1, nib);
        transpose_dwords(w);
    }

private:
    // rows 4h..4h+3 of the group column at q, one nibble of each byte
    static __m512i half(const uint8_t* q, int h, int nib) {
        const __m512i raw = _mm512_loadu_si512(q + 64 * h);
        __m512i v = _mm512_and_si512(nib == 0 ? raw : _mm512_srli_epi16(raw, 4), _mm512_set1_epi8(0x0F));
        if constexpr (five_bit(T))
            v = _mm512_mask_add_epi8(v, _cvtu64_mask64(fifth_bit_mask(q, h, nib)), v, _mm512_set1_epi8(16));
        return v;
    }

    GroupColumns<T> a_, b_;
    const std::ptrdiff_t next_unit_;
    const uint8_t *qa_ = nullptr, *qb_ = nullptr;
    const __m512i lanes_ = sixteen_row_lanes();
};

// out[16 t + r] = out_r + offsets, in row order
inline void store_rows(__m512 acc, __m512 extra, float* out) {
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(sixteen_row_lanes(), _mm512_add_ps(acc, extra)));
}

// NT tokens (x as prepare_x8's four parts, x / d = a + b / 2^7 + c / 2^14 + e / 2^21 per block)
// against groups a and b. Per block and token, with P_ab = 2^7 sum_j q_j a_j + sum_j q_j b_j and P_ce
// likewise (exact in int32), the eight-row kernel's float operations:
//   acc_r = fma(fma(float(P_ce), 2^-14, float(P_ab)), dw_r * (d * 2^-7), acc_r)
//   extra_r = fma(c_r, sum_j x_j, extra_r), out_r = acc_r + extra_r
template <DType T, int NT>
void packed16_tokens(const uint8_t* a, const uint8_t* b, const int8_t* const* q, const float* const* d,
                     const float* const* sum, int64_t n, float* out) {
    const __m512 low_pair = _mm512_set1_ps(1.0f / 16384.0f);
    __m512 acc[NT], extra[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[t] = extra[t] = _mm512_setzero_ps();
    SixteenRows<T> rows(a, b);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m512 dw, offset;
        rows.column(i, &dw, &offset);
        __m512i parts[NT][4] = {};
        for (int nib = 0; nib < 2; ++nib) {
            __m512i w[4] = {};
            rows.nibbles(nib, w);
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
                for (int t = 0; t < NT; ++t) {
                    const int8_t* x = q[t] + 128 * i + 16 * nib + 4 * g;
                    for (int p = 0; p < 4; ++p) parts[t][p] = _mm512_dpbusd_epi32(parts[t][p], w[g], broadcast4(x + 32 * p));
                }
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
            const __m512i ab = _mm512_add_epi32(_mm512_slli_epi32(parts[t][0], 7), parts[t][1]);
            const __m512i ce = _mm512_add_epi32(_mm512_slli_epi32(parts[t][2], 7), parts[t][3]);
            const __m512 pairs = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ce), low_pair, _mm512_cvtepi32_ps(ab));
            acc[t] = _mm512_fmadd_ps(pairs, _mm512_mul_ps(dw, _mm512_set1_ps(d[t][i] * (1.0f / 128.0f))), acc[t]);
            extra[t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[t][i]), extra[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) store_rows(acc[t], extra[t], out + 16 * t);
}

// int8 decode's product: x rounded to int8 (a[t], the first part alone; sum[t] the rounded x's block
// sums), per block and token the eight-row int8 kernel's operations:
//   acc_r = fma(float(sum_j q_j a_j), dw_r * d, acc_r), extra_r = fma(c_r, sum, extra_r)
template <DType T, int NT>
void packed16_int8_tokens(const uint8_t* a, const uint8_t* b, const int8_t* const* x, const float* const* d,
                          const float* const* sum, int64_t n, float* out) {
    __m512 acc[NT], extra[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[t] = extra[t] = _mm512_setzero_ps();
    SixteenRows<T> rows(a, b);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m512 dw, offset;
        rows.column(i, &dw, &offset);
        // two chains per token (the nibbles' halves), added before they meet floats
        __m512i half_sums[NT][2] = {};
        for (int nib = 0; nib < 2; ++nib) {
            __m512i w[4] = {};
            rows.nibbles(nib, w);
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
                for (int t = 0; t < NT; ++t)
                    half_sums[t][nib] = _mm512_dpbusd_epi32(half_sums[t][nib], w[g], broadcast4(x[t] + 32 * i + 16 * nib + 4 * g));
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
            const __m512 s = _mm512_cvtepi32_ps(_mm512_add_epi32(half_sums[t][0], half_sums[t][1]));
            acc[t] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, _mm512_set1_ps(d[t][i])), acc[t]);
            extra[t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[t][i]), extra[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) store_rows(acc[t], extra[t], out + 16 * t);
}

void dot_packed16_tokens(DType type, const uint8_t* a, const uint8_t* b, const int8_t* const* q, const float* const* d,
                         const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(type, [&](auto t) {
        with_count_to_4(nt, [&](auto count) {
            packed16_tokens<decltype(t)::value, decltype(count)::value>(a, b, q, d, sum, n, out);
        });
    });
}

void dot_packed16_int8_tokens(DType type, const uint8_t* a, const uint8_t* b, const int8_t* const* x,
                              const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(type, [&](auto t) {
        with_count_to_4(nt, [&](auto count) {
            packed16_int8_tokens<decltype(t)::value, decltype(count)::value>(a, b, x, d, sum, n, out);
        });
    });
}

}  // namespace

void add_packed16_kernels(Kernels& k) {
    k.dot_packed16_tokens = dot_packed16_tokens;
    k.dot_packed16_int8_tokens = dot_packed16_int8_tokens;
}

}  // namespace tmill::cpu
