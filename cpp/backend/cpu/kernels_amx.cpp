// AMX kernels (Intel's tile unit, Sapphire Rapids on): decode rows, many tokens at a time -- the
// eight-row types and the Q8_0 strips, exact (four int8 parts of x) and with int8 decode.
// Each (row, token) gets the exact int32 block sums the VNNI kernels add up and the same float
// operations on them, so its bits are those of a one-token step. This file alone is compiled with
// AMX-TILE and AMX-INT8 (besides the AVX-512 level's flags), and its kernels join the AVX-512 table
// only after amx_int8_usable().
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/cpu/extra_quants_simd.h"
#include "backend/cpu/kernels.h"

namespace tmill::cpu {

namespace {

// Whether this process may use AMX-TILE and AMX-INT8: cpuid says the CPU has them, the OS saves
// their state (XCR0 bits 17 and 18), and Linux grants the tile data permission (arch_prctl
// ARCH_REQ_XCOMP_PERM). TOKENMILL_AMX=0 turns the kernels off.
bool amx_int8_usable() {
    const char* env = std::getenv("TOKENMILL_AMX");
    if (env && std::string(env) == "0") return false;
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;   // OSXSAVE
    uint32_t xcr0_lo, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
    return false;
#endif
}

// LDTILECFG's operand: palette 1, then per tile its bytes per row and its rows
struct TileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// (the shapes a thread's tiles hold now, 256 / 512 + nt as configure_token_rows sets them)
thread_local int configured_tiles = 0;

// The tile shapes for nt tokens, tokens as the rows of A and C: C tiles 0-3 [nt tokens, 16 int32],
// the weights as B [8 value groups, 16 rows x 4 bytes] in tile 4 (and 6 if two_b), the tokens' x as
// A [nt tokens, 32 bytes] in the others: the exact kernel's four parts want three A tiles, int8
// decode's rounds of four blocks two B and two A tiles. Loaded once per thread and shapes: a thread
// keeps its tiles configured between calls (LDTILECFG costs about as much as a block's products).
inline void configure_token_rows(int nt, bool two_b) {
    const int shapes = (two_b ? 512 : 256) + nt;
    if (configured_tiles == shapes) return;
    TileConfig config;
    for (int c = 0; c < 4; ++c) config.rows[c] = static_cast<uint8_t>(nt), config.colsb[c] = 64;
    for (int t = 4; t < 8; ++t) {
        const bool b = t == 4 || (two_b && t == 6);
        config.rows[t] = b ? 8 : static_cast<uint8_t>(nt);
        config.colsb[t] = b ? 64 : 32;
    }
    _tile_loadconfig(&config);
    configured_tiles = shapes;
}

// out[16 t + r] = acc[t][r] + extra[t][r] (sixteen rows per register, one register per token), the
// offsets' terms from a second pass over the columns' scales (sixteen more accumulators would not fit
// in registers beside acc's): extra = fma(c_r, sum[t][i], extra) per block i, c_r the row's offset
// (q4_0: -8 dw_r, q4_1: m_r) -- the VNNI kernels' operations
template <DType T>
void store_rows_with_offsets(const __m512* acc, const uint8_t* group_a, const uint8_t* group_b, const float* const* sum,
                             int nt, int64_t nb, float* out) {
    __m512 extra[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) extra[t] = _mm512_setzero_ps();
    GroupColumns<T> off_a(group_a), off_b(group_b ? group_b : group_a);
    for (int64_t i = 0; i < nb; ++i) {
        __m256 dw8, off8_a, off8_b = _mm256_setzero_ps();
        off_a.at(i, &dw8, &off8_a);
        if (group_b) off_b.at(i, &dw8, &off8_b);
        const __m512 off = _mm512_insertf32x8(_mm512_castps256_ps512(off8_a), off8_b, 1);
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
            if (t >= nt) break;
            extra[t] = _mm512_fmadd_ps(off, _mm512_set1_ps(sum[t][i]), extra[t]);
        }
    }
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
        if (t >= nt) break;
        _mm512_storeu_ps(out + 16 * t, _mm512_add_ps(acc[t], extra[t]));
    }
}

