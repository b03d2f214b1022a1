#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/check.cuh"
#include "cuda/nf4_kernels.h"
#include "quant/nf4_codebook.h"

namespace qlora::cuda {

namespace {

// Two elements per thread: one packed byte.
__global__ void nf4_dequantize_kernel(const uint8_t* packed, const float* absmax, int64_t n, int blocksize,
                                      int round_to, float* out) {
  const int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = 2 * byte;
  if (i >= n) return;
  const uint8_t b = packed[byte];
  for (int k = 0; k < 2 && i + k < n; ++k) {
    const int code = k == 0 ? (b >> 4) : (b & 0x0f);
    float v = nf4::code_value(code) * absmax[(i + k) / blocksize];
    if (round_to == static_cast<int>(RoundTo::BF16)) v = __bfloat162float(__float2bfloat16_rn(v));
    else if (round_to == static_cast<int>(RoundTo::F16)) v = __half2float(__float2half_rn(v));
    out[i + k] = v;
  }
}

// One CUDA block per quantization block: the absmax by a reduction (max is exact in any order; NaN is skipped as
// fmaxf skips it, like the CPU's `a > m`), then each thread quantizes pairs.
__global__ void nf4_quantize_kernel(const float* x, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
  __shared__ float partial[256];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t count = min(static_cast<int64_t>(blocksize), n - begin);
  float m = 0.0f;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) m = fmaxf(m, fabsf(x[begin + j]));
  partial[threadIdx.x] = m;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + stride]);
    __syncthreads();
  }
  const float block_max = partial[0];
  if (threadIdx.x == 0) absmax[blockIdx.x] = block_max;
  const float scale = 1.0f / block_max;  // the kernel multiplies by the reciprocal, as bitsandbytes does
  const int64_t pairs = (count + 1) / 2;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t j = 2 * p;
    uint8_t byte = 0;
    if (block_max != 0.0f) {
      const float v0 = x[begin + j];
      const float v1 = j + 1 < count ? x[begin + j + 1] : 0.0f;
      byte = static_cast<uint8_t>((nf4::quantize_normalized(v0 * scale) << 4) | nf4::quantize_normalized(v1 * scale));
    }
    packed[(begin + j) / 2] = byte;
  }
}

}  // namespace

void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, RoundTo round_to, float* out) {
  if (n <= 0) return;
  if (blocksize <= 0 || blocksize % 2 != 0) fail("nf4_dequantize: blocksize must be a positive even number, got ", blocksize);
  const int64_t bytes = (n + 1) / 2;
  const int threads = 256;
  const int64_t blocks = (bytes + threads - 1) / threads;
  nf4_dequantize_kernel<<<static_cast<unsigned>(blocks), threads>>>(packed, absmax, n, blocksize, static_cast<int>(round_to), out);
  QLORA_CUDA_CHECK_LAUNCH("nf4_dequantize");
}

void nf4_quantize(const float* x, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
  if (n <= 0) return;
  // a block must start on a byte: even block sizes only (bitsandbytes uses 64 to 4096)
  if (blocksize <= 0 || blocksize % 2 != 0) fail("nf4_quantize: blocksize must be a positive even number, got ", blocksize);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  nf4_quantize_kernel<<<static_cast<unsigned>(blocks), 256>>>(x, n, blocksize, packed, absmax);
  QLORA_CUDA_CHECK_LAUNCH("nf4_quantize");
}

}  // namespace qlora::cuda
