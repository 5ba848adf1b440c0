// libFuzzer target: the safetensors reader (header length, JSON header, byte ranges) on arbitrary
// bytes; every tensor it accepts is read end to end.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace tmill;
    try {
        SafetensorsFile f(MappedFile::from_bytes(data, size, "fuzz.safetensors"));
        volatile uint8_t sink = 0;
        for (const auto& [name, t] : f.tensors())
            for (size_t i = 0; i < t.nbytes; i += 61) sink = sink + t.data[i];
    } catch (const Error&) {
    }
    return 0;
}
