// AMX kernels (Intel's tile unit, Sapphire Rapids on): decode rows, many tokens at a time -- the
// eight-row types exact (four int8 parts of x) and with int8 decode, and int8 decode's Q8_0 rows.
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

void amx_x_tiles(const int8_t* const* a, const float* const* d, const float* const* sum, int nt, int64_t n,
                 int8_t* tiles, float* dx, float* sx) {
    for (int64_t i = 0; i < n / 32; ++i) {
        int32_t* tile = reinterpret_cast<int32_t*>(tiles + 512 * i);
        for (int j = 0; j < 8; ++j)
            for (int t = 0; t < nt; ++t) std::memcpy(tile + 16 * j + t, a[t] + 32 * i + 4 * j, 4);
        for (int t = 0; t < kAmxTokens; ++t) {
            dx[16 * i + t] = t < nt ? d[t][i] : 0.0f;
            sx[16 * i + t] = t < nt ? sum[t][i] : 0.0f;
        }
    }
}

// The tile shapes of the Q8_0 kernel for nt tokens, weights as the rows of A and C: C tiles 0-3 [16
// rows, nt int32], A tiles 4-5 [16 rows, 32 bytes], B tiles 6-7 (the tokens' values) [8 groups of
// four, 4 nt bytes]. Loaded once per thread and shapes: a thread keeps its tiles configured between
// calls (LDTILECFG costs about as much as a block's products). configured_tiles: the shapes a
// thread's tiles hold now, nt here, 256 / 512 + nt for configure_token_rows.
thread_local int configured_tiles = 0;

inline void configure_tiles(int nt) {
    if (configured_tiles == nt) return;
    TileConfig config;
    for (int c = 0; c < 4; ++c) config.rows[c] = 16, config.colsb[c] = static_cast<uint16_t>(4 * nt);
    for (int a = 4; a < 6; ++a) config.rows[a] = 16, config.colsb[a] = 32;
    for (int b = 6; b < 8; ++b) config.rows[b] = 8, config.colsb[b] = static_cast<uint16_t>(4 * nt);
    _tile_loadconfig(&config);
    configured_tiles = nt;
}

// ... and with the roles turned round, tokens as the rows of A and C: C tiles 0-3 [nt tokens, 16
// int32], the weights as B [8 value groups, 16 rows x 4 bytes] in tile 4 (and 6 if two_b), the
// tokens' x as A [nt tokens, 32 bytes] in the others: the exact kernel's four parts want three A
// tiles, int8 decode's rounds of four blocks two B and two A tiles.
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
void dot_packed8_amx_type(const uint8_t* group_a, const uint8_t* group_b, const int8_t* q, int64_t q_stride,
                          const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    configure_token_rows(nt, false);
    alignas(64) uint8_t weights[2][8 * 64];
    alignas(64) int32_t sums[2][4][16 * 16];
    alignas(64) float dw[3][16];   // blocks i - 1 (being scaled), i and i + 1 (laid out)
    __m512 acc[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    GroupColumns<T> col_a(group_a), col_b(group_b ? group_b : group_a);
    auto lay_out = [&](int64_t i) { column_as_b_tile(col_a, group_b ? &col_b : nullptr, i, dw[i % 3], weights[i & 1]); };
    const __m512 low_pair = _mm512_set1_ps(1.0f / 16384.0f);
    const int64_t nb = n / 32;
    lay_out(0);
    for (int64_t i = 0; i <= nb; ++i) {
        if (i < nb) {
            const int k = static_cast<int>(i & 1);
            const int8_t* x = q + 128 * i;   // part p of token t at x + t q_stride + 32 p
            _tile_loadd(4, weights[k], 64);
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
            _tile_stored(0, sums[k][0], 64);
            _tile_stored(1, sums[k][1], 64);
            _tile_stored(2, sums[k][2], 64);
            _tile_stored(3, sums[k][3], 64);
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

void dot_packed8_amx(DType t, const uint8_t* a, const uint8_t* b, const int8_t* q, int64_t q_stride,
                     const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) { dot_packed8_amx_type<decltype(type)::value>(a, b, q, q_stride, d, sum, nt, n, out); });
}

// int8 decode's product of two groups on the tile unit, tokens as rows (as dot_packed8_amx_type):
// per block the B tile (the weights) against the tokens' rounded x (A, read in place) gives each
// (token, row) the block's exact int32 sum S, and the vector units run dot_packed8_int8_tokens_type's
// operations on it: acc = fma(float(S), dw_r * dx, acc), extra = fma(c_r, sum, extra), out = acc +
// extra. Four blocks per round (C tiles 0-3; B tiles 4 and 6, A tiles 5 and 7 in turn): their
// weights are laid out first, then the four products run and are stored together, so the tile
// latencies are paid once per round.
constexpr int kAmxRound = 4;

template <DType T>
void dot_packed8_int8_amx_type(const uint8_t* group_a, const uint8_t* group_b, const int8_t* x, int64_t x_stride,
                               const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    configure_token_rows(nt, true);
    alignas(64) uint8_t weights[kAmxRound][8 * 64];
    alignas(64) int32_t sums[kAmxRound][16 * 16];
    alignas(64) float dw[kAmxRound][16];
    __m512 acc[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    GroupColumns<T> col_a(group_a), col_b(group_b ? group_b : group_a);
    const int64_t nb = n / 32;
    for (int64_t i0 = 0; i0 < nb; i0 += kAmxRound) {
        const int count = static_cast<int>(std::min<int64_t>(kAmxRound, nb - i0));
        for (int k = 0; k < count; ++k) column_as_b_tile(col_a, group_b ? &col_b : nullptr, i0 + k, dw[k], weights[k]);
        // block k of the round into C tile k (tile numbers are immediates, hence macros)
#define TMILL_AMX_PRODUCT(k, b, a)                          \
    if (count > k) {                                        \
        _tile_zero(k);                                      \
        _tile_loadd(b, weights[k], 64);                     \
        _tile_loadd(a, x + 32 * (i0 + k), x_stride);        \
        _tile_dpbsud(k, a, b);                              \
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
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[k] + 16 * t)),
                                         _mm512_mul_ps(dwv, _mm512_set1_ps(d[t][i0 + k])), acc[t]);
            }
        }
    }
    store_rows_with_offsets<T>(acc, group_a, group_b, sum, nt, nb, out);
}

