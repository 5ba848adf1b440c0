#include "backend/backend.h"

#include "core/error.h"

namespace tmill {

std::vector<std::string> built_devices() {
    std::vector<std::string> out{"cpu"};
#ifdef TOKENMILL_WITH_CUDA
    out.push_back("cuda");
#endif
#ifdef TOKENMILL_WITH_HIP
    out.push_back("hip");
#endif
    return out;
}

std::unique_ptr<Backend> make_backend(const BackendOptions& options) {
    const std::string& d = options.device;
    if (d == "cpu") return make_cpu_backend(options.n_threads, options.int8_prefill, options.int8_decode);
    if (d == "cuda" || d == "hip") {
        std::string flag = d == "cuda" ? "TOKENMILL_CUDA" : "TOKENMILL_HIP";
        fail(ErrorKind::unsupported, "device '" + d + "' is not built into this tokenmill (devices: cpu); rebuild with " +
                                         "pip install . -C cmake.define." + flag + "=ON");
    }
    fail(ErrorKind::invalid_arg, "unknown device '" + d + "' (known: cpu, cuda, hip)");
}

}  // namespace tmill
