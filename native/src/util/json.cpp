#include "util/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <system_error>
#include <unordered_map>

#include "util/error.h"

namespace qlora::json {

namespace {

// Deeper nesting than this is no real config or header; the limit keeps a hostile file from overflowing the stack.
constexpr int kMaxDepth = 256;

const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a boolean";
    case Value::Type::Number: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    case Value::Type::Object: return "an object";
  }
  return "?";
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

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

class Parser {
 public:
  Parser(std::string_view text, const std::string& source, bool keep_duplicates)
      : text_(text), source_(source), keep_duplicates_(keep_duplicates) {}

  Value parse_document() {
    // Editors on Windows sometimes save config.json with a UTF-8 byte order mark; it carries no content.
    if (text_.substr(0, 3) == "\xEF\xBB\xBF") pos_ = 3;
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != text_.size()) error("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& what) const { fail(source_, ": invalid JSON at byte ", pos_, ": ", what); }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }

  void skip_ws() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  bool consume(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) error("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    if (at_end()) error("unexpected end of input");
    const char c = peek();
    if (c == '{') return parse_object(depth);
    if (c == '[') return parse_array(depth);
    if (c == '"') return Value::string(parse_string());
    if (consume("true")) return Value::boolean(true);
    if (consume("false")) return Value::boolean(false);
    if (consume("null")) return Value::null();
    // Python's json.dumps writes these for non-finite floats (configs and quant states come from Python).
    if (consume("NaN")) return Value::number(std::numeric_limits<double>::quiet_NaN());
    if (consume("Infinity")) return Value::number(std::numeric_limits<double>::infinity());
    if (consume("-Infinity")) return Value::number(-std::numeric_limits<double>::infinity());
    if (c == '-' || is_digit(c)) return Value::number(parse_number());
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7F)
      error("unexpected byte " + std::to_string(static_cast<unsigned char>(c)));
    error(std::string("unexpected character '") + c + "'");
  }

  // Validates the JSON number grammar, then converts with from_chars, which, unlike strtod, ignores the C locale
  // (a host process that sets a German locale would otherwise read "0.5" as 0).
  double parse_number() {
    const size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (at_end() || !is_digit(peek())) error("a number needs digits");
    if (peek() == '0' && pos_ + 1 < text_.size() && is_digit(text_[pos_ + 1])) error("leading zeros are not allowed");
    while (!at_end() && is_digit(peek())) ++pos_;
    if (!at_end() && peek() == '.') {
      ++pos_;
      if (at_end() || !is_digit(peek())) error("a number needs digits after '.'");
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (at_end() || !is_digit(peek())) error("a number needs digits in its exponent");
      while (!at_end() && is_digit(peek())) ++pos_;
    }
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    double value = 0.0;
    const auto result = std::from_chars(first, last, value);
    if (result.ec == std::errc::result_out_of_range) return out_of_range_value(std::string_view(first, pos_ - start));
    if (result.ec != std::errc() || result.ptr != last) {
      pos_ = start;
      error("malformed number");
    }
    return value;
  }

