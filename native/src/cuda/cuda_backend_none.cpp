// make_cuda_backend of a build without CUDA (nvcc was not found when the engine was built).
#ifndef QLORA_WITH_CUDA
#include "cuda/cuda_backend.h"

#include "util/error.h"

namespace qlora {

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions&) {
  fail("this build of the engine has no CUDA backend (nvcc was not found when it was built); train on the CPU "
       "(--device cpu) or install the CUDA 13 toolkit and reinstall the extension's engine");
}

}  // namespace qlora
#endif
