// GGUF v2/v3 reader over a memory map. Every count, length, offset and size read from the file is
// checked against the bytes that are really there before it is used, so hostile files fail with
// tmill::Error(format) instead of reading out of bounds or allocating without limit.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/mapped_file.h"

namespace tmill {

enum class GGUFType : uint32_t {
    u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7,
    string = 8, array = 9, u64 = 10, i64 = 11, f64 = 12,
};

// One metadata value. Scalars use `integer` (all integer types and bool), `real` or `str`;
// arrays keep their element type and fill exactly one of the vectors.
struct GGUFValue {
    GGUFType type = GGUFType::u8;
    GGUFType elem_type = GGUFType::u8;   // arrays only
    int64_t integer = 0;                 // u64 values above INT64_MAX wrap; `type` says how to read it
    double real = 0.0;
    std::string str;
    std::vector<int64_t> integers;
    std::vector<double> reals;
    std::vector<std::string> strings;
    std::vector<GGUFValue> arrays;       // arrays of arrays

    bool is_integer() const;
    size_t array_size() const;
};

struct GGUFTensorInfo {
    std::string name;
    DType type;
    std::vector<int64_t> shape;   // ggml order: shape[0] is the contiguous (row) dimension
    uint64_t offset;              // from the start of the data section
    size_t nbytes;
    const uint8_t* data;          // into the map
};

class GGUFFile {
public:
    explicit GGUFFile(const std::string& path);
    explicit GGUFFile(std::shared_ptr<MappedFile> file);   // bytes already mapped (or in memory)

    uint32_t version() const { return version_; }
    size_t alignment() const { return alignment_; }
    const std::map<std::string, GGUFValue>& metadata() const { return metadata_; }
    const std::vector<GGUFTensorInfo>& tensors() const { return tensors_; }

    const GGUFValue* find(const std::string& key) const;
    const GGUFTensorInfo* find_tensor(const std::string& name) const;

    // Typed metadata getters: throw format errors on a wrong type; the *_or forms give a default
    // when the key is absent.
    std::string get_string(const std::string& key) const;
    int64_t get_int(const std::string& key) const;
    int64_t get_int_or(const std::string& key, int64_t dflt) const;
    double get_real_or(const std::string& key, double dflt) const;

    std::shared_ptr<MappedFile> file() const { return file_; }

private:
    std::shared_ptr<MappedFile> file_;
    uint32_t version_ = 0;
    size_t alignment_ = 32;
    std::map<std::string, GGUFValue> metadata_;
    std::vector<GGUFTensorInfo> tensors_;
    std::map<std::string, size_t> tensor_index_;
};

}  // namespace tmill
