#include <cuda_runtime.h>

#include "cuda/runtime_probe.h"

namespace qlora::cuda {

bool compiled() { return true; }

int runtime_version() { return CUDART_VERSION; }

int device_count(std::string* error) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (error) *error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    return -1;
  }
  return n;
}

bool runtime_device(int device, bool with_free_memory, RuntimeDevice* out) {
  char bus[32] = {0};
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, device) != cudaSuccess) return false;
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return false;
  out->pci_bus_id = bus;
  out->name = prop.name;
  out->cc_major = prop.major;
  out->cc_minor = prop.minor;
  out->memory_total = prop.totalGlobalMem;
  if (with_free_memory) {
    size_t free_bytes = 0, total = 0;
    if (cudaSetDevice(device) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) out->memory_free = free_bytes;
  }
  return true;
}

}  // namespace qlora::cuda
