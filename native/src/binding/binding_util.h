// Argument and error conventions shared by the addon's binding files: engine errors become JS errors carrying the
// engine's message and code "QLORA_ENGINE"; bad arguments become TypeError/RangeError naming the argument.
#pragma once
#include <napi.h>

#include <exception>
#include <optional>
#include <string>

namespace qlora::binding {

template <typename F>
auto guarded(const Napi::Env& env, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    Napi::Error err = Napi::Error::New(env, e.what());
    err.Set("code", Napi::String::New(env, "QLORA_ENGINE"));
    throw err;
  }
}

inline std::string string_arg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsString())
    throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

inline Napi::Object options_arg(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || info[i].IsUndefined() || info[i].IsNull()) return Napi::Object::New(info.Env());
  if (!info[i].IsObject()) throw Napi::TypeError::New(info.Env(), "options must be an object");
  return info[i].As<Napi::Object>();
}

inline std::optional<double> opt_number(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return std::nullopt;
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

// A whole number of 0 or more (a count that may be none).
inline std::optional<int64_t> opt_whole(const Napi::Object& o, const char* key) {
  const std::optional<double> v = opt_number(o, key);
  if (!v) return std::nullopt;
  if (!(*v >= 0) || *v > 9.0e15 || *v != static_cast<double>(static_cast<int64_t>(*v)))
    throw Napi::RangeError::New(o.Env(), std::string(key) + " must be a whole number");
  return static_cast<int64_t>(*v);
}

inline std::optional<bool> opt_bool(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return std::nullopt;
  if (!v.IsBoolean()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

inline std::optional<std::string> opt_string(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return std::nullopt;
  if (!v.IsString()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

}  // namespace qlora::binding