// One block column of the exact products: the weights' B tile (w, 64 bytes per row) against the
// tokens' four int8 parts of x (part p of token t at x + t q_stride + 32 p) into C tiles 0-3, stored
// as sums[p][16 t + r] -- each (token, row)'s exact int32 sum of the block's products with part p.
// (Tile numbers are immediates: inlined into each kernel.)
__attribute__((always_inline)) inline void four_part_sums(const uint8_t* w, const int8_t* x, int64_t q_stride,
                                                           int32_t (*sums)[16 * 16]) {
    _tile_loadd(4, w, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(5, x, q_stride);
    _tile_loadd(6, x + 32, q_stride);
    _tile_loadd(7, x + 64, q_stride);
    _tile_dpbsud(0, 5, 4);
    _tile_dpbsud(1, 6, 4);
    _tile_dpbsud(2, 7, 4);
    _tile_loadd(5, x + 96, q_stride);
    _tile_dpbsud(3, 5, 4);
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
}

// Block column i's B tile and its sixteen scales in lay_out_packed16's output
inline const uint8_t* laid_tile(const uint8_t* laid, int64_t i) { return laid + i * kAmxLaidColumnBytes; }
inline const float* laid_scales(const uint8_t* laid, int64_t i) {
    return reinterpret_cast<const float*>(laid + i * kAmxLaidColumnBytes + 8 * 64);
}

// Block column i of two groups (b: the rows 8-15, or zero) as the B tile of the turned-round
// products: row j (values 4j..4j+3 of the block) holds each of the 16 rows' four quant bytes, and
// the rows' scales go to dw[0..15]. In an unpacked register half h, int32 lane 4 (r % 4) + j holds
// values 4j..4j+3 of row 4h + r % 4 (low nibbles: values 0-15, high: 16-31).
template <DType T>
inline void column_as_b_tile(GroupColumns<T>& col_a, GroupColumns<T>* col_b, int64_t i, float* dw, uint8_t* dst) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i nib[2][2][2];   // [group][h][low / high nibbles]
    for (int g = 0; g < 2; ++g) {
        if (g == 1 && !col_b) {
            for (auto& half : nib[1])
                for (auto& v : half) v = _mm512_setzero_si512();
            _mm256_store_ps(dw + 8, _mm256_setzero_ps());
            break;
        }
        GroupColumns<T>& col = g == 0 ? col_a : *col_b;
        __m256 dw8, offset;
        const uint8_t* c = col.at(i, &dw8, &offset);
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c) + kDecodePrefetchBytes + 64, _MM_HINT_T0);
        _mm256_store_ps(dw + 8 * g, dw8);
        for (int h = 0; h < 2; ++h) {
            const __m512i w = _mm512_loadu_si512(c + 64 * h);
            __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
            if constexpr (five_bit(T)) add_fifth_bits(c, h, lo, hi);
            nib[g][h][0] = lo;
            nib[g][h][1] = hi;
        }
    }
    for (int j = 0; j < 8; ++j) {
        // lanes 0-7 of a permutation of (half 0, half 1): rows 0-3 from half 0, 4-7 from half 1
        const int k = j % 4, which = j / 4;
        const __m512i idx = _mm512_setr_epi32(k, 4 + k, 8 + k, 12 + k, 16 + k, 20 + k, 24 + k, 28 + k, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i a = _mm512_permutex2var_epi32(nib[0][0][which], idx, nib[0][1][which]);
        const __m512i b = _mm512_permutex2var_epi32(nib[1][0][which], idx, nib[1][1][which]);
        _mm512_store_si512(dst + 64 * j, _mm512_inserti64x4(a, _mm512_castsi512_si256(b), 1));
    }
}