  // from_chars leaves the value alone when it does not fit a double; Python reads such literals as ±inf (1e400)
  // or ±0 (1e-400). Which one follows from the decimal exponent of the first significant digit.
  static double out_of_range_value(std::string_view s) {
    const bool negative = !s.empty() && s[0] == '-';
    if (negative) s.remove_prefix(1);
    int64_t magnitude = 0;  // decimal exponent of the leading significant digit, before the 'e' part
    size_t i = 0;
    int64_t int_digits = 0;
    bool seen_significant = false;
    for (; i < s.size() && is_digit(s[i]); ++i) {
      if (s[i] != '0') seen_significant = true;
      if (seen_significant) ++int_digits;
    }
    if (seen_significant) {
      magnitude = int_digits - 1;
    } else if (i < s.size() && s[i] == '.') {
      int64_t zeros = 0;
      for (++i; i < s.size() && s[i] == '0'; ++i) ++zeros;
      seen_significant = i < s.size() && is_digit(s[i]);
      magnitude = -zeros - 1;
    }
    if (!seen_significant) return negative ? -0.0 : 0.0;  // 0e999 is zero whatever the exponent
    int64_t exponent = 0;
    const size_t e = s.find_first_of("eE");
    if (e != std::string_view::npos) {
      size_t j = e + 1;
      const bool exp_negative = j < s.size() && s[j] == '-';
      if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
      for (; j < s.size(); ++j) exponent = std::min<int64_t>(exponent * 10 + (s[j] - '0'), int64_t{1} << 40);
      if (exp_negative) exponent = -exponent;
    }
    const double v = magnitude + exponent > 0 ? std::numeric_limits<double>::infinity() : 0.0;
    return negative ? -v : v;
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > text_.size()) error("unexpected end of input in \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<uint32_t>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<uint32_t>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<uint32_t>(h - 'A' + 10);
      else error("bad hex digit in \\u escape");
      ++pos_;
    }
    return v;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) error("unterminated string");
      const char c = text_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) error("control character in string (must be escaped)");
      ++pos_;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (at_end()) error("unterminated escape");
      const char e = text_[pos_++];
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
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            // Characters outside the BMP arrive as a UTF-16 surrogate pair: \ud83d\ude80.
            if (!consume("\\u")) error("high surrogate not followed by a low surrogate");
            const uint32_t low = parse_hex4();
            if (low < 0xDC00 || low > 0xDFFF) error("high surrogate not followed by a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            error("low surrogate without a high surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default:
          --pos_;
          error(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  Value parse_array(int depth) {
    ++pos_;
    std::vector<Value> items;
    skip_ws();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return Value::array(std::move(items));
    }
    for (;;) {
      skip_ws();
      items.push_back(parse_value(depth + 1));
      skip_ws();
      if (at_end()) error("unterminated array");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return Value::array(std::move(items));
      }
      error("expected ',' or ']' in array");
    }
  }

  Value parse_object(int depth) {
    ++pos_;
    std::vector<std::pair<std::string, Value>> members;
    // Position of each key, so repeated keys resolve in O(1) even for headers with many thousands of tensors.
    std::unordered_map<std::string, size_t> position;
    skip_ws();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return Value::object(std::move(members));
    }
    for (;;) {
      skip_ws();
      if (at_end() || peek() != '"') error("expected a quoted key in object");
      std::string key = parse_string();
      skip_ws();
      if (at_end() || peek() != ':') error("expected ':' after key");
      ++pos_;
      skip_ws();
      Value value = parse_value(depth + 1);
      const auto [it, inserted] = position.emplace(key, members.size());
      if (inserted || keep_duplicates_) {
        members.emplace_back(std::move(key), std::move(value));
      } else {
        members[it->second].second = std::move(value);
      }
      skip_ws();
      if (at_end()) error("unterminated object");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return Value::object(std::move(members));
      }
      error("expected ',' or '}' in object");
    }
  }

  std::string_view text_;
  const std::string& source_;
  bool keep_duplicates_;
  size_t pos_ = 0;
};

void dump_to(const Value& v, std::string& out, bool py) {
  switch (v.type()) {
    case Value::Type::Null: out += "null"; break;
    case Value::Type::Bool: out += v.as_bool("") ? "true" : "false"; break;
    case Value::Type::Number: {
      const double d = v.as_number("");
      // Counts, shapes and offsets are held as doubles; print them as the integers they are.
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 1e15) {
        out += std::to_string(static_cast<int64_t>(d));
      } else {
        out += format_double(d);
      }
      break;
    }
    case Value::Type::String: out += quote(v.as_string("")); break;
    case Value::Type::Array: {
      out += '[';
      bool first = true;
      for (const Value& item : v.as_array("")) {
        if (!first) out += py ? ", " : ",";
        first = false;
        dump_to(item, out, py);
      }
      out += ']';
      break;
    }
    case Value::Type::Object: {
      out += '{';
      bool first = true;
      for (const auto& [key, item] : v.as_object("")) {
        if (!first) out += py ? ", " : ",";
        first = false;
        out += quote(key);
        out += py ? ": " : ":";
        dump_to(item, out, py);
      }
      out += '}';
      break;
    }
  }
}

}  // namespace

Value Value::boolean(bool b) {
  Value v;
  v.type_ = Type::Bool;
  v.bool_ = b;
  return v;
}
Value Value::number(double d) {
  Value v;
  v.type_ = Type::Number;
  v.number_ = d;
  return v;
}
Value Value::string(std::string s) {
  Value v;
  v.type_ = Type::String;
  v.string_ = std::move(s);
  return v;
}
Value Value::array(std::vector<Value> items) {
  Value v;
  v.type_ = Type::Array;
  v.array_ = std::move(items);
  return v;
}
Value Value::object(std::vector<std::pair<std::string, Value>> members) {
  Value v;
  v.type_ = Type::Object;
  v.object_ = std::move(members);
  return v;
}

