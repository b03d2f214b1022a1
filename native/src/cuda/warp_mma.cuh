// Warp-level tensor-core pieces for the 16-bit kernels: mma.sync m16n8k16 (fp32 accumulation), the fragments it
// takes from row-major shared-memory tiles, and quad shuffles. PTX's fragment layout, with g = lane / 4 and
// t = lane % 4 (two 16-bit values to a 32-bit register, the lower index in the low half):
//   A, 16 x 16 (row, k):  a[0] = (g, 2t..2t+1)  a[1] = (g+8, 2t..)  a[2] = (g, 2t+8..)  a[3] = (g+8, 2t+8..)
//   B, 16 x 8  (k, col):  b[0] = (2t..2t+1, g)  b[1] = (2t+8..2t+9, g)
//   C, 16 x 8  (row, col): c[0], c[1] = (g, 2t), (g, 2t+1)   c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
// so the accumulators of two adjacent 8-column tiles are, rounded to 16 bits, the A fragment of the next product
// (FlashAttention's P and dS never leave registers). Device code that nvcc compiles, and that the native tests run
// under the CUDA emulator (test/cuda_emu.h), whose mma_m16n8k16 and __shfl_xor_sync implement the same layout.
#pragma once
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QLORA_UNROLL _Pragma("unroll")
#else
#include "io/dtype.h"
#define QLORA_UNROLL
#endif

namespace qlora::cuda::kernels {
namespace {

// Shared tiles are rows of 16-bit values, padded by 8 so that the lanes of a fragment load spread over the banks.
constexpr int kTilePad = 8;

// D += A B on the tensor cores, A and B bf16 (F16 false) or fp16. Only sm_80 and newer run it; the host never
// launches a kernel that uses it on an older GPU.
template <bool F16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDACC__
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (F16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  (void)d, (void)a, (void)b;
  __trap();
#endif
#else
  ::cuda_emu::mma_m16n8k16(F16, d, a, b, d);
#endif
}

// Two fp32 values rounded to nearest even into one register: lo in the low half.
template <bool F16>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t bits;
#ifdef __CUDACC__
  if constexpr (F16) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&bits, &h, sizeof bits);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &h, sizeof bits);
  }
#else
  bits = F16 ? uint32_t{f32_to_f16(lo)} | uint32_t{f32_to_f16(hi)} << 16
             : uint32_t{f32_to_bf16(lo)} | uint32_t{f32_to_bf16(hi)} << 16;
#endif
  return bits;
}

// Two adjacent 16-bit values of a tile (p 4-byte aligned) as one register, and back.
__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) {
  uint32_t bits;
  memcpy(&bits, p, sizeof bits);
  return bits;
}
__device__ __forceinline__ void store_pair(uint16_t* p, uint32_t bits) { memcpy(p, &bits, sizeof bits); }
__device__ __forceinline__ uint32_t join_pair(uint16_t lo, uint16_t hi) { return uint32_t{lo} | uint32_t{hi} << 16; }

// The A fragment of the 16 x 16 block of `tile` at (row0, col0).
template <int W>
__device__ __forceinline__ void fragment_a(const uint16_t (*tile)[W], int row0, int col0, uint32_t (&a)[4]) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  a[0] = load_pair(&tile[row0 + g][col0 + 2 * t]);
  a[1] = load_pair(&tile[row0 + g + 8][col0 + 2 * t]);
  a[2] = load_pair(&tile[row0 + g][col0 + 2 * t + 8]);
  a[3] = load_pair(&tile[row0 + g + 8][col0 + 2 * t + 8]);
}

// The B fragment (16 x 8) that is the transpose of the 8 x 16 block of `tile` at (row0, col0): B(k, n) =
// tile[row0 + n][col0 + k], as K is in Q K^T.
template <int W>
__device__ __forceinline__ void fragment_b_transposed(const uint16_t (*tile)[W], int row0, int col0, uint32_t (&b)[2]) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  b[0] = load_pair(&tile[row0 + g][col0 + 2 * t]);
  b[1] = load_pair(&tile[row0 + g][col0 + 2 * t + 8]);
}

// The B fragment that is the 16 x 8 block of `tile` at (row0, col0) itself: B(k, n) = tile[row0 + k][col0 + n], as V
// is in P V.
template <int W>
__device__ __forceinline__ void fragment_b(const uint16_t (*tile)[W], int row0, int col0, uint32_t (&b)[2]) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const int r = row0 + 2 * t, c = col0 + g;
  b[0] = join_pair(tile[r][c], tile[r + 1][c]);
  b[1] = join_pair(tile[r + 8][c], tile[r + 9][c]);
}

// The accumulators of two adjacent 16 x 8 tiles (columns 0..7 and 8..15) rounded into the A fragment of a 16 x 16.
template <bool F16>
__device__ __forceinline__ void accumulators_to_a(const float (&lo)[4], const float (&hi)[4], uint32_t (&a)[4]) {
  a[0] = pack_pair<F16>(lo[0], lo[1]);
  a[1] = pack_pair<F16>(lo[2], lo[3]);
  a[2] = pack_pair<F16>(hi[0], hi[1]);
  a[3] = pack_pair<F16>(hi[2], hi[3]);
}

// The maximum and the sum over the four lanes of a quad (the lanes holding one row of an accumulator).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// The sum over the whole warp.
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace
}  // namespace qlora::cuda::kernels
