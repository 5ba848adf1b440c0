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
    const size_t colon = d.find(':');
    const std::string vendor = d.substr(0, colon);
    if (vendor == "cuda" || vendor == "hip") {
        int index = 0;
        if (colon != std::string::npos) {
            const std::string digits = d.substr(colon + 1);
            if (digits.empty() || digits.size() > 4 || digits.find_first_not_of("0123456789") != std::string::npos)
                fail(ErrorKind::invalid_arg, "device '" + d + "': expected " + vendor + " or " + vendor + ":N");
            index = std::stoi(digits);
        }
#ifdef TOKENMILL_WITH_CUDA
        if (vendor == "cuda") return make_cuda_backend(index);
#endif
#ifdef TOKENMILL_WITH_HIP
        if (vendor == "hip") return make_hip_backend(index);
#endif
        (void)index;
        std::string devices;
        for (const std::string& name : built_devices()) devices += (devices.empty() ? "" : ", ") + name;
        const std::string flag = vendor == "cuda" ? "TOKENMILL_CUDA" : "TOKENMILL_HIP";
        fail(ErrorKind::unsupported, "device '" + d + "' is not built into this tokenmill (devices: " + devices +
                                         "); rebuild with pip install . -C cmake.define." + flag + "=ON");
    }
    fail(ErrorKind::invalid_arg, "unknown device '" + d + "' (known: cpu, cuda, hip)");
}

}  // namespace tmill
