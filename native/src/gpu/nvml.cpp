#include "gpu/nvml.h"

#include <cstdint>
#include <mutex>

namespace qlora::gpu {

namespace {

// ---- our declarations of the few NVML functions used (nvml.h, stable C ABI) ----
using nvmlReturn_t = int;
using nvmlDevice_t = struct nvmlDevice_st*;
struct nvmlMemory_t {
  unsigned long long total, free, used;
};
struct nvmlUtilization_t {
  unsigned int gpu, memory;
};
constexpr int kNvmlTemperatureGpu = 0;


}  // namespace

struct Nvml::Functions {
  nvmlReturn_t (*shutdown)() = nullptr;
  nvmlReturn_t (*driver_version)(char*, unsigned int) = nullptr;
  nvmlReturn_t (*count)(unsigned int*) = nullptr;
  nvmlReturn_t (*handle)(unsigned int, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*name)(nvmlDevice_t, char*, unsigned int) = nullptr;
  nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
  nvmlReturn_t (*capability)(nvmlDevice_t, int*, int*) = nullptr;
  nvmlReturn_t (*utilization)(nvmlDevice_t, nvmlUtilization_t*) = nullptr;
  nvmlReturn_t (*temperature)(nvmlDevice_t, int, unsigned int*) = nullptr;
  nvmlReturn_t (*power)(nvmlDevice_t, unsigned int*) = nullptr;
  nvmlReturn_t (*by_bus_id)(const char*, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*index)(nvmlDevice_t, unsigned int*) = nullptr;
};

Nvml::Nvml(std::unique_ptr<Functions> f) : f_(std::move(f)) {}

Nvml::~Nvml() { f_->shutdown(); }

std::unique_ptr<Nvml> Nvml::open(const std::vector<std::string>& dirs, bool windows, Library* library,
                                 std::string* note) {
  *library = load_library(nvml_names(windows), dirs);
  if (!library->found()) return nullptr;  // the driver's absence is reported by the probe itself
  const auto init = library->function<nvmlReturn_t (*)()>("nvmlInit_v2");
  const auto error_string = library->function<const char* (*)(nvmlReturn_t)>("nvmlErrorString");
  auto f = std::make_unique<Functions>();
  f->shutdown = library->function<decltype(f->shutdown)>("nvmlShutdown");
  if (!init || !f->shutdown) {
    *note = "NVML at " + library->path + " lacks nvmlInit_v2; GPU telemetry is unavailable.";
    return nullptr;
  }
  if (const nvmlReturn_t e = init(); e != 0) {
    *note = std::string("NVML could not start (") + (error_string ? error_string(e) : "error") +
            "); GPU telemetry is unavailable.";
    return nullptr;
  }
  f->driver_version = library->function<decltype(f->driver_version)>("nvmlSystemGetDriverVersion");
  f->count = library->function<decltype(f->count)>("nvmlDeviceGetCount_v2");
  f->handle = library->function<decltype(f->handle)>("nvmlDeviceGetHandleByIndex_v2");
  f->name = library->function<decltype(f->name)>("nvmlDeviceGetName");
  f->memory = library->function<decltype(f->memory)>("nvmlDeviceGetMemoryInfo");
  f->capability = library->function<decltype(f->capability)>("nvmlDeviceGetCudaComputeCapability");
  f->utilization = library->function<decltype(f->utilization)>("nvmlDeviceGetUtilizationRates");
  f->temperature = library->function<decltype(f->temperature)>("nvmlDeviceGetTemperature");
  f->power = library->function<decltype(f->power)>("nvmlDeviceGetPowerUsage");
  f->by_bus_id = library->function<decltype(f->by_bus_id)>("nvmlDeviceGetHandleByPciBusId_v2");
  f->index = library->function<decltype(f->index)>("nvmlDeviceGetIndex");
  return std::unique_ptr<Nvml>(new Nvml(std::move(f)));
}

std::string Nvml::driver_version() const {
  char text[96] = {0};
  return f_->driver_version && f_->driver_version(text, sizeof text) == 0 ? std::string(text) : std::string();
}

std::vector<GpuInfo> Nvml::sample() const {
  std::vector<GpuInfo> out;
  unsigned int count = 0;
  if (!f_->count || !f_->handle || f_->count(&count) != 0) return out;
  for (unsigned int i = 0; i < count; ++i) {
    nvmlDevice_t dev = nullptr;
    if (f_->handle(i, &dev) != 0) continue;
    GpuInfo g;
    g.index = static_cast<int>(i);
    char name[96] = {0};
    if (f_->name && f_->name(dev, name, sizeof name) == 0) g.name = name;
    nvmlMemory_t mem{};
    if (f_->memory && f_->memory(dev, &mem) == 0) {
      g.memory_total = mem.total;
      g.memory_free = mem.free;
      g.memory_used = mem.used;
    }
    if (f_->capability) f_->capability(dev, &g.cc_major, &g.cc_minor);
    nvmlUtilization_t u{};
    if (f_->utilization && f_->utilization(dev, &u) == 0) g.utilization = static_cast<int>(u.gpu);
    unsigned int t = 0;
    if (f_->temperature && f_->temperature(dev, kNvmlTemperatureGpu, &t) == 0) g.temperature = static_cast<int>(t);
    unsigned int mw = 0;
    if (f_->power && f_->power(dev, &mw) == 0) g.power_w = mw / 1000.0;
    out.push_back(g);
  }
  return out;
}

int Nvml::index_of_bus_id(const std::string& bus_id) const {
  nvmlDevice_t dev = nullptr;
  unsigned int index = 0;
  if (!f_->by_bus_id || !f_->index || f_->by_bus_id(bus_id.c_str(), &dev) != 0 || f_->index(dev, &index) != 0) return -1;
  return static_cast<int>(index);
}

const Nvml* telemetry_nvml(const std::string& library_dir) {
  static std::once_flag once;
  static std::unique_ptr<Nvml> nvml;
  std::call_once(once, [&] {
    const SearchEnv env = current_search_env(library_dir);
    Library library;
    std::string note;
    nvml = Nvml::open(search_dirs(env), env.windows, &library, &note);
  });
  return nvml.get();
}

}  // namespace qlora::gpu