// The exact product (dot_packed8's) on the tile unit, tokens as rows: per block, the weights' B tile
// against each of prepare_x8's four parts (A tiles read straight from the tokens' prepared x, one
// token per row) into C tiles 0-3, so (token, row) gets the block's exact int32 sums S_a, S_b, S_c,
// S_e; the vector units then run dot_packed8_tokens_type's float operations on them, sixteen rows
// per register as there:
//   acc = fma(fma(float(S_c 2^7 + S_e), 2^-14, float(S_a 2^7 + S_b)), dw_r * (dx 2^-7), acc),
//   extra = fma(c_r, sum_j x_j, extra), out = acc + extra.
// Tile stores grow with the tokens (nt rows each) rather than costing sixteen rows whatever their
// number. Software-pipelined: while the tile unit multiplies block i, the vector units lay out block
// i + 1's weights and scale block i - 1's sums.
template <DType T>
void dot_packed8_amx_type(const uint8_t* group_a, const uint8_t* group_b, const uint8_t* laid, const int8_t* q,
                          int64_t q_stride, const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    configure_token_rows(nt, false);
    alignas(64) uint8_t weights[2][8 * 64];
    alignas(64) int32_t sums[2][4][16 * 16];
    alignas(64) float dw[3][16];   // blocks i - 1 (being scaled), i and i + 1 (laid out)
    __m512 acc[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    GroupColumns<T> col_a(group_a), col_b(group_b ? group_b : group_a);
    auto lay_out = [&](int64_t i) {
        if (laid) _mm512_store_ps(dw[i % 3], _mm512_load_ps(laid_scales(laid, i)));
        else column_as_b_tile(col_a, group_b ? &col_b : nullptr, i, dw[i % 3], weights[i & 1]);
    };
    const __m512 low_pair = _mm512_set1_ps(1.0f / 16384.0f);
    const int64_t nb = n / 32;
    lay_out(0);
    for (int64_t i = 0; i <= nb; ++i) {
        if (i < nb) {
            const int k = static_cast<int>(i & 1);
            four_part_sums(laid ? laid_tile(laid, i) : weights[k], q + 128 * i, q_stride, sums[k]);
            if (i + 1 < nb) lay_out(i + 1);
        }
        if (i == 0) continue;
        const int k = static_cast<int>((i - 1) & 1);
        const __m512 dwv = _mm512_load_ps(dw[(i - 1) % 3]);
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
            if (t >= nt) break;
            auto pair = [&](int p) {   // S_p 2^7 + S_p+1
                return _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[k][p] + 16 * t), 7),
                                        _mm512_load_si512(sums[k][p + 1] + 16 * t));
            };
            const __m512 sp = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair(2)), low_pair, _mm512_cvtepi32_ps(pair(0)));
            acc[t] = _mm512_fmadd_ps(sp, _mm512_mul_ps(dwv, _mm512_set1_ps(d[t][i - 1] * (1.0f / 128.0f))), acc[t]);
        }
    }
    store_rows_with_offsets<T>(acc, group_a, group_b, sum, nt, nb, out);
}

void dot_packed8_amx(DType t, const uint8_t* a, const uint8_t* b, const uint8_t* laid, const int8_t* q, int64_t q_stride,
                     const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) {
        dot_packed8_amx_type<decltype(type)::value>(a, b, laid, q, q_stride, d, sum, nt, n, out);
    });
}

void lay_out_packed16(DType t, const uint8_t* a, const uint8_t* b, int64_t n, uint8_t* dst) {
    with_packed_type(t, [&](auto type) {
        GroupColumns<decltype(type)::value> col_a(a), col_b(b ? b : a);
        for (int64_t i = 0; i < n / 32; ++i)
            column_as_b_tile(col_a, b ? &col_b : nullptr, i, const_cast<float*>(laid_scales(dst, i)),
                             const_cast<uint8_t*>(laid_tile(dst, i)));
    });
}

// int8 decode's products on the tile unit, tokens as rows (as dot_packed8_amx_type): per block, the
// weights' B tile (lay_out(i, dw, buffer) gives block i's -- laid out in the buffer, or where it
// lies -- and writes the 16 rows' scales) against the tokens' rounded x (A, read in place: token t's
// at x + t * x_stride) gives each (token, row) the block's exact int32 sum S -- TDPBSUD, the quants
// unsigned; a Q8_0 strip's carry an offset of 128, taken off as 128 x_sums[t][i] -- and the vector units run the VNNI kernels' operations on it, sixteen rows per
// register:
//   acc[t] = fma(float(S), dw * dx_t, acc[t]) block after block.
// Four blocks per round (C tiles 0-3; B tiles 4 and 6, A tiles 5 and 7 in turn): their weights are
// laid out first, then the four products run and are stored together, so the tile latencies are paid
// once per round.
constexpr int kAmxRound = 4;

