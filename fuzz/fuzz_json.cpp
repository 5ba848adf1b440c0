// libFuzzer target: the JSON parser behind safetensors headers on arbitrary text.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "core/json.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        tmill::parse_json(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json");
    } catch (const tmill::Error&) {
    }
    return 0;
}
