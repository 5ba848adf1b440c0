// A read-only memory map of a whole file. Model weights are used in place from the map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tmill {

class MappedFile {
public:
    // Maps a regular file; anything else (a directory, a FIFO, a device) is refused before it is
    // read, so opening never blocks.
    explicit MappedFile(const std::string& path);
    // The same interface over a copy of bytes in memory (fuzzing, tests); `name` is for messages.
    static std::shared_ptr<MappedFile> from_bytes(const uint8_t* data, size_t size, const std::string& name);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    const std::string& path() const { return path_; }
    // Whether [p, p + n) lies in this map; if so, the whole pages inside it leave this process's
    // resident set (a copy now serves their reads; a later read faults them back from the page cache).
    bool release(const uint8_t* p, size_t n) const;

private:
    MappedFile() = default;

    std::string path_;
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;
    bool mapped_ = false;
    std::vector<uint8_t> bytes_;   // from_bytes: the copy data_ points into
};

}  // namespace tmill
