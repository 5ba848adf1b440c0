#include "io/gguf.h"

#include <cstring>

#include "core/error.h"

namespace tmill {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as little-endian uint32
constexpr int kMaxArrayDepth = 4;
constexpr int kMaxDims = 4;

// Bounds-checked reader over the mapped bytes.
class Cursor {
public:
    Cursor(const uint8_t* data, size_t size, const std::string& path) : data_(data), size_(size), path_(path) {}

    size_t pos() const { return pos_; }
    size_t remaining() const { return size_ - pos_; }

    template <typename T>
    T read(const char* what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, data_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }

    std::string read_string(const char* what) {
        uint64_t len = read<uint64_t>(what);
        need(len, what);
        std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
        pos_ += static_cast<size_t>(len);
        return s;
    }

    // A count of items each at least `min_item_bytes` long must fit in what is left of the file.
    void check_count(uint64_t count, size_t min_item_bytes, const char* what) {
        if (min_item_bytes > 0 && count > remaining() / min_item_bytes)
            bad(std::string(what) + " count " + std::to_string(count) + " exceeds the file size");
    }

    [[noreturn]] void bad(const std::string& msg) const {
        fail(ErrorKind::format, "GGUF file '" + path_ + "': " + msg + " (at byte " + std::to_string(pos_) + ")");
    }

private:
    void need(uint64_t n, const char* what) {
        if (n > remaining()) bad(std::string("truncated while reading ") + what);
    }

    const uint8_t* data_;
    size_t size_;
    size_t pos_ = 0;
    std::string path_;
};

size_t scalar_size(GGUFType t) {
    switch (t) {
        case GGUFType::u8: case GGUFType::i8: case GGUFType::boolean: return 1;
        case GGUFType::u16: case GGUFType::i16: return 2;
        case GGUFType::u32: case GGUFType::i32: case GGUFType::f32: return 4;
        case GGUFType::u64: case GGUFType::i64: case GGUFType::f64: return 8;
        case GGUFType::string: return 8;   // the length prefix, at least
        case GGUFType::array: return 12;   // element type + count, at least
    }
    return 0;
}

GGUFType read_type(Cursor& c, const char* what) {
    uint32_t t = c.read<uint32_t>(what);
    if (t > static_cast<uint32_t>(GGUFType::f64)) c.bad("unknown metadata value type " + std::to_string(t));
    return static_cast<GGUFType>(t);
}

int64_t read_integer(Cursor& c, GGUFType t) {
    switch (t) {
        case GGUFType::u8: return c.read<uint8_t>("u8");
        case GGUFType::i8: return c.read<int8_t>("i8");
        case GGUFType::u16: return c.read<uint16_t>("u16");
        case GGUFType::i16: return c.read<int16_t>("i16");
        case GGUFType::u32: return c.read<uint32_t>("u32");
        case GGUFType::i32: return c.read<int32_t>("i32");
        case GGUFType::u64: return static_cast<int64_t>(c.read<uint64_t>("u64"));
        case GGUFType::i64: return c.read<int64_t>("i64");
        case GGUFType::boolean: {
            uint8_t b = c.read<uint8_t>("bool");
            if (b > 1) c.bad("bool value " + std::to_string(b));
            return b;
        }
        default: c.bad("not an integer type");
    }
}

double read_real(Cursor& c, GGUFType t) {
    if (t == GGUFType::f32) return c.read<float>("f32");
    return c.read<double>("f64");
}

GGUFValue read_value(Cursor& c, GGUFType type, int depth) {
    GGUFValue v;
    v.type = type;
    switch (type) {
        case GGUFType::f32: case GGUFType::f64: v.real = read_real(c, type); break;
        case GGUFType::string: v.str = c.read_string("string value"); break;
        case GGUFType::array: {
            if (depth >= kMaxArrayDepth) c.bad("arrays nested too deeply");
            v.elem_type = read_type(c, "array element type");
            uint64_t n = c.read<uint64_t>("array length");
            c.check_count(n, scalar_size(v.elem_type), "array");
            for (uint64_t i = 0; i < n; ++i) {
                switch (v.elem_type) {
                    case GGUFType::f32: case GGUFType::f64: v.reals.push_back(read_real(c, v.elem_type)); break;
                    case GGUFType::string: v.strings.push_back(c.read_string("string array element")); break;
                    case GGUFType::array: v.arrays.push_back(read_value(c, GGUFType::array, depth + 1)); break;
                    default: v.integers.push_back(read_integer(c, v.elem_type)); break;
                }
            }
            break;
        }
        default: v.integer = read_integer(c, type); break;
    }
    return v;
}

}  // namespace

bool GGUFValue::is_integer() const {
    return type != GGUFType::f32 && type != GGUFType::f64 && type != GGUFType::string && type != GGUFType::array;
}

size_t GGUFValue::array_size() const {
    return integers.size() + reals.size() + strings.size() + arrays.size();
}

GGUFFile::GGUFFile(const std::string& path) : GGUFFile(std::make_shared<MappedFile>(path)) {}

