// LoRA additions on the CPU (Backend::lora_add).
#pragma once

#include <vector>

#include "backend/backend.h"
#include "core/threadpool.h"

namespace tmill::cpu {

// out += scale * (x A^T) BT for every item: u = scale * A x per row (A's rows four at a time), then
// out += u BT over column chunks. u: scratch the call resizes.
void lora_add(ThreadPool& pool, std::vector<float>& u, const LoraItem* items, int n_items);

}  // namespace tmill::cpu
