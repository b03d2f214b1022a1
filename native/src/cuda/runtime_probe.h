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

}  // namespace qlora::cuda
