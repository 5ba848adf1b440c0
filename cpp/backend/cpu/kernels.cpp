#include "backend/cpu/kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "core/error.h"
#include "core/kquants.h"
#include "core/quants.h"

namespace tmill::cpu {

namespace {

// ---- scalar reference kernels

float dot_f32_scalar(const float* a, const float* b, int64_t n) {
    // Eight independent partial sums let the compiler keep a vector register busy per lane.
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

void rows_dot_f32_scalar(const float* rows, int64_t n_rows, int64_t d, const float* x, float* out) {
    for (int64_t j = 0; j < n_rows; ++j) out[j] = dot_f32_scalar(rows + j * d, x, d);
}

void rows_axpy_f32_scalar(float* y, const float* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w) {
    for (int64_t j = 0; j < n_rows; ++j)
        for (int64_t i = 0; i < d; ++i) y[i] += w[j] * rows[j * stride + i];
}

void rows_dot_f16_scalar(const uint16_t* rows, int64_t n_rows, int64_t d, const float* x, float* out) {
    for (int64_t j = 0; j < n_rows; ++j) {
        float sum = 0.0f;
        for (int64_t i = 0; i < d; ++i) sum += fp16_to_fp32(rows[j * d + i]) * x[i];
        out[j] = sum;
    }
}

void rows_axpy_f16_scalar(float* y, const uint16_t* rows, int64_t n_rows, int64_t d, int64_t stride, const float* w) {
    for (int64_t j = 0; j < n_rows; ++j)
        for (int64_t i = 0; i < d; ++i) y[i] += w[j] * fp16_to_fp32(rows[j * stride + i]);
}

void scores_block_scalar(const float* q, int nq, int64_t hd, const float* kt, int64_t kt_stride, int64_t m, float* s,
                         int64_t s_stride) {
    for (int i = 0; i < nq; ++i) {
        float* si = s + i * s_stride;
        std::fill(si, si + m, 0.0f);
        for (int64_t d = 0; d < hd; ++d)
            for (int64_t j = 0; j < m; ++j) si[j] += q[i * hd + d] * kt[d * kt_stride + j];
    }
}

float exp_sum_scalar(float* x, int64_t n, float shift) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - shift);
        sum += x[i];
    }
    return sum;
}

void swiglu_scalar(float* gate, const float* up, int64_t n) {
    for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void gelu_erf_scalar(float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.7071067811865476f));
}

void gelu_tanh_scalar(float* x, const float* up, int64_t n) {
    const float k = 0.7978845608028654f;   // sqrt(2 / pi)
    for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v))) * (up ? up[i] : 1.0f);
    }
}

void dot_f32_tile_scalar(const float* w, int64_t w_stride, const float* const* xs, int64_t n, float* out) {
    for (int t = 0; t < 2; ++t)
        for (int r = 0; r < 4; ++r) out[t * 4 + r] = dot_f32_scalar(w + r * w_stride, xs[t], n);
}

float dot_row_scalar(DType t, const void* row, const float* x, int64_t n) {
    if (t == DType::f32) return dot_f32_scalar(static_cast<const float*>(row), x, n);
    // dequantize a block at a time, then dot: exact weights, float accumulation
    float buf[256];
    const int64_t chunk = 256;   // a multiple of every block size we run
    size_t bytes_per_chunk = row_bytes(t, chunk);
    const uint8_t* p = static_cast<const uint8_t*>(row);
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i += chunk) {
        int64_t m = n - i < chunk ? n - i : chunk;
        dequantize_row(t, p, buf, m);
        sum += dot_f32_scalar(buf, x + i, m);
        p += bytes_per_chunk;
    }
    return sum;
}

void dot_rows_tokens_scalar(DType t, const void* const* rows, int n_rows, const float* const* xs, int n_tokens, int64_t n,
                            float* out) {
    for (int r = 0; r < n_rows; ++r)
        for (int j = 0; j < n_tokens; ++j) out[r * n_tokens + j] = dot_row_scalar(t, rows[r], xs[j], n);
}

const Kernels kScalar{Level::scalar, "scalar", dot_f32_scalar, rows_dot_f32_scalar, rows_axpy_f32_scalar,
                      exp_sum_scalar, swiglu_scalar, 4, 2, dot_f32_tile_scalar, dot_row_scalar, dot_rows_tokens_scalar,
                      dequantize_row, nullptr,
                      nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, gelu_erf_scalar,
                      gelu_tanh_scalar, nullptr, nullptr, nullptr, nullptr,
                      rows_dot_f16_scalar, rows_axpy_f16_scalar, nullptr, nullptr, nullptr, scores_block_scalar, nullptr, nullptr, nullptr,
                      nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};

#if defined(__x86_64__) || defined(__i386__)
// F16C from cpuid itself: __builtin_cpu_supports does not know it in every compiler (clang 14)
bool has_f16c() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
#endif

bool cpu_has(Level level) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (level) {
        case Level::scalar: return true;
        case Level::avx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
        case Level::avx512:   // CPUs with AVX-512 but no VNNI (Skylake-X) run the AVX2 kernels
            return cpu_has(Level::avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512vnni");
    }
    return false;
#else
    return level == Level::scalar;
#endif
}

