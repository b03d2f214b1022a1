// NF4 on the GPU as standalone calls over device pointers (the GPU tests use them; the backend launches the same
// kernels of cuda/kernels.cuh through KernelBackend).
#include "cuda/check.cuh"
#include "cuda/kernels.cuh"
#include "cuda/nf4_kernels.h"

namespace qlora::cuda {

namespace {
constexpr int kThreads = 256;
}

void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, RoundTo round_to, float* out) {
  if (n <= 0) return;
  if (blocksize <= 0 || blocksize % 2 != 0) fail("nf4_dequantize: blocksize must be a positive even number, got ", blocksize);
  const int64_t bytes = (n + 1) / 2;
  const int64_t blocks = std::min<int64_t>((bytes + kThreads - 1) / kThreads, 65535);
  kernels::nf4_dequantize<<<static_cast<unsigned>(blocks), kThreads>>>(packed, absmax, n, blocksize,
                                                                        static_cast<int>(round_to), out);
  QLORA_CUDA_CHECK_LAUNCH("nf4_dequantize");
}

void nf4_quantize(const float* x, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
  if (n <= 0) return;
  // a block must start on a byte: even block sizes only (bitsandbytes uses 64 to 4096)
  if (blocksize <= 0 || blocksize % 2 != 0) fail("nf4_quantize: blocksize must be a positive even number, got ", blocksize);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  kernels::nf4_quantize<<<static_cast<unsigned>(blocks), kThreads>>>(x, n, blocksize, packed, absmax);
  QLORA_CUDA_CHECK_LAUNCH("nf4_quantize");
}

}  // namespace qlora::cuda
