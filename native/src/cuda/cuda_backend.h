// The CUDA backend: the engine's ops on the first CUDA device (CUDA_VISIBLE_DEVICES applies), fp32, bf16 or fp16 compute
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

enum class GpuCompute { F32, BF16, F16 };
// The format a compute dtype's GEMMs take their inputs in.
inline FloatFormat compute_format(GpuCompute c) {
  return c == GpuCompute::BF16 ? FloatFormat::BF16 : c == GpuCompute::F16 ? FloatFormat::F16 : FloatFormat::F32;
}

// The columns a linear's GEMM grows by when LoRA's up projection of rank `rank` goes into it (Backend::
// lora_fused_columns): under half compute the rank in whole 16-byte groups, so that the rows of [x | t] and [W | B]
// stay as aligned as the GEMM wants them; none in fp32.
inline int64_t lora_fused_columns(GpuCompute c, int64_t rank) {
  return c == GpuCompute::F32 || rank <= 0 ? 0 : (rank + 7) / 8 * 8;
}

struct CudaBackendOptions {
  std::string library_dir;  // where to look for cuBLASLt first (qlora.cudaLibraryPath / --cuda-lib-dir)
  // bf16 or fp16 compute (torch.autocast): GEMM inputs rounded to the half type, fp32 accumulation; else fp32
  // throughout. fp16 needs loss scaling (RunOptions::loss_scale) to keep small gradients.
  GpuCompute compute = GpuCompute::F32;
};

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options);

}  // namespace qlora
