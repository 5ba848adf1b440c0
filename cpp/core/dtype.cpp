#include "core/dtype.h"

#include "core/block_math.h"

namespace tmill {

const float kNF4[16] = TM_NF4_CODEBOOK;

DTypeInfo dtype_info(DType t) {
    switch (t) {
        case DType::f32: return {"f32", 1, 4, true};
        case DType::f16: return {"f16", 1, 2, true};
        case DType::bf16: return {"bf16", 1, 2, true};
        case DType::q8_0: return {"q8_0", 32, 34, true};
        case DType::q4_0: return {"q4_0", 32, 18, true};
        case DType::q4_1: return {"q4_1", 32, 20, true};
        case DType::q5_0: return {"q5_0", 32, 22, true};
        case DType::q5_1: return {"q5_1", 32, 24, true};
        case DType::q8_1: return {"q8_1", 32, 36, false};
        case DType::q2_k: return {"q2_k", 256, 84, true};
        case DType::q3_k: return {"q3_k", 256, 110, true};
        case DType::q4_k: return {"q4_k", 256, 144, true};
        case DType::q5_k: return {"q5_k", 256, 176, true};
        case DType::q6_k: return {"q6_k", 256, 210, true};
        case DType::q8_k: return {"q8_k", 256, 292, false};
        case DType::iq4_nl: return {"iq4_nl", 32, 18, true};
        case DType::i8: return {"i8", 1, 1, false};
        case DType::i16: return {"i16", 1, 2, false};
        case DType::i32: return {"i32", 1, 4, false};
        case DType::i64: return {"i64", 1, 8, false};
        case DType::f64: return {"f64", 1, 8, false};
        case DType::nf4: return {"nf4", 32, 18, true};
    }
    return {"unknown", 1, 0, false};
}

std::string dtype_name(DType t) {
    DTypeInfo info = dtype_info(t);
    if (info.block_bytes == 0) return "type#" + std::to_string(static_cast<uint32_t>(t));
    return info.name;
}

}  // namespace tmill
