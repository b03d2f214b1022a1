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

}  // namespace qlora::cuda
