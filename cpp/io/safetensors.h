// safetensors reader over a memory map: 8-byte little-endian header length, a JSON header naming
// every tensor's dtype, shape and byte range, then the raw data. Everything is bounds-checked.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/mapped_file.h"

namespace tmill {

struct SafetensorInfo {
    std::string name;
    std::string dtype_name;       // as written in the file ("F32", "BF16", ...)
    DType type;                   // meaningful only when supported
    bool supported;               // F32, F16, BF16
    std::vector<int64_t> shape;   // as written (row-major, outermost first)
    const uint8_t* data;
    size_t nbytes;
};

class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path);
    explicit SafetensorsFile(std::shared_ptr<MappedFile> file);

    const std::map<std::string, SafetensorInfo>& tensors() const { return tensors_; }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    std::shared_ptr<MappedFile> file() const { return file_; }

private:
    std::shared_ptr<MappedFile> file_;
    std::map<std::string, SafetensorInfo> tensors_;
    std::map<std::string, std::string> metadata_;
};

}  // namespace tmill
