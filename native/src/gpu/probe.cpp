#include "gpu/probe.h"

#include <sstream>

#include "cuda/runtime_probe.h"
#include "gpu/libraries.h"
#include "gpu/nvml.h"

namespace qlora::gpu {

namespace {

// ---- our declarations of the few driver and NVML functions used (cuda.h / nvml.h, stable C ABI) ----
using CUresult = int;
using CuInit = CUresult (*)(unsigned int);
using CuDriverGetVersion = CUresult (*)(int*);


LibraryReport report_of(const Library& lib, const std::vector<std::string>& dirs) {
  LibraryReport r;
  r.found = lib.found();
  r.path = lib.path;
  r.tried = lib.tried;
  r.searched = dirs;
  r.error = lib.error;
  return r;
}

// "the loader's search path (LD_LIBRARY_PATH and the system folders), /usr/local/cuda/lib64 and 3 more folders"
std::string where_looked(const LibraryReport& r, bool windows) {
  std::ostringstream s;
  size_t shown = 0;
  for (const std::string& d : r.searched) {
    if (shown == 4) break;
    s << (shown ? ", " : "")
      << (d.empty() ? (windows ? std::string("the DLL search path") : std::string("the loader's search path (LD_LIBRARY_PATH and the system folders)")) : d);
    ++shown;
  }
  if (r.searched.size() > shown) s << " and " << (r.searched.size() - shown) << " more folders";
  return s.str();
}

void probe_driver(GpuReport& report, const std::vector<std::string>& dirs, bool windows) {
  const Library lib = load_library(cuda_driver_names(windows), dirs);
  report.driver = report_of(lib, dirs);
  if (!lib.found()) {
    report.problems.push_back("No NVIDIA driver was found (" + cuda_driver_names(windows)[0] +
                              " could not be loaded" + (lib.error.empty() ? "" : ": " + lib.error) +
                              "); install the NVIDIA driver, 580 or newer, to train on a GPU.");
    return;
  }
  const auto init = lib.function<CuInit>("cuInit");
  const auto version = lib.function<CuDriverGetVersion>("cuDriverGetVersion");
  if (!init || !version || version(&report.driver_cuda_version) != 0) {
    report.problems.push_back("The NVIDIA driver library at " + lib.path +
                              " does not answer cuDriverGetVersion; reinstall the NVIDIA driver.");
    return;
  }
  if (const CUresult e = init(0); e != 0)
    report.problems.push_back("The NVIDIA driver is installed but cuInit failed with error " + std::to_string(e) +
                              " (is a GPU present, and is its kernel module loaded? nvidia-smi tells).");
}

std::unique_ptr<Nvml> probe_nvml(GpuReport& report, const std::vector<std::string>& dirs, bool windows) {
  Library library;
  std::string note;
  std::unique_ptr<Nvml> nvml = Nvml::open(dirs, windows, &library, &note);
  report.nvml = report_of(library, dirs);
  if (!note.empty()) report.notes.push_back(note);
  if (!nvml) return nullptr;
  report.driver_version = nvml->driver_version();
  report.gpus = nvml->sample();
  return nvml;
}

// Which NVML GPU each CUDA runtime device is (by PCI bus id); without NVML the runtime's own description of each.
void match_runtime_devices(GpuReport& report, const Nvml* nvml) {
  for (int i = 0; i < report.runtime_devices; ++i) {
    cuda::RuntimeDevice d;
    if (!cuda::runtime_device(i, nvml == nullptr, &d)) continue;
    const int index = nvml ? nvml->index_of_bus_id(d.pci_bus_id) : -1;
    for (GpuInfo& g : report.gpus)
      if (g.index == index) g.cuda_index = i;
    if (!nvml) {
      GpuInfo g;
      g.index = i;
      g.cuda_index = i;
      g.name = d.name;
      g.cc_major = d.cc_major;
      g.cc_minor = d.cc_minor;
      g.memory_total = d.memory_total;
      g.memory_free = d.memory_free;
      g.memory_used = d.memory_total - d.memory_free;
      report.gpus.push_back(g);
    }
  }
}

}  // namespace

std::string cuda_version_text(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

GpuReport probe(const std::string& library_dir) {
  GpuReport report;
  const SearchEnv env = current_search_env(library_dir);
  const std::vector<std::string> dirs = search_dirs(env);
  report.cuda_compiled = cuda::compiled();
  report.runtime_version = cuda::runtime_version();
  if (!report.cuda_compiled)
    report.problems.push_back("This build of the engine has no CUDA backend (nvcc was not found when it was built); "
                              "rebuild it on a machine with the CUDA 13 toolkit (npm ci).");

  // The driver and NVML come with the NVIDIA driver: the loader's own search first, the same folders after.
  probe_driver(report, dirs, env.windows);
  const std::unique_ptr<Nvml> nvml = probe_nvml(report, dirs, env.windows);
  if (report.driver.found && report.driver_cuda_version > 0 && report.driver_cuda_version < kMinDriverCudaVersion)
    report.problems.push_back("The NVIDIA driver" + (report.driver_version.empty() ? "" : " " + report.driver_version) +
                              " supports CUDA " + cuda_version_text(report.driver_cuda_version) +
                              "; the engine's CUDA 13 runtime needs driver 580 or newer: update the NVIDIA driver.");
  if (report.driver.found && report.nvml.found && report.gpus.empty())
    report.problems.push_back("The NVIDIA driver is installed but sees no GPU.");

  const Library cublas = load_library(cublaslt_names(env.windows), dirs);
  report.cublaslt = report_of(cublas, dirs);
  if (!cublas.found()) {
    report.problems.push_back(
        "cuBLASLt (" + cublaslt_names(env.windows)[0] + ") was not found in " + where_looked(report.cublaslt, env.windows) +
        ": install the CUDA 13 toolkit or the nvidia-cublas wheel for CUDA 13 (pip install nvidia-cublas), or set "
        "qlora.cudaLibraryPath (QLORA_CUDA_LIB_DIR) to the folder that holds it.");
  }

  if (report.cuda_compiled && report.driver.found) {
    report.runtime_devices = cuda::device_count(&report.runtime_error);
    match_runtime_devices(report, nvml.get());
  }

  // The engine trains on CUDA device 0; without the runtime's numbering (no CUDA), the first GPU NVML lists.
  const GpuInfo* trained_on = nullptr;
  for (const GpuInfo& g : report.gpus)
    if (g.cuda_index == 0) trained_on = &g;
  if (!trained_on && report.runtime_devices <= 0 && !report.gpus.empty()) trained_on = &report.gpus[0];
  if (trained_on) {
    const int cc = trained_on->cc_major * 10 + trained_on->cc_minor;
    if (cc > 0 && cc < kMinComputeCapability)
      report.problems.push_back("GPU " + std::to_string(trained_on->index) + " (" + trained_on->name +
                                ", compute capability " + std::to_string(trained_on->cc_major) + "." +
                                std::to_string(trained_on->cc_minor) +
                                ") is older than Turing (7.5), the oldest GPU the engine supports.");
    if (cc >= 80) report.compute_dtype = "bf16";
    else if (cc >= kMinComputeCapability) report.compute_dtype = "fp16";
  }
  return report;
}

}  // namespace qlora::gpu
