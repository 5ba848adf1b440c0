// A small, strict JSON parser for safetensors headers (bounded depth, no exceptions escape except
// tmill::Error(format)). Numbers are kept as double plus an exact int64 when integral.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tmill {

struct JsonValue {
    enum class Kind { null, boolean, number, string, array, object } kind = Kind::null;
    bool boolean = false;
    double number = 0.0;
    int64_t integer = 0;       // valid when is_integer
    bool is_integer = false;
    std::string string;
    std::vector<JsonValue> array;
    std::map<std::string, JsonValue> object;

    const JsonValue* get(const std::string& key) const;
};

// Parses `text`; `what` names the source in error messages.
JsonValue parse_json(const std::string& text, const std::string& what);

}  // namespace tmill