void dot_packed8_int8_amx(DType t, const uint8_t* a, const uint8_t* b, const int8_t* x, int64_t x_stride,
                          const float* const* d, const float* const* sum, int nt, int64_t n, float* out) {
    with_packed_type(t, [&](auto type) {
        dot_packed8_int8_amx_type<decltype(type)::value>(a, b, x, x_stride, d, sum, nt, n, out);
    });
}

// int8 decode's q8_0 rows on the tile unit: up to 16 rows (file layout; the rest zero) against nt
// tokens laid out by amx_x_tiles. Per block the A tile holds the rows' signed quants and
// TDPBSSD gives each (row, token) the block's exact sum S; the vector units then run
// dot_q8_0_int8's float operations, acc = fma(float(S), dw * dx, acc) block after block. Four
// blocks per round, as in dot_packed8_int8_amx_type.
void dot_q8_0_int8_amx(const void* const* rows, int n_rows, const int8_t* tiles, const float* dx, int nt, int64_t n,
                       float* out) {
    constexpr int64_t block = 34;   // fp16 scale + 32 quants
    configure_tiles(nt);
    alignas(64) int8_t weights[kAmxRound][16 * 32] = {};
    alignas(64) int32_t sums[kAmxRound][16 * 16];
    alignas(64) float dw[kAmxRound][16] = {};
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t nb = n / 32;
    for (int64_t i0 = 0; i0 < nb; i0 += kAmxRound) {
        const int count = static_cast<int>(std::min<int64_t>(kAmxRound, nb - i0));
        for (int k = 0; k < count; ++k)
            for (int r = 0; r < n_rows; ++r) {
                const uint8_t* blk = static_cast<const uint8_t*>(rows[r]) + (i0 + k) * block;
                _mm_prefetch(reinterpret_cast<const char*>(blk) + kDecodePrefetchBytes, _MM_HINT_T0);
                dw[k][r] = half_at(blk);
                _mm256_store_si256(reinterpret_cast<__m256i*>(weights[k] + 32 * r),
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)));
            }
        const int8_t* x = tiles + 512 * i0;
#define TMILL_AMX_PRODUCT(k, a, b)                 \
    if (count > k) {                               \
        _tile_zero(k);                             \
        _tile_loadd(a, weights[k], 32);            \
        _tile_loadd(b, x + 512 * k, 64);           \
        _tile_dpbssd(k, a, b);                     \
    }
#define TMILL_AMX_STORE(k) \
    if (count > k) _tile_stored(k, sums[k], 64);
        TMILL_AMX_PRODUCT(0, 4, 6)
        TMILL_AMX_PRODUCT(1, 5, 7)
        TMILL_AMX_PRODUCT(2, 4, 6)
        TMILL_AMX_PRODUCT(3, 5, 7)
        TMILL_AMX_STORE(0)
        TMILL_AMX_STORE(1)
        TMILL_AMX_STORE(2)
        TMILL_AMX_STORE(3)
#undef TMILL_AMX_PRODUCT
#undef TMILL_AMX_STORE
        for (int k = 0; k < count; ++k) {
            const __m512 dxv = _mm512_loadu_ps(dx + 16 * (i0 + k));
#pragma GCC unroll 16
            for (int r = 0; r < 16; ++r)
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[k] + 16 * r)),
                                         _mm512_mul_ps(_mm512_set1_ps(dw[k][r]), dxv), acc[r]);
        }
    }
    alignas(64) float lanes[16];
    for (int r = 0; r < n_rows; ++r) {
        _mm512_store_ps(lanes, acc[r]);
        for (int t = 0; t < nt; ++t) out[16 * t + r] = lanes[t];
    }
}

}  // namespace

void add_amx_kernels(Kernels& k) {
    if (!amx_int8_usable()) return;
    k.amx_x_tiles = amx_x_tiles;
    k.dot_packed8_int8_amx = dot_packed8_int8_amx;
    k.dot_packed8_amx = dot_packed8_amx;
    k.dot_q8_0_int8_amx = dot_q8_0_int8_amx;
}

}  // namespace tmill::cpu