template <typename LayOut>
void int8_amx_blocks(LayOut lay_out, const int8_t* x, int64_t x_stride, const float* const* d,
                     const int32_t* const* x_sums, int nt, int64_t nb, __m512* acc) {
    configure_token_rows(nt, true);
    alignas(64) uint8_t buffers[kAmxRound][8 * 64];
    const uint8_t* weights[kAmxRound];
    alignas(64) int32_t sums[kAmxRound][16 * 16];
    alignas(64) float dw[kAmxRound][16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < nb; i0 += kAmxRound) {
        const int count = static_cast<int>(std::min<int64_t>(kAmxRound, nb - i0));
        for (int k = 0; k < count; ++k) weights[k] = lay_out(i0 + k, dw[k], buffers[k]);
        // block k of the round into C tile k (tile numbers are immediates, hence macros)
#define TMILL_AMX_PRODUCT(k, b, a)                                   \
    if (count > k) {                                                 \
        _tile_zero(k);                                               \
        _tile_loadd(b, weights[k], 64);                              \
        _tile_loadd(a, x + 32 * (i0 + k), x_stride);                 \
        _tile_dpbsud(k, a, b);                                       \
    }
#define TMILL_AMX_STORE(k) \
    if (count > k) _tile_stored(k, sums[k], 64);
        TMILL_AMX_PRODUCT(0, 4, 5)
        TMILL_AMX_PRODUCT(1, 6, 7)
        TMILL_AMX_PRODUCT(2, 4, 5)
        TMILL_AMX_PRODUCT(3, 6, 7)
        TMILL_AMX_STORE(0)
        TMILL_AMX_STORE(1)
        TMILL_AMX_STORE(2)
        TMILL_AMX_STORE(3)
#undef TMILL_AMX_PRODUCT
#undef TMILL_AMX_STORE
        for (int k = 0; k < count; ++k) {
            const __m512 dwv = _mm512_load_ps(dw[k]);
#pragma GCC unroll 16
            for (int t = 0; t < 16; ++t) {
                if (t >= nt) break;
                __m512i sum = _mm512_load_si512(sums[k] + 16 * t);
                if (x_sums) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(x_sums[t][i0 + k] * 128));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dwv, _mm512_set1_ps(d[t][i0 + k])), acc[t]);
            }
        }
    }
}

// ... two groups of a packed type (unsigned quants), plus the offsets' terms
template <DType T>
void dot_packed8_int8_amx_type(const uint8_t* group_a, const uint8_t* group_b, const uint8_t* laid, const int8_t* x,
                               int64_t x_stride, const float* const* d, const float* const* sum, int nt, int64_t n,
                               float* out) {
    GroupColumns<T> col_a(group_a), col_b(group_b ? group_b : group_a);
    auto lay_out = [&](int64_t i, float* dw, uint8_t* buffer) -> const uint8_t* {
        if (laid) {
            _mm512_store_ps(dw, _mm512_load_ps(laid_scales(laid, i)));
            return laid_tile(laid, i);
        }
        column_as_b_tile(col_a, group_b ? &col_b : nullptr, i, dw, buffer);
        return buffer;
    };
    __m512 acc[16];
    int8_amx_blocks(lay_out, x, x_stride, d, nullptr, nt, n / 32, acc);
    store_rows_with_offsets<T>(acc, group_a, group_b, sum, nt, n / 32, out);
}

void dot_packed8_int8_amx(DType t, const uint8_t* a, const uint8_t* b, const uint8_t* laid, const int8_t* x,
                          int64_t x_stride, const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) {
        dot_packed8_int8_amx_type<decltype(type)::value>(a, b, laid, x, x_stride, d, sum, nt, n, out);
    });
}

