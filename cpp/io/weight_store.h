// All tensors of a model under GGUF-style names ("blk.3.attn_q.weight"), wherever they came from: a
// GGUF file (names as written) or Hugging Face safetensors files (names mapped, GPT-2's Conv1D
// weights transposed), plus whatever keeps their memory alive.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/gguf.h"
#include "io/mapped_file.h"

namespace tmill {

// A named tensor as found in a file, in ggml dimension order (shape[0] is the row length).
struct TensorRef {
    DType type;
    std::vector<int64_t> shape;
    const uint8_t* data;   // host memory: the map, or an owned copy
    size_t nbytes;
};

struct WeightStore {
    std::map<std::string, TensorRef> tensors;
    std::vector<std::shared_ptr<MappedFile>> files;
    std::vector<std::vector<uint8_t>> owned;   // converted or transposed copies
    std::string source;                        // path, for messages

    const TensorRef* find(const std::string& name) const;
    // stores a copy under `name` (replacing a mapped tensor of that name) and returns it
    const TensorRef& add_owned(const std::string& name, DType type, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
};

// The tensors of a parsed GGUF file, used in place.
WeightStore weights_from_gguf(const GGUFFile& f, const std::string& source);
// The tensors of HF safetensors files of an architecture (names mapped to GGUF's; unknown ones skipped).
WeightStore weights_from_safetensors(const std::vector<std::shared_ptr<MappedFile>>& files, const std::string& arch);

}  // namespace tmill
