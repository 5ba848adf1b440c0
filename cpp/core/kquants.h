// GGUF types that tokenmill reads (dequantizes exactly) but does not compute with yet: q5_0, q5_1 and
// the K-quants q2_k..q6_k. A model holding them converts those tensors at load.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace tmill {

// Whether t is one of these types.
bool dequantizes_only(DType t);
// out[n] = row for such a type (n a multiple of its block size).
void dequantize_row_extra(DType t, const void* row, float* out, int64_t n);

}  // namespace tmill
