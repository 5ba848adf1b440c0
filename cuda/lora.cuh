// LoRA's low-rank additions of one projection group: out += scale * (x A^T) B^T per item.
#pragma once

#include <cstdint>

#include "backend/backend.h"
#include "cuda/common.cuh"

namespace tmill::TM_GPU_NS {

// A LoraItem as the device reads it (the Weight structs it points to are host memory).
struct DeviceLoraItem {
    float* out;
    const float* x;
    const void* a;    // [r, n_in], f32 or (a_half) f16
    const void* bt;   // [r, n_out], f32 or (bt_half) f16
    int64_t r, n_in, n_out, n_rows;
    float scale;
    bool a_half, bt_half;
};

// items [n_items] (device copy); u_first [n_items + 1]: each item's first float in u, which holds
// its n_rows x r products (scale included); row_first [n_items + 1]: the items' first output rows
// when their rows are numbered one after another
void lora_add(cudaStream_t s, const DeviceLoraItem* items, int n_items, const int64_t* u_first, const int64_t* row_first,
              int64_t total_u, int64_t total_rows, int64_t max_out, float* u);

}  // namespace tmill::TM_GPU_NS
