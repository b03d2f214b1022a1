// What this machine offers the GPU engine: whether CUDA is compiled in, the NVIDIA driver (libcuda: the CUDA
// version it supports), NVML (driver version, each GPU's name, memory, compute capability, utilization,
// temperature, power) and cuBLASLt, each with where it was found or every place it was looked for, and one sentence
// per problem saying what to do. `doctor` prints it; the trainer's GPU telemetry reads the same NVML functions.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "gpu/nvml.h"

namespace qlora::gpu {

struct LibraryReport {
  bool found = false;
  std::string path;
  std::vector<std::string> tried;    // files attempted
  std::vector<std::string> searched; // folders looked in ("" = the loader's own search path)
  std::string error;
};

struct GpuReport {
  bool cuda_compiled = false;
  int runtime_version = 0;         // CUDA runtime the engine was built with (13000 = 13.0)
  LibraryReport driver, nvml, cublaslt;
  int driver_cuda_version = 0;     // the newest CUDA the driver supports (cuDriverGetVersion)
  std::string driver_version;      // e.g. "580.65.06" (NVML)
  std::vector<GpuInfo> gpus;
  int runtime_devices = -1;        // what the CUDA runtime sees; -1 with runtime_error when it cannot
  std::string runtime_error;
  std::string compute_dtype;       // "bf16" (sm_80+), "fp16" (sm_75), "" without a usable GPU
  std::vector<std::string> problems;  // each stands between this machine and training on its GPU
  std::vector<std::string> notes;     // worth knowing but not in the way (GPU telemetry unavailable)
};

// The minimum the engine supports: Turing (sm_75); bf16 compute needs Ampere (sm_80).
constexpr int kMinComputeCapability = 75;
// CUDA 13's runtime needs a driver that supports CUDA 13.0 (driver 580 or newer).
constexpr int kMinDriverCudaVersion = 13000;

// Probes everything; `library_dir` is the qlora.cudaLibraryPath setting (empty: QLORA_CUDA_LIB_DIR, then the
// search of libraries.h). Never throws: what cannot be probed is a problem sentence.
GpuReport probe(const std::string& library_dir);

// "13.0" from 13000.
std::string cuda_version_text(int version);

}  // namespace qlora::gpu
