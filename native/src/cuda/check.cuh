// Error checks for CUDA runtime calls and kernel launches: a failure is an EngineError naming the call and the
// runtime's message (out of memory, an illegal address, a missing kernel image for this GPU...).
#pragma once
#include <cuda_runtime.h>

#include "util/error.h"

#define QLORA_CUDA_CHECK(call)                                                                          \
  do {                                                                                                  \
    const cudaError_t qlora_err_ = (call);                                                              \
    if (qlora_err_ != cudaSuccess)                                                                      \
      ::qlora::fail("CUDA error in ", #call, ": ", cudaGetErrorName(qlora_err_), " (",                   \
                    cudaGetErrorString(qlora_err_), ")");                                                \
  } while (0)

// After a launch: a bad configuration shows at once, a fault in the kernel at the next synchronizing call.
#define QLORA_CUDA_CHECK_LAUNCH(what) QLORA_CUDA_CHECK(cudaGetLastError())
