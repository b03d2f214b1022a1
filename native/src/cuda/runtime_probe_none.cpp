// The runtime probe of a build without CUDA (nvcc was not found): see runtime_probe.h.
#ifndef QLORA_WITH_CUDA
#include "cuda/runtime_probe.h"

namespace qlora::cuda {

bool compiled() { return false; }
int runtime_version() { return 0; }
int device_count(std::string* error) {
  if (error) *error = "this build of the engine has no CUDA backend (nvcc was not found when it was built)";
  return -1;
}
bool runtime_device(int, bool, RuntimeDevice*) { return false; }

}  // namespace qlora::cuda
#endif
