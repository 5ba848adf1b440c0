#include "core/json.h"

#include <cmath>
#include <cstdlib>

#include "core/error.h"

namespace tmill {

const JsonValue* JsonValue::get(const std::string& key) const {
    auto it = object.find(key);
    return it == object.end() ? nullptr : &it->second;
}

namespace {

constexpr int kMaxDepth = 32;

class Parser {
public:
    Parser(const std::string& text, const std::string& what) : s_(text), what_(what) {}

    JsonValue parse_document() {
        JsonValue v = value(0);
        skip_ws();
        if (i_ != s_.size()) bad("trailing characters");
        return v;
    }

private:
    [[noreturn]] void bad(const std::string& msg) const {
        fail(ErrorKind::format, what_ + ": invalid JSON (" + msg + " at offset " + std::to_string(i_) + ")");
    }

    void skip_ws() {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
    }

    char peek() {
        skip_ws();
        if (i_ >= s_.size()) bad("unexpected end");
        return s_[i_];
    }

    void expect(char c) {
        if (peek() != c) bad(std::string("expected '") + c + "'");
        ++i_;
    }

    bool literal(const char* word) {
        size_t n = std::char_traits<char>::length(word);
        if (s_.compare(i_, n, word) != 0) return false;
        i_ += n;
        return true;
    }

    JsonValue value(int depth) {
        if (depth > kMaxDepth) bad("nesting too deep");
        JsonValue v;
        char c = peek();
        if (c == '{') {
            v.kind = JsonValue::Kind::object;
            ++i_;
            if (peek() == '}') { ++i_; return v; }
            for (;;) {
                if (peek() != '"') bad("expected a key");
                std::string key = string_body();
                expect(':');
                JsonValue item = value(depth + 1);
                if (!v.object.emplace(std::move(key), std::move(item)).second) bad("duplicate key");
                if (peek() == ',') { ++i_; continue; }
                expect('}');
                return v;
            }
        }
        if (c == '[') {
            v.kind = JsonValue::Kind::array;
            ++i_;
            if (peek() == ']') { ++i_; return v; }
            for (;;) {
                v.array.push_back(value(depth + 1));
                if (peek() == ',') { ++i_; continue; }
                expect(']');
                return v;
            }
        }
        if (c == '"') {
            v.kind = JsonValue::Kind::string;
            v.string = string_body();
            return v;
        }
        if (literal("true")) { v.kind = JsonValue::Kind::boolean; v.boolean = true; return v; }
        if (literal("false")) { v.kind = JsonValue::Kind::boolean; return v; }
        if (literal("null")) return v;
        return number();
    }

    JsonValue number() {
        size_t start = i_;
        if (i_ < s_.size() && s_[i_] == '-') ++i_;
        bool integral = true;
        while (i_ < s_.size()) {
            char c = s_[i_];
            if (c >= '0' && c <= '9') { ++i_; continue; }
            if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { integral = false; ++i_; continue; }
            break;
        }
        std::string tok = s_.substr(start, i_ - start);
        if (tok.empty() || tok == "-") bad("unexpected character");
        char* end = nullptr;
        JsonValue v;
        v.kind = JsonValue::Kind::number;
        v.number = std::strtod(tok.c_str(), &end);
        if (end != tok.c_str() + tok.size() || !std::isfinite(v.number)) bad("bad number '" + tok + "'");
        if (integral && tok.size() <= 18) {
            v.is_integer = true;
            v.integer = std::strtoll(tok.c_str(), nullptr, 10);
        }
        return v;
    }

    void append_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    uint32_t hex4() {
        if (i_ + 4 > s_.size()) bad("short \\u escape");
        uint32_t cp = 0;
        for (int k = 0; k < 4; ++k) {
            char c = s_[i_++];
            cp <<= 4;
            if (c >= '0' && c <= '9') cp |= c - '0';
            else if (c >= 'a' && c <= 'f') cp |= c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') cp |= c - 'A' + 10;
            else bad("bad \\u escape");
        }
        return cp;
    }

    std::string string_body() {
        ++i_;  // opening quote
        std::string out;
        while (i_ < s_.size()) {
            char c = s_[i_++];
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) bad("control character in string");
            if (c != '\\') { out += c; continue; }
            if (i_ >= s_.size()) break;
            char e = s_[i_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && i_ + 1 < s_.size() && s_[i_] == '\\' && s_[i_ + 1] == 'u') {
                        i_ += 2;
                        uint32_t lo = hex4();
                        if (lo < 0xDC00 || lo > 0xDFFF) bad("bad surrogate pair");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    append_utf8(out, cp);
                    break;
                }
                default: bad("bad escape");
            }
        }
        bad("unterminated string");
    }

    const std::string& s_;
    std::string what_;
    size_t i_ = 0;
};

}  // namespace

JsonValue parse_json(const std::string& text, const std::string& what) { return Parser(text, what).parse_document(); }

}  // namespace tmill
