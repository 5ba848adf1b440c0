#include "io/mapped_file.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"

namespace tmill {

MappedFile::MappedFile(const std::string& path) : path_(path) {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail(ErrorKind::io, "cannot open '" + path + "': " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(ErrorKind::io, "'" + path + "' is not a regular file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int err = errno;
            ::close(fd);
            fail(ErrorKind::io, "cannot mmap '" + path + "': " + std::strerror(err));
        }
        data_ = static_cast<const uint8_t*>(p);
        mapped_ = true;
    }
    ::close(fd);
}

std::shared_ptr<MappedFile> MappedFile::from_bytes(const uint8_t* data, size_t size, const std::string& name) {
    std::shared_ptr<MappedFile> f(new MappedFile());
    f->path_ = name;
    f->bytes_.assign(data, data + size);
    f->data_ = f->bytes_.data();
    f->size_ = size;
    return f;
}

bool MappedFile::release(const uint8_t* p, size_t n) const {
    if (p < data_ || p + n > data_ + size_ || n == 0) return false;
    if (!mapped_) return true;
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page,
                    end = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
    return true;
}

MappedFile::~MappedFile() {
    if (mapped_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace tmill
