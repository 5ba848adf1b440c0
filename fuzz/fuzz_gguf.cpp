// libFuzzer target: the GGUF reader on arbitrary bytes. A parse either fails with tmill::Error or
// yields metadata and tensors whose every byte lies inside the input (read here, so AddressSanitizer
// sees any range that escapes it), and the hyper-parameter reader on top behaves the same.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "io/gguf.h"
#include "model/arch.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace tmill;
    try {
        GGUFFile f(MappedFile::from_bytes(data, size, "fuzz.gguf"));
        volatile uint8_t sink = 0;
        for (const GGUFTensorInfo& t : f.tensors())
            for (size_t i = 0; i < t.nbytes; i += 61) sink = sink + t.data[i];
        for (const auto& [key, value] : f.metadata()) sink = sink + static_cast<uint8_t>(key.size() + value.array_size());
        HParams hp = hparams_from_gguf(f);
        validate_hparams(hp, "fuzz.gguf");
    } catch (const Error&) {
    }
    return 0;
}
