// The CUDA backend: the engine's ops on the first CUDA device (CUDA_VISIBLE_DEVICES applies), fp32 or bf16 compute
// with cuBLASLt GEMMs (fp32 accumulation, no TF32), memory from a caching allocator, optimizer pages copied on a stream of
// their own. Plain C++ declarations; defined in cuda_backend.cu, or in cuda_backend_none.cpp for a build without
// CUDA, where asking for it is an error that says so.
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"

namespace qlora {

// The cuBLASLt workspace the backend holds (Workspace category) from its first GEMM on; the memory estimate counts it.
constexpr int64_t kCudaGemmWorkspaceBytes = int64_t{32} << 20;

struct CudaBackendOptions {
  std::string library_dir;  // where to look for cuBLASLt first (qlora.cudaLibraryPath / --cuda-lib-dir)
  // bf16 compute (torch.autocast(bfloat16)): GEMM inputs rounded to bf16, fp32 accumulation; else fp32 throughout.
  bool bf16_compute = false;
};

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options);

}  // namespace qlora