Value Value::parse(std::string_view text, const std::string& source_name, bool keep_duplicate_keys) {
  return Parser(text, source_name, keep_duplicate_keys).parse_document();
}

#define QLORA_JSON_EXPECT(kind)                                                                        \
  if (type_ != Type::kind) fail(what, ": expected ", type_name(Type::kind), ", got ", type_name(type_))

bool Value::as_bool(const std::string& what) const {
  QLORA_JSON_EXPECT(Bool);
  return bool_;
}
double Value::as_number(const std::string& what) const {
  QLORA_JSON_EXPECT(Number);
  return number_;
}
int64_t Value::as_int(const std::string& what) const {
  QLORA_JSON_EXPECT(Number);
  // Beyond 2^53 a double no longer holds every integer, so the value may not be the one the file wrote.
  if (!std::isfinite(number_) || number_ != std::floor(number_) || std::fabs(number_) > 9007199254740992.0)
    fail(what, ": expected an integer, got ", format_double(number_));
  return static_cast<int64_t>(number_);
}
const std::string& Value::as_string(const std::string& what) const {
  QLORA_JSON_EXPECT(String);
  return string_;
}
const std::vector<Value>& Value::as_array(const std::string& what) const {
  QLORA_JSON_EXPECT(Array);
  return array_;
}
const std::vector<std::pair<std::string, Value>>& Value::as_object(const std::string& what) const {
  QLORA_JSON_EXPECT(Object);
  return object_;
}
#undef QLORA_JSON_EXPECT

const Value* Value::find(const std::string& key) const {
  if (type_ != Type::Object) return nullptr;
  for (auto it = object_.rbegin(); it != object_.rend(); ++it)
    if (it->first == key) return &it->second;
  return nullptr;
}

void Value::push_back(Value v) {
  if (type_ != Type::Array) fail("json: push_back on ", type_name(type_));
  array_.push_back(std::move(v));
}

void Value::set(const std::string& key, Value v) {
  if (type_ != Type::Object) fail("json: set on ", type_name(type_));
  for (auto it = object_.rbegin(); it != object_.rend(); ++it)
    if (it->first == key) {
      it->second = std::move(v);
      return;
    }
  object_.emplace_back(key, std::move(v));
}

std::string Value::dump(bool python_style) const {
  std::string out;
  dump_to(*this, out, python_style);
  return out;
}

std::string format_double(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  // to_chars in scientific form gives the shortest digits that round-trip: "-1.2345e-05". Python's repr uses the
  // same digits and picks the layout by the decimal exponent: positional when -5 < exponent < 16, else scientific.
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  const std::string_view sci(buf, static_cast<size_t>(result.ptr - buf));
  const size_t e = sci.find('e');
  std::string_view mantissa = sci.substr(0, e);
  int exponent = 0;
  (void)std::from_chars(sci.data() + e + 1 + (sci[e + 1] == '+' ? 1 : 0), sci.data() + sci.size(), exponent);

  std::string out;
  if (!mantissa.empty() && mantissa[0] == '-') {
    out += '-';
    mantissa.remove_prefix(1);
  }
  std::string digits;
  for (const char c : mantissa)
    if (c != '.') digits += c;

  if (exponent > -5 && exponent < 16) {
    if (exponent < 0) {
      out += "0.";
      out.append(static_cast<size_t>(-exponent - 1), '0');
      out += digits;
    } else {
      const size_t int_len = static_cast<size_t>(exponent) + 1;
      if (digits.size() <= int_len) {
        out += digits;
        out.append(int_len - digits.size(), '0');
        out += ".0";
      } else {
        out += digits.substr(0, int_len);
        out += '.';
        out += digits.substr(int_len);
      }
    }
    return out;
  }
  out += digits[0];
  if (digits.size() > 1) {
    out += '.';
    out += digits.substr(1);
  }
  // Python writes at least two exponent digits, with a sign: 1e-05, 1e+16.
  char exp_buf[16];
  std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exponent < 0 ? '-' : '+', exponent < 0 ? -exponent : exponent);
  out += exp_buf;
  return out;
}

std::string quote(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

}  // namespace qlora::json