const Kernels* table(Level level) {
    switch (level) {
        case Level::scalar: return &kScalar;
        case Level::avx2: return &kernels_avx2();
        case Level::avx512: return &kernels_avx512();
    }
    return nullptr;
}

Level parse_level(const std::string& name) {
    if (name == "scalar") return Level::scalar;
    if (name == "avx2") return Level::avx2;
    if (name == "avx512") return Level::avx512;
    fail(ErrorKind::invalid_arg, "unknown CPU level '" + name + "' (scalar, avx2, avx512)");
}

const Kernels* choose() {
    if (const char* env = std::getenv("TOKENMILL_CPU"); env && *env) {
        Level wanted = parse_level(env);
        if (!cpu_has(wanted))
            fail(ErrorKind::invalid_arg, std::string("TOKENMILL_CPU=") + env + " but this CPU (or build) lacks it");
        return table(wanted);
    }
    return table(supported_levels().back());
}

std::atomic<const Kernels*> g_active{nullptr};
std::shared_mutex g_level_mutex;   // shared by running passes, exclusive for set_level

}  // namespace

const Kernels& kernels_scalar() { return kScalar; }

// ---- the eight-row layout (a data format, the same at every level)

bool packable8(DType t) { return t == DType::q4_0 || t == DType::q4_1 || t == DType::q4_k || five_bit(t); }

namespace {
// where a block keeps its scale, minimum (q4_1, q5_1), fifth bits (q5_*) and quants
struct BlockFields { size_t d, m, qh, qs; };
BlockFields fields(DType t) {
    switch (t) {
        case DType::q4_1: return {0, 2, 0, 4};
        case DType::q5_0: return {0, 0, 2, 6};
        case DType::q5_1: return {0, 2, 4, 8};
        default: return {0, 0, 0, 2};
    }
}
// the mask (of four, 64-bit) holding nibble nib's fifth bits of row j, at bit 16 (j % 4)
size_t mask_of(int j, int nib) { return static_cast<size_t>(2 * (j / 4) + nib); }

// q4_k: a super-block's 128 quant bytes hold sub-block 2c in the low nibbles of bytes 32c..32c+31
// and sub-block 2c + 1 in their high nibbles; a group column holds each sub-block as q4_1 does
void pack_k4(const uint8_t* rows, size_t row_stride, int64_t n, uint8_t* group) {
    for (int64_t s = 0; s < n / 256; ++s) {
        uint8_t* out = group + s * kK4GroupSuper;
        for (int r = 0; r < 8; ++r) {
            const uint8_t* b = rows + r * row_stride + s * 144;
            std::memcpy(out + 2 * r, b, 2);
            std::memcpy(out + 16 + 2 * r, b + 2, 2);
            for (int w = 0; w < 3; ++w) std::memcpy(out + 32 + 32 * w + 4 * r, b + kK4Scales + 4 * w, 4);
            const uint8_t* qs = b + kK4Qs;
            for (int j = 0; j < 8; ++j) {
                const int shift = 4 * (j % 2);
                uint8_t* q = out + kK4GroupHeader + 128 * j + 16 * r;
                for (int l = 0; l < 16; ++l)
                    q[l] = static_cast<uint8_t>(((qs[32 * (j / 2) + l] >> shift) & 0x0F) |
                                                (((qs[32 * (j / 2) + 16 + l] >> shift) & 0x0F) << 4));
            }
        }
    }
}

void unpack_k4(const uint8_t* group, int64_t n, int r, uint8_t* row) {
    for (int64_t s = 0; s < n / 256; ++s) {
        const uint8_t* in = group + s * kK4GroupSuper;
        uint8_t* b = row + s * 144;
        std::memcpy(b, in + 2 * r, 2);
        std::memcpy(b + 2, in + 16 + 2 * r, 2);
        for (int w = 0; w < 3; ++w) std::memcpy(b + kK4Scales + 4 * w, in + 32 + 32 * w + 4 * r, 4);
        uint8_t* qs = b + kK4Qs;
        std::memset(qs, 0, 128);
        for (int j = 0; j < 8; ++j) {
            const int shift = 4 * (j % 2);
            const uint8_t* q = in + kK4GroupHeader + 128 * j + 16 * r;
            for (int l = 0; l < 16; ++l) {
                qs[32 * (j / 2) + l] |= static_cast<uint8_t>((q[l] & 0x0F) << shift);
                qs[32 * (j / 2) + 16 + l] |= static_cast<uint8_t>((q[l] >> 4) << shift);
            }
        }
    }
}
}  // namespace