GGUFFile::GGUFFile(std::shared_ptr<MappedFile> file) : file_(std::move(file)) {
    const std::string& path = file_->path();
    Cursor c(file_->data(), file_->size(), path);
    if (file_->size() < 4 || c.read<uint32_t>("magic") != kMagic)
        fail(ErrorKind::format, "'" + path + "' is not a GGUF file (bad magic)");
    version_ = c.read<uint32_t>("version");
    if (version_ == 1) fail(ErrorKind::unsupported, "'" + path + "': GGUF v1 is not supported (v2 and v3 are)");
    if (version_ > 3) {
        if ((version_ & 0xFFFF) == 0)
            fail(ErrorKind::unsupported, "'" + path + "': big-endian GGUF files are not supported");
        fail(ErrorKind::unsupported, "'" + path + "': GGUF version " + std::to_string(version_) + " is not supported");
    }
    uint64_t n_tensors = c.read<uint64_t>("tensor count");
    uint64_t n_kv = c.read<uint64_t>("metadata count");
    c.check_count(n_kv, 8 + 4 + 1, "metadata");
    c.check_count(n_tensors, 8 + 4 + 8 + 4 + 8, "tensor");

    for (uint64_t i = 0; i < n_kv; ++i) {
        std::string key = c.read_string("metadata key");
        GGUFType type = read_type(c, "metadata value type");
        GGUFValue value = read_value(c, type, 0);
        if (!metadata_.emplace(key, std::move(value)).second) c.bad("duplicate metadata key '" + key + "'");
    }

    if (const GGUFValue* a = find("general.alignment")) {
        if (!a->is_integer() || a->integer <= 0 || (a->integer & (a->integer - 1)) != 0 || a->integer > (1 << 20))
            c.bad("general.alignment must be a positive power of two");
        alignment_ = static_cast<size_t>(a->integer);
    }

    struct Pending { std::string name; DType type; std::vector<int64_t> shape; uint64_t offset; size_t nbytes; };
    std::vector<Pending> pending;
    pending.reserve(static_cast<size_t>(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        Pending t;
        t.name = c.read_string("tensor name");
        uint32_t n_dims = c.read<uint32_t>("tensor dimension count");
        if (n_dims == 0 || n_dims > kMaxDims)
            c.bad("tensor '" + t.name + "' has " + std::to_string(n_dims) + " dimensions");
        uint64_t n_elems = 1;
        for (uint32_t d = 0; d < n_dims; ++d) {
            uint64_t ne = c.read<uint64_t>("tensor dimension");
            if (ne == 0 || ne > (uint64_t(1) << 40) || n_elems > (uint64_t(1) << 50) / ne)
                c.bad("tensor '" + t.name + "' has an invalid shape");
            n_elems *= ne;
            t.shape.push_back(static_cast<int64_t>(ne));
        }
        uint32_t type_id = c.read<uint32_t>("tensor type");
        DTypeInfo info = dtype_info(type_id);
        if (info.block_bytes == 0 || type_id >= kFirstNonGgmlType)
            fail(ErrorKind::unsupported, "GGUF file '" + path + "': tensor '" + t.name + "' has unknown type id " +
                                             std::to_string(type_id));
        t.type = static_cast<DType>(type_id);
        if (t.shape[0] % info.block_size != 0)
            c.bad("tensor '" + t.name + "' row length is not a multiple of its block size");
        t.nbytes = static_cast<size_t>(n_elems / info.block_size) * info.block_bytes;
        t.offset = c.read<uint64_t>("tensor offset");
        if (t.offset % alignment_ != 0) c.bad("tensor '" + t.name + "' offset is not aligned");
        pending.push_back(std::move(t));
    }

    size_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
    if (n_tensors > 0 && data_start > file_->size()) c.bad("truncated before the tensor data");
    for (Pending& t : pending) {
        if (t.offset > file_->size() || t.nbytes > file_->size() - data_start ||
            t.offset > file_->size() - data_start - t.nbytes)
            fail(ErrorKind::format, "GGUF file '" + path + "': tensor '" + t.name + "' data lies outside the file (" +
                                        std::to_string(data_start + t.offset + t.nbytes) + " > " +
                                        std::to_string(file_->size()) + " bytes); the file may be truncated");
        if (!tensor_index_.emplace(t.name, tensors_.size()).second) c.bad("duplicate tensor name '" + t.name + "'");
        tensors_.push_back({t.name, t.type, t.shape, t.offset, t.nbytes, file_->data() + data_start + t.offset});
    }
}

const GGUFValue* GGUFFile::find(const std::string& key) const {
    auto it = metadata_.find(key);
    return it == metadata_.end() ? nullptr : &it->second;
}

const GGUFTensorInfo* GGUFFile::find_tensor(const std::string& name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::string GGUFFile::get_string(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) fail(ErrorKind::format, "GGUF file '" + file_->path() + "' lacks metadata key '" + key + "'");
    if (v->type != GGUFType::string) fail(ErrorKind::format, "GGUF metadata '" + key + "' is not a string");
    return v->str;
}

int64_t GGUFFile::get_int(const std::string& key) const {
    const GGUFValue* v = find(key);
    if (!v) fail(ErrorKind::format, "GGUF file '" + file_->path() + "' lacks metadata key '" + key + "'");
    if (!v->is_integer()) fail(ErrorKind::format, "GGUF metadata '" + key + "' is not an integer");
    return v->integer;
}

int64_t GGUFFile::get_int_or(const std::string& key, int64_t dflt) const {
    return find(key) ? get_int(key) : dflt;
}

double GGUFFile::get_real_or(const std::string& key, double dflt) const {
    const GGUFValue* v = find(key);
    if (!v) return dflt;
    if (v->type == GGUFType::f32 || v->type == GGUFType::f64) return v->real;
    if (v->is_integer()) return static_cast<double>(v->integer);
    fail(ErrorKind::format, "GGUF metadata '" + key + "' is not a number");
}

}  // namespace tmill