// A Q8_0 strip's block column i is a B tile as it lies (kernels.h: [group][row][4] bytes); its
// scales go to dw[0..15]
inline const uint8_t* strip_column(const uint8_t* strip, int64_t nb, int64_t i, float* dw) {
    const uint8_t* col = strip + i * kQ8_0StripQuantBytes;
    for (int line = 0; line < 8; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(col) + 64 * line + kDecodePrefetchBytes, _MM_HINT_T0);
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(strip + nb * kQ8_0StripQuantBytes) + 16 * i;
    _mm512_store_ps(dw, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales))));
    return col;
}

// int8 decode's product of a Q8_0 strip: the bits dot_q8_0_strip_int8 gives
void dot_q8_0_strip_int8_amx(const uint8_t* strip, const int8_t* x, int64_t x_stride, const float* const* d,
                             const int32_t* const* s, int nt, int64_t n, float* out) {
    const int64_t nb = n / 32;
    auto lay_out = [&](int64_t i, float* dw, uint8_t*) { return strip_column(strip, nb, i, dw); };
    __m512 acc[16];
    int8_amx_blocks(lay_out, x, x_stride, d, s, nt, nb, acc);
    for (int t = 0; t < nt; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

// The exact product of a Q8_0 strip (dot_q8_0_strip's bits): per block, the column (B, in place)
// against prepare_x8's four parts (A tiles, one token per row) into C tiles 0-3, the parts' sums
// S_a..S_e of u = w + 128; the vector units then run dot_q8_0_strip's operations on them:
//   P_ab = 2^7 S_a + S_b - 2^7 s_ab, P_ce likewise,
//   acc = fma(dw_r * (d 2^-7), fma(float(P_ce), 2^-14, float(P_ab)), acc).
// Software-pipelined as dot_packed8_amx_type: block i - 1's sums are scaled while block i multiplies.
void dot_q8_0_strip_amx(const uint8_t* strip, const int8_t* q, int64_t q_stride, const float* const* d,
                        const int32_t* const* s, int nt, int64_t n, float* out) {
    configure_token_rows(nt, false);
    alignas(64) int32_t sums[2][4][16 * 16];
    alignas(64) float dw[2][16];
    __m512 acc[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    const __m512 low_pair = _mm512_set1_ps(1.0f / 16384.0f);
    const int64_t nb = n / 32;
    for (int64_t i = 0; i <= nb; ++i) {
        if (i < nb) {
            const int k = static_cast<int>(i & 1);
            four_part_sums(strip_column(strip, nb, i, dw[k]), q + 128 * i, q_stride, sums[k]);
        }
        if (i == 0) continue;
        const int64_t b = i - 1;
        const int k = static_cast<int>(b & 1);
        const __m512 dwv = _mm512_load_ps(dw[k]);
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
            if (t >= nt) break;
            auto pair = [&](int p, int32_t x_sum) {   // 2^7 S_p + S_p+1 - 2^7 x_sum
                return _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[k][p] + 16 * t), 7),
                                                         _mm512_load_si512(sums[k][p + 1] + 16 * t)),
                                        _mm512_set1_epi32(x_sum * 128));
            };
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair(2, s[t][2 * b + 1])), low_pair,
                                             _mm512_cvtepi32_ps(pair(0, s[t][2 * b])));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dwv, _mm512_set1_ps(d[t][b] * (1.0f / 128.0f))), f, acc[t]);
        }
    }
    for (int t = 0; t < nt; ++t) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

}  // namespace

void add_amx_kernels(Kernels& k) {
    if (!amx_int8_usable()) return;
    k.dot_packed8_int8_amx = dot_packed8_int8_amx;
    k.dot_packed8_amx = dot_packed8_amx;
    k.lay_out_packed16 = lay_out_packed16;
    k.dot_q8_0_strip_int8_amx = dot_q8_0_strip_int8_amx;
    k.dot_q8_0_strip_amx = dot_q8_0_strip_amx;
}

}  // namespace tmill::cpu