void pack_rows8(DType t, const uint8_t* rows, size_t row_stride, int64_t n, uint8_t* group) {
    if (t == DType::q4_k) return pack_k4(rows, row_stride, n, group);
    const BlockFields f = fields(t);
    const size_t block = dtype_info(t).block_bytes, col = packed8_column_bytes(t), quants = packed8_quants_offset(t);
    for (int64_t i = 0; i < n / 32; ++i) {
        uint8_t* out = group + i * col;
        uint64_t masks[4] = {};
        for (int j = 0; j < 8; ++j) {
            const uint8_t* b = rows + j * row_stride + i * block;
            std::memcpy(out + 2 * j, b + f.d, 2);
            if (packed8_minimums(t)) std::memcpy(out + 16 + 2 * j, b + f.m, 2);
            std::memcpy(out + quants + 16 * j, b + f.qs, 16);
            if (five_bit(t)) {
                uint32_t qh;
                std::memcpy(&qh, b + f.qh, 4);
                for (int nib = 0; nib < 2; ++nib)
                    masks[mask_of(j, nib)] |= static_cast<uint64_t>((qh >> (16 * nib)) & 0xFFFF) << (16 * (j % 4));
            }
        }
        if (five_bit(t)) std::memcpy(out + quants - 32, masks, 32);
    }
}

void unpack_row8(DType t, const uint8_t* group, int64_t n, int j, uint8_t* row) {
    if (t == DType::q4_k) return unpack_k4(group, n, j, row);
    const BlockFields f = fields(t);
    const size_t block = dtype_info(t).block_bytes, col = packed8_column_bytes(t), quants = packed8_quants_offset(t);
    for (int64_t i = 0; i < n / 32; ++i) {
        const uint8_t* in = group + i * col;
        uint8_t* b = row + i * block;
        std::memcpy(b + f.d, in + 2 * j, 2);
        if (packed8_minimums(t)) std::memcpy(b + f.m, in + 16 + 2 * j, 2);
        std::memcpy(b + f.qs, in + quants + 16 * j, 16);
        if (five_bit(t)) {
            uint64_t masks[4];
            std::memcpy(masks, in + quants - 32, 32);
            uint32_t qh = 0;
            for (int nib = 0; nib < 2; ++nib)
                qh |= static_cast<uint32_t>((masks[mask_of(j, nib)] >> (16 * (j % 4))) & 0xFFFF) << (16 * nib);
            std::memcpy(b + f.qh, &qh, 4);
        }
    }
}

void pack_q8_0_strip(const uint8_t* rows, size_t row_stride, int n_rows, int64_t n, uint8_t* strip) {
    const int64_t nb = n / 32;
    uint16_t* scales = reinterpret_cast<uint16_t*>(strip + nb * kQ8_0StripQuantBytes);
    for (int64_t i = 0; i < nb; ++i) {
        uint8_t* col = strip + i * kQ8_0StripQuantBytes;
        for (int r = 0; r < 16; ++r) {
            BlockQ8_0 b{};   // rows past the last: zero scale, zero values
            if (r < n_rows) std::memcpy(&b, rows + r * row_stride + i * sizeof(BlockQ8_0), sizeof(BlockQ8_0));
            scales[16 * i + r] = b.d;
            for (int j = 0; j < 32; ++j) col[64 * (j / 4) + 4 * r + j % 4] = static_cast<uint8_t>(b.qs[j] + 128);
        }
    }
}

void q8_0_part_sums(const int8_t* q, int64_t n, int32_t* s) {
    for (int64_t b = 0; b < n / 32; ++b, q += 128) {
        int32_t ab = 0, ce = 0;
        for (int j = 0; j < 32; ++j) {
            ab += 128 * q[j] + q[32 + j];
            ce += 128 * q[64 + j] + q[96 + j];
        }
        s[2 * b] = ab;
        s[2 * b + 1] = ce;
    }
}

void first_part(const int8_t* q, const float* d, int64_t n, int8_t* a, float* sums, int32_t* block_sums) {
    for (int64_t b = 0; b < n / 32; ++b) {
        int32_t s = 0;
        for (int j = 0; j < 32; ++j) s += a[32 * b + j] = q[128 * b + j];
        sums[b] = d[b] * static_cast<float>(s);
        if (block_sums) block_sums[b] = s;
    }
}

const Kernels& kernels() {
    const Kernels* k = g_active.load(std::memory_order_acquire);
    if (!k) {
        k = choose();
        g_active.store(k, std::memory_order_release);
    }
    return *k;
}

std::vector<Level> supported_levels() {
    std::vector<Level> out;
    for (Level l : {Level::scalar, Level::avx2, Level::avx512})
        if (cpu_has(l)) out.push_back(l);
    return out;
}

void set_level(const std::string& name) {
    Level l = parse_level(name);
    if (!cpu_has(l)) fail(ErrorKind::invalid_arg, "CPU level '" + name + "' is not available on this CPU");
    std::unique_lock<std::shared_mutex> lock(g_level_mutex);   // waits for running passes to end
    g_active.store(table(l), std::memory_order_release);
}

LevelPin::LevelPin() : lock_(g_level_mutex) {}

std::string level_name(Level level) {
    switch (level) {
        case Level::scalar: return "scalar";
        case Level::avx2: return "avx2";
        case Level::avx512: return "avx512";
    }
    return "?";
}

}  // namespace tmill::cpu
