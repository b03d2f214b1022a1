// Warp-level tensor-core pieces for the 16-bit kernels: mma.sync m16n8k16 (fp32 accumulation), the fragments it
// takes from row-major shared-memory tiles (each one ldmatrix), and quad shuffles. PTX's fragment layout, with
// g = lane / 4 and t = lane % 4 (two 16-bit values to a 32-bit register, the lower index in the low half):
//   A, 16 x 16 (row, k):  a[0] = (g, 2t..2t+1)  a[1] = (g+8, 2t..)  a[2] = (g, 2t+8..)  a[3] = (g+8, 2t+8..)
//   B, 16 x 8  (k, col):  b[0] = (2t..2t+1, g)  b[1] = (2t+8..2t+9, g)
//   C, 16 x 8  (row, col): c[0], c[1] = (g, 2t), (g, 2t+1)   c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
// so the accumulators of two adjacent 8-column tiles are, rounded to 16 bits, the A fragment of the next product
// (FlashAttention's P and dS never leave registers). Device code that nvcc compiles, and that the native tests run
// under the CUDA emulator (test/cuda_emu.h), whose mma_m16n8k16, ldmatrix and __shfl_xor_sync implement the same
// layout.
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

// D += A B on the tensor cores, A and B bf16 (F16 false) or fp16. sm_80 and newer take it as one m16n8k16; Turing
// (sm_75), fp16 only, as two m16n8k8 over k 0-7 and 8-15, whose fragments are the halves of k16's (a[0], a[1] and
// b[0]; a[2], a[3] and b[1]). The host never launches a kernel that uses it where neither applies.
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
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  if constexpr (F16) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[2]), "r"(a[3]), "r"(b[1]));
  } else {
    (void)d, (void)a, (void)b;
    __trap();
  }
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

// One register as two adjacent 16-bit values of a tile (p 4-byte aligned).
__device__ __forceinline__ void store_pair(uint16_t* p, uint32_t bits) { memcpy(p, &bits, sizeof bits); }

// ldmatrix: `count` 8 x 8 matrices of 16-bit values from shared memory into every lane's registers in one
// instruction; lanes 8j..8j+7 give the 16-byte aligned addresses of matrix j's rows. r[j] of lane l is row g,
// values 2t and 2t + 1 of matrix j (with Trans: its column g, rows 2t and 2t + 1), where g = l / 4, t = l % 4: the
// A and B fragments' layout, so that each fragment is one load instead of two to eight.
template <int N, bool Trans>
__device__ __forceinline__ void ldmatrix(const uint16_t* row, uint32_t (&r)[N]) {
  static_assert(N == 2 || (N == 4 && !Trans), "four matrices as stored, or two either way");
#ifdef __CUDACC__
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (N == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else if constexpr (!Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#elif defined(__CUDA_ARCH__)
  (void)row, (void)r;
  __trap();
#endif
#else
  ::cuda_emu::ldmatrix(N, Trans, row, r);
#endif
}

// The A fragment of the 16 x 16 block of `tile` at (row0, col0): matrices rows 0-7 | 8-15 by columns 0-7 | 8-15, in
// a's order.
template <int W>
__device__ __forceinline__ void fragment_a(const uint16_t (*tile)[W], int row0, int col0, uint32_t (&a)[4]) {
  const int lane = threadIdx.x % 32, j = lane / 8;
  ldmatrix<4, false>(&tile[row0 + lane % 8 + (j % 2) * 8][col0 + (j / 2) * 8], a);
}

// The B fragment (16 x 8) that is the transpose of the 8 x 16 block of `tile` at (row0, col0): B(k, n) =
// tile[row0 + n][col0 + k], as K is in Q K^T. Its two matrices are the block's columns 0-7 and 8-15, as stored.
template <int W>
__device__ __forceinline__ void fragment_b_transposed(const uint16_t (*tile)[W], int row0, int col0, uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32;  // lanes 16..31 give addresses too, which x2 ignores
  ldmatrix<2, false>(&tile[row0 + lane % 8][col0 + (lane / 8 % 2) * 8], b);
}

// The B fragment that is the 16 x 8 block of `tile` at (row0, col0) itself: B(k, n) = tile[row0 + k][col0 + n], as V
// is in P V. Its two matrices are the block's rows 0-7 and 8-15, transposed as they load.
template <int W>
__device__ __forceinline__ void fragment_b(const uint16_t (*tile)[W], int row0, int col0, uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32;
  ldmatrix<2, true>(&tile[row0 + lane % 8 + (lane / 8 % 2) * 8][col0], b);
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
