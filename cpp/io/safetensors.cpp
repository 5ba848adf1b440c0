#include "io/safetensors.h"

#include <cstring>

#include "core/error.h"
#include "core/json.h"

namespace tmill {

namespace {

constexpr uint64_t kMaxHeader = uint64_t(100) << 20;  // the format caps headers at 100 MB

struct DtypeEntry { const char* name; size_t bytes; DType type; bool supported; };

const DtypeEntry kDtypes[] = {
    {"F32", 4, DType::f32, true},   {"F16", 2, DType::f16, true},   {"BF16", 2, DType::bf16, true},
    {"F64", 8, DType::f64, false},  {"I64", 8, DType::i64, false},  {"I32", 4, DType::i32, false},
    {"I16", 2, DType::i16, false},  {"I8", 1, DType::i8, false},    {"U8", 1, DType::i8, false},
    {"BOOL", 1, DType::i8, false},  {"F8_E4M3", 1, DType::i8, false}, {"F8_E5M2", 1, DType::i8, false},
    {"U16", 2, DType::i16, false},  {"U32", 4, DType::i32, false},  {"U64", 8, DType::i64, false},
};

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : SafetensorsFile(std::make_shared<MappedFile>(path)) {}

SafetensorsFile::SafetensorsFile(std::shared_ptr<MappedFile> file) : file_(std::move(file)) {
    const std::string& path = file_->path();
    auto bad = [&](const std::string& msg) { fail(ErrorKind::format, "safetensors file '" + path + "': " + msg); };
    size_t size = file_->size();
    if (size < 8) bad("too short to hold a header");
    uint64_t header_len;
    std::memcpy(&header_len, file_->data(), 8);
    if (header_len > kMaxHeader || header_len > size - 8)
        bad("header length " + std::to_string(header_len) + " exceeds the file size (" + std::to_string(size) +
            " bytes); the file may be truncated or not safetensors");
    std::string header(reinterpret_cast<const char*>(file_->data() + 8), static_cast<size_t>(header_len));
    JsonValue root = parse_json(header, "safetensors header of '" + path + "'");
    if (root.kind != JsonValue::Kind::object) bad("header is not a JSON object");

    const uint8_t* data_start = file_->data() + 8 + header_len;
    size_t data_size = size - 8 - static_cast<size_t>(header_len);
    for (const auto& [name, entry] : root.object) {
        if (name == "__metadata__") {
            if (entry.kind != JsonValue::Kind::object) bad("__metadata__ is not an object");
            for (const auto& [k, v] : entry.object)
                if (v.kind == JsonValue::Kind::string) metadata_[k] = v.string;
            continue;
        }
        if (entry.kind != JsonValue::Kind::object) bad("entry '" + name + "' is not an object");
        const JsonValue* dtype = entry.get("dtype");
        const JsonValue* shape = entry.get("shape");
        const JsonValue* offsets = entry.get("data_offsets");
        if (!dtype || dtype->kind != JsonValue::Kind::string || !shape || shape->kind != JsonValue::Kind::array ||
            !offsets || offsets->kind != JsonValue::Kind::array || offsets->array.size() != 2)
            bad("entry '" + name + "' lacks dtype, shape or data_offsets");
        const DtypeEntry* de = nullptr;
        for (const DtypeEntry& d : kDtypes)
            if (dtype->string == d.name) de = &d;
        if (!de) bad("tensor '" + name + "' has unknown dtype '" + dtype->string + "'");

        SafetensorInfo info;
        info.name = name;
        info.dtype_name = dtype->string;
        info.type = de->type;
        info.supported = de->supported;
        uint64_t n_elems = 1;
        for (const JsonValue& d : shape->array) {
            if (d.kind != JsonValue::Kind::number || !d.is_integer || d.integer < 0 || d.integer > (int64_t(1) << 40))
                bad("tensor '" + name + "' has an invalid shape");
            if (d.integer != 0 && n_elems > (uint64_t(1) << 50) / static_cast<uint64_t>(d.integer))
                bad("tensor '" + name + "' is too large");
            n_elems *= static_cast<uint64_t>(d.integer);
            info.shape.push_back(d.integer);
        }
        const JsonValue& b = offsets->array[0];
        const JsonValue& e = offsets->array[1];
        if (b.kind != JsonValue::Kind::number || e.kind != JsonValue::Kind::number || !b.is_integer || !e.is_integer ||
            b.integer < 0 || e.integer < b.integer)
            bad("tensor '" + name + "' has invalid data_offsets");
        uint64_t begin = static_cast<uint64_t>(b.integer), end = static_cast<uint64_t>(e.integer);
        if (end > data_size)
            bad("tensor '" + name + "' data [" + std::to_string(begin) + ", " + std::to_string(end) +
                ") lies outside the file's " + std::to_string(data_size) + " data bytes; the file may be truncated");
        if (end - begin != n_elems * de->bytes)
            bad("tensor '" + name + "' byte range does not match its shape and dtype");
        info.data = data_start + begin;
        info.nbytes = static_cast<size_t>(end - begin);
        tensors_.emplace(name, std::move(info));
    }
}

}  // namespace tmill
