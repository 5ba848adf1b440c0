// Tensor element types. The numeric ids are the GGUF (ggml) type ids so a GGUF tensor info maps
// directly; safetensors dtypes map onto the same ids.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tmill {

enum class DType : uint32_t {
    f32 = 0,
    f16 = 1,
    q4_0 = 2,
    q4_1 = 3,
    q5_0 = 6,
    q5_1 = 7,
    q8_0 = 8,
    q8_1 = 9,
    q2_k = 10,
    q3_k = 11,
    q4_k = 12,
    q5_k = 13,
    q6_k = 14,
    q8_k = 15,
    iq4_nl = 20,
    i8 = 24,
    i16 = 25,
    i32 = 26,
    i64 = 27,
    f64 = 28,
    bf16 = 30,
    // tokenmill's own (KV cache only, never a GGUF tensor type): ids above every ggml id
    nf4 = 1u << 16,
};

// Ids below this are ggml's; a GGUF file may only use those.
constexpr uint32_t kFirstNonGgmlType = 1u << 16;

struct DTypeInfo {
    const char* name;
    int block_size;      // elements per block (1 for plain types)
    int block_bytes;     // bytes per block; 0 = unknown type
    bool runnable;       // the engine can compute with it (dequantize / dot)
};

// Layout facts of a type; block_bytes == 0 for ids we do not know.
DTypeInfo dtype_info(DType t);
inline DTypeInfo dtype_info(uint32_t id) { return dtype_info(static_cast<DType>(id)); }
std::string dtype_name(DType t);

// Bytes of a row of n elements (n must be a multiple of the block size; callers check).
inline size_t row_bytes(DType t, int64_t n) {
    DTypeInfo info = dtype_info(t);
    return static_cast<size_t>(n / info.block_size) * static_cast<size_t>(info.block_bytes);
}

// Block layouts (GGUF spec). d = scale, m = minimum, qs = packed quants.
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };                    // x = d * q
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };                   // x = d * (nibble - 8)
struct BlockQ4_1 { uint16_t d; uint16_t m; uint8_t qs[16]; };       // x = d * nibble + m
struct BlockNF4 { uint16_t d; uint8_t qs[16]; };                    // x = d * kNF4[nibble], d = absmax
static_assert(sizeof(BlockQ8_0) == 34, "q8_0 block");
static_assert(sizeof(BlockQ4_0) == 18, "q4_0 block");
static_assert(sizeof(BlockQ4_1) == 20, "q4_1 block");
static_assert(sizeof(BlockNF4) == 18, "nf4 block");

// The block struct of a block-quantized type, for kernels templated on the type.
template <DType T> struct BlockOf;
template <> struct BlockOf<DType::q8_0> { using type = BlockQ8_0; };
template <> struct BlockOf<DType::q4_0> { using type = BlockQ4_0; };
template <> struct BlockOf<DType::q4_1> { using type = BlockQ4_1; };
template <> struct BlockOf<DType::nf4> { using type = BlockNF4; };

// The NormalFloat-4 codebook (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1],
// with an exact zero. Nibble k stands for kNF4[k] times the block's absolute maximum.
extern const float kNF4[16];

}  // namespace tmill
