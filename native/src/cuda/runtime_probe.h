// What the statically linked CUDA runtime reports, from the only translation unit that calls it so far. Built when
// CMake finds nvcc (QLORA_WITH_CUDA); without a driver the runtime calls fail with an error code, never crash, so
// the addon loads on machines with no NVIDIA driver at all.
#pragma once
#include <string>

namespace qlora::cuda {

// Whether the CUDA backend was compiled into this build.
bool compiled();

// The CUDA runtime version the engine was built with (e.g. 13000), or 0 when CUDA is not compiled in.
int runtime_version();

// Devices the runtime can use; on failure -1 and the runtime's message in `error`.
int device_count(std::string* error);

// A runtime device as the CUDA runtime sees it (ordered as the engine's device numbers: CUDA_VISIBLE_DEVICES and
// CUDA_DEVICE_ORDER apply). False when it cannot be asked.
struct RuntimeDevice {
  std::string pci_bus_id;  // "0000:3B:00.0", which NVML looks devices up by
  std::string name;
  int cc_major = 0, cc_minor = 0;
  unsigned long long memory_total = 0, memory_free = 0;  // memory_free: 0 unless with_free_memory
};
// with_free_memory creates the device's context (cudaMemGetInfo), which takes time and some memory: only when
// nothing else (NVML) can tell.
bool runtime_device(int device, bool with_free_memory, RuntimeDevice* out);

}  // namespace qlora::cuda
