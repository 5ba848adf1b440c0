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

#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/kernels_avx512_common.h"

namespace tmill::cpu {

namespace {

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

// Token t's block sum term of the exact product, x as prepare_x8's four parts of the block at x
// (x / d = a + b / 2^7 + c / 2^14 + e / 2^21): with P_ab = 2^7 sum_j q_j a_j + sum_j q_j b_j and P_ce
// likewise (exact in int32), fma(float(P_ce), 2^-14, float(P_ab)), as the eight-row kernel forms it
inline __m512 exact_block(const __m512i (&w)[2][4], const int8_t* x) {
    __m512i parts[4] = {};
    for (int nib = 0; nib < 2; ++nib)
        for (int g = 0; g < 4; ++g)
            for (int p = 0; p < 4; ++p)
                parts[p] = _mm512_dpbusd_epi32(parts[p], w[nib][g], avx512::broadcast4(x + 32 * p + 16 * nib + 4 * g));
    const __m512i ab = _mm512_add_epi32(_mm512_slli_epi32(parts[0], 7), parts[1]);
    const __m512i ce = _mm512_add_epi32(_mm512_slli_epi32(parts[2], 7), parts[3]);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(ce), _mm512_set1_ps(1.0f / 16384.0f), _mm512_cvtepi32_ps(ab));
}

// ... and of int8 decode's, x rounded to int8 (the block's 32 bytes at a): float(sum_j q_j a_j), the
// nibbles' halves in two chains added before they meet floats
inline __m512 int8_block(const __m512i (&w)[2][4], const int8_t* a) {
    __m512i half_sums[2] = {};
    for (int nib = 0; nib < 2; ++nib)
        for (int g = 0; g < 4; ++g)
            half_sums[nib] = _mm512_dpbusd_epi32(half_sums[nib], w[nib][g], avx512::broadcast4(a + 16 * nib + 4 * g));
    return _mm512_cvtepi32_ps(_mm512_add_epi32(half_sums[0], half_sums[1]));
}

// NT tokens against groups a and b, exact (x[t] as prepare_x8's output) or int8 decode's (x[t] the
// rounded x, sum[t] its block sums). Per block and token, the eight-row kernels' float operations:
//   acc_r = fma(block sum term, dw_r * d * s, acc_r)   (s: 2^-7 exact, 1 int8)
//   extra_r = fma(c_r, sum, extra_r), out_r = acc_r + extra_r
// Each block column's quants unpack once for all the tokens, which then go one at a time (four
// integer sums live, not 4 NT: those spilled at NT = 4).
template <DType T, int NT, bool Int8>
void packed16_tokens(const uint8_t* a, const uint8_t* b, const int8_t* const* x, const float* const* d,
                     const float* const* sum, int64_t n, float* out) {
    constexpr int64_t x_block_bytes = Int8 ? 32 : 128;
    constexpr float x_scale = Int8 ? 1.0f : 1.0f / 128.0f;
    __m512 acc[NT], extra[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[t] = extra[t] = _mm512_setzero_ps();
    SixteenRows<T> rows(a, b);
    for (int64_t i = 0; i < n / 32; ++i) {
        __m512 dw, offset;
        rows.column(i, &dw, &offset);
        __m512i w[2][4] = {};
        rows.nibbles(0, w[0]);
        rows.nibbles(1, w[1]);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
            const int8_t* xb = x[t] + x_block_bytes * i;
            const __m512 block = Int8 ? int8_block(w, xb) : exact_block(w, xb);
            acc[t] = _mm512_fmadd_ps(block, _mm512_mul_ps(dw, _mm512_set1_ps(d[t][i] * x_scale)), acc[t]);
            extra[t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sum[t][i]), extra[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) store_rows(acc[t], extra[t], out + 16 * t);
}

template <bool Int8>
void dot_packed16_tokens(DType type, const uint8_t* a, const uint8_t* b, const int8_t* const* x, const float* const* d,
                         const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(type, [&](auto t) {
        with_count_to_4(nt, [&](auto count) {
            packed16_tokens<decltype(t)::value, decltype(count)::value, Int8>(a, b, x, d, sum, n, out);
        });
    });
}

}  // namespace

void add_packed16_kernels(Kernels& k) {
    k.dot_packed16_tokens = dot_packed16_tokens<false>;
    k.dot_packed16_int8_tokens = dot_packed16_tokens<true>;
}

}  // namespace tmill::cpu
