// Typed errors of the core. The Python bindings translate each kind to a tokenmill exception class,
// so a bad file or argument reaches the user as a clear Python error, never as a crash.
#pragma once

#include <stdexcept>
#include <string>

namespace tmill {

enum class ErrorKind {
    format,        // corrupt, truncated or hostile model file
    unsupported,   // well-formed but not something we run (architecture, tensor type, version)
    invalid_arg,   // an argument out of range
    context,       // a prompt or generation that does not fit the context
    io,            // the operating system refused (open, mmap)
    numeric,       // NaN or infinite values where numbers are needed (logits, inputs)
    interrupted,   // the caller asked a running forward pass to stop (Ctrl-C); nothing was changed
    resource,      // a fixed budget is used up (the KV pool has no free block)
    device,        // the GPU runtime failed (out of device memory, a launch error, a lost device)
};

class Error : public std::runtime_error {
public:
    Error(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
    ErrorKind kind() const { return kind_; }

private:
    ErrorKind kind_;
};

[[noreturn]] inline void fail(ErrorKind kind, const std::string& msg) { throw Error(kind, msg); }

}  // namespace tmill
