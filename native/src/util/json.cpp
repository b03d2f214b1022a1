#include "util/json.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "util/error.h"

namespace qlora::json {

namespace {

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

class Parser {
 public:
  Parser(std::string_view text, const std::string& source) : text_(text), source_(source) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != text_.size()) error("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& what) const { fail(source_, ": invalid JSON at byte ", pos_, ": ", what); }

  void skip_ws() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }

  bool consume(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Value parse_value(int depth) {
    if (depth > 256) error("nesting deeper than 256 levels");
    if (pos_ >= text_.size()) error("unexpected end of input");
    const char c = text_[pos_];
    if (c == '{') return parse_object(depth);
    if (c == '[') return parse_array(depth);
    if (c == '"') return Value::string(parse_string());
    if (consume("true")) return Value::boolean(true);
    if (consume("false")) return Value::boolean(false);
    if (consume("null")) return Value::null();
    // Python's json.dumps writes these for non-finite floats; accept them on input.
    if (consume("NaN")) return Value::number(NAN);
    if (consume("Infinity")) return Value::number(INFINITY);
    if (consume("-Infinity")) return Value::number(-INFINITY);
    if (c == '-' || (c >= '0' && c <= '9')) return Value::number(parse_number());
    error(std::string("unexpected character '") + c + "'");
  }

  double parse_number() {
    const size_t start = pos_;
    if (text_[pos_] == '-') ++pos_;
    auto digits = [&] {
      const size_t s = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      return pos_ > s;
    };
    if (!digits()) error("a number needs digits");
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      if (!digits()) error("a number needs digits after '.'");
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (!digits()) error("a number needs digits in its exponent");
    }
    // strtod needs a terminated string; numbers are short, so copy.
    const std::string copy(text_.substr(start, pos_ - start));
    return std::strtod(copy.c_str(), nullptr);
  }

  unsigned parse_hex4() {
    if (pos_ + 4 > text_.size()) error("unexpected end of input in \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<unsigned>(h - 'A' + 10);
      else error("bad hex digit in \\u escape");
    }
    return v;
  }

  static void append_utf8(std::string& out, unsigned cp) {
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

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (pos_ >= text_.size()) error("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) error("unterminated escape");
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
          unsigned cp = parse_hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!consume("\\u")) error("high surrogate without a low surrogate");
            const unsigned low = parse_hex4();
            if (low < 0xDC00 || low > 0xDFFF) error("bad low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            error("lone low surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: error(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  Value parse_array(int depth) {
    ++pos_;
    Value arr = Value::array();
    skip_ws();
    if (pos_ < text_.size() && text_[pos_] == ']') {
      ++pos_;
      return arr;
    }
    for (;;) {
      skip_ws();
      arr.push_back(parse_value(depth + 1));
      skip_ws();
      if (pos_ >= text_.size()) error("unterminated array");
      if (text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (text_[pos_] == ']') {
        ++pos_;
        return arr;
      }
      error("expected ',' or ']' in array");
    }
  }

  Value parse_object(int depth) {
    ++pos_;
    Value obj = Value::object();
    skip_ws();
    if (pos_ < text_.size() && text_[pos_] == '}') {
      ++pos_;
      return obj;
    }
    for (;;) {
      skip_ws();
      if (pos_ >= text_.size() || text_[pos_] != '"') error("expected a quoted key in object");
      std::string key = parse_string();
      skip_ws();
      if (pos_ >= text_.size() || text_[pos_] != ':') error("expected ':' after key");
      ++pos_;
      skip_ws();
      obj.set(key, parse_value(depth + 1));
      skip_ws();
      if (pos_ >= text_.size()) error("unterminated object");
      if (text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (text_[pos_] == '}') {
        ++pos_;
        return obj;
      }
      error("expected ',' or '}' in object");
    }
  }

  std::string_view text_;
  const std::string& source_;
  size_t pos_ = 0;
};

void dump_to(const Value& v, std::string& out, bool py) {
  switch (v.type()) {
    case Value::Type::Null: out += "null"; break;
    case Value::Type::Bool: out += v.as_bool("") ? "true" : "false"; break;
    case Value::Type::Number: {
      const double d = v.as_number("");
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

Value Value::parse(std::string_view text, const std::string& source_name) {
  return Parser(text, source_name).parse_document();
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
  if (number_ != std::floor(number_) || std::fabs(number_) > 9.007199254740992e15)
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
  for (const auto& [k, v] : object_)
    if (k == key) return &v;
  return nullptr;
}

void Value::push_back(Value v) {
  if (type_ != Type::Array) fail("json: push_back on ", type_name(type_));
  array_.push_back(std::move(v));
}

void Value::set(const std::string& key, Value v) {
  if (type_ != Type::Object) fail("json: set on ", type_name(type_));
  for (auto& [k, existing] : object_)
    if (k == key) {
      existing = std::move(v);
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
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof(buf), d);
  std::string s(buf, result.ptr);
  // Python's repr switches to exponent form at 1e16 and below 1e-4; to_chars' shortest form picks whichever is
  // shorter. Normalize to Python's choice for the values we write (quant state offsets, config floats).
  const double a = std::fabs(d);
  if (a != 0.0 && (a < 1e-4 || a >= 1e16)) {
    const auto sci = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
    s.assign(buf, sci.ptr);
    // Python writes two-digit exponents at least: 1e-05.
    const size_t e = s.find('e');
    if (e != std::string::npos) {
      std::string mant = s.substr(0, e), exp = s.substr(e + 1);
      const char sign = exp[0] == '-' ? '-' : '+';
      if (exp[0] == '-' || exp[0] == '+') exp = exp.substr(1);
      if (exp.size() < 2) exp = "0" + exp;
      s = mant + "e" + sign + exp;
    }
    return s;
  }
  if (s.find_first_of(".e") == std::string::npos) {
    const auto fixed = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::fixed);
    s.assign(buf, fixed.ptr);
    s += ".0";
  }
  return s;
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
