// The binding of the GPU probe (src/gpu/probe.h): gpuReport(libraryDir?) for `doctor`, the extension's GPU-setup
// check and the trainer's device choice; gpuTelemetry(libraryDir?) for the trainer's `gpu` events.
#include <napi.h>

#include <string>
#include <vector>

#include "gpu/probe.h"

namespace {

Napi::Array strings_to_js(Napi::Env env, const std::vector<std::string>& list) {
  Napi::Array out = Napi::Array::New(env, list.size());
  for (size_t i = 0; i < list.size(); ++i) out.Set(static_cast<uint32_t>(i), list[i]);
  return out;
}

Napi::Object library_to_js(Napi::Env env, const qlora::gpu::LibraryReport& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("found", r.found);
  o.Set("path", r.found ? Napi::Value(Napi::String::New(env, r.path)) : env.Null());
  o.Set("tried", strings_to_js(env, r.tried));
  o.Set("searched", strings_to_js(env, r.searched));  // "" is the loader's own search path
  o.Set("error", r.error.empty() ? env.Null() : Napi::Value(Napi::String::New(env, r.error)));
  return o;
}

Napi::Array gpus_to_js(Napi::Env env, const std::vector<qlora::gpu::GpuInfo>& list) {
  Napi::Array gpus = Napi::Array::New(env, list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const qlora::gpu::GpuInfo& g = list[i];
    Napi::Object go = Napi::Object::New(env);
    go.Set("index", g.index);
    go.Set("name", g.name);
    go.Set("memoryTotal", static_cast<double>(g.memory_total));
    go.Set("memoryUsed", static_cast<double>(g.memory_used));
    go.Set("memoryFree", static_cast<double>(g.memory_free));
    go.Set("computeCapability", std::to_string(g.cc_major) + "." + std::to_string(g.cc_minor));
    go.Set("utilization", g.utilization >= 0 ? Napi::Value(Napi::Number::New(env, g.utilization)) : env.Null());
    go.Set("temperature", g.temperature >= 0 ? Napi::Value(Napi::Number::New(env, g.temperature)) : env.Null());
    go.Set("powerW", g.power_w >= 0 ? Napi::Value(Napi::Number::New(env, g.power_w)) : env.Null());
    go.Set("cudaIndex", g.cuda_index >= 0 ? Napi::Value(Napi::Number::New(env, g.cuda_index)) : env.Null());
    gpus.Set(static_cast<uint32_t>(i), go);
  }
  return gpus;
}

// gpuTelemetry(libraryDir?) -> the GPUs now (as gpuReport's gpus), or null without NVML. NVML is started once and
// kept, so this is cheap enough to call every second.
Napi::Value GpuTelemetry(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string dir = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  const qlora::gpu::Nvml* nvml = qlora::gpu::telemetry_nvml(dir);
  if (!nvml) return env.Null();
  return gpus_to_js(env, nvml->sample());
}

Napi::Value GpuReport(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string dir = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  const qlora::gpu::GpuReport r = qlora::gpu::probe(dir);
  Napi::Object o = Napi::Object::New(env);
  o.Set("cudaCompiled", r.cuda_compiled);
  o.Set("cudaRuntimeVersion", r.runtime_version > 0 ? Napi::Value(Napi::String::New(env, qlora::gpu::cuda_version_text(r.runtime_version))) : env.Null());
  o.Set("driver", library_to_js(env, r.driver));
  o.Set("driverVersion", r.driver_version.empty() ? env.Null() : Napi::Value(Napi::String::New(env, r.driver_version)));
  o.Set("driverCudaVersion", r.driver_cuda_version > 0 ? Napi::Value(Napi::String::New(env, qlora::gpu::cuda_version_text(r.driver_cuda_version))) : env.Null());
  o.Set("nvml", library_to_js(env, r.nvml));
  o.Set("cublasLt", library_to_js(env, r.cublaslt));
  Napi::Array gpus = gpus_to_js(env, r.gpus);
  o.Set("gpus", gpus);
  o.Set("runtimeDevices", r.runtime_devices);
  o.Set("runtimeError", r.runtime_error.empty() ? env.Null() : Napi::Value(Napi::String::New(env, r.runtime_error)));
  o.Set("computeDtype", r.compute_dtype.empty() ? env.Null() : Napi::Value(Napi::String::New(env, r.compute_dtype)));
  o.Set("problems", strings_to_js(env, r.problems));
  o.Set("notes", strings_to_js(env, r.notes));
  return o;
}

}  // namespace

void register_gpu(Napi::Env env, Napi::Object exports) {
  exports.Set("gpuReport", Napi::Function::New(env, GpuReport));
  exports.Set("gpuTelemetry", Napi::Function::New(env, GpuTelemetry));
}
