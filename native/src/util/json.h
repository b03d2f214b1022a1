// A small JSON reader/writer for the few JSON files the engine reads (config.json, adapter_config.json,
// safetensors headers, bnb quant states, model.safetensors.index.json). Numbers are kept as double; object keys
// keep their order. Parse errors name the source and the byte offset.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qlora::json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Value() = default;
  static Value null() { return Value(); }
  static Value boolean(bool b);
  static Value number(double d);
  static Value string(std::string s);
  static Value array(std::vector<Value> items = {});
  static Value object(std::vector<std::pair<std::string, Value>> members = {});

  // Parses `text`; on error throws EngineError "<source_name>: invalid JSON at byte N: <what>". A key repeated in
  // one object keeps its first position and takes the last value, as Python's json does. With
  // `keep_duplicate_keys` every member is kept instead (find() returns the last), so a reader that must reject
  // repeated names (safetensors headers) can see them.
  static Value parse(std::string_view text, const std::string& source_name, bool keep_duplicate_keys = false);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Accessors throw EngineError "<what>: expected <type>, got <type>" on a type mismatch; `what` names the
  // file and key for the message (e.g. "config.json: hidden_size").
  bool as_bool(const std::string& what) const;
  double as_number(const std::string& what) const;
  int64_t as_int(const std::string& what) const;  // also rejects non-integral numbers
  const std::string& as_string(const std::string& what) const;
  const std::vector<Value>& as_array(const std::string& what) const;
  const std::vector<std::pair<std::string, Value>>& as_object(const std::string& what) const;

  // Object lookup: nullptr when this is not an object or the key is absent; the last member of that name.
  const Value* find(const std::string& key) const;

  // Mutating helpers for building documents.
  void push_back(Value v);                        // arrays
  void set(const std::string& key, Value v);      // objects: replaces an existing key in place or appends

  // Compact serialization; `python_style` uses ", " and ": " separators as Python's json.dumps does.
  std::string dump(bool python_style = false) const;

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  std::vector<Value> array_;
  std::vector<std::pair<std::string, Value>> object_;
};

// Shortest decimal text that reads back as the same double, laid out as Python's repr does: 0.1279611587524414,
// 1.0, 1e-05, 1e+16. Non-finite values give NaN, Infinity, -Infinity, as Python's json.dumps writes them.
std::string format_double(double d);
// A JSON string literal: quotes, backslashes and control characters escaped; other bytes (UTF-8) kept as they are.
std::string quote(std::string_view s);

}  // namespace qlora::json
