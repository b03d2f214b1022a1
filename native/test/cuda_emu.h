// A small CUDA emulator for the native tests: the engine's CUDA kernels (cuda/kernels.cuh) compiled as plain C++ and
// run on the CPU, each CUDA thread a fiber, so that CI (which has nvcc but no GPU) checks their indexing, their
// reductions and the host code around them against the CPU reference. Every thread of a block runs until it reaches
// __syncthreads() or returns; when all have, the block goes on. __shared__ variables are static (one copy, shared
// by the block's threads; blocks run one after another). Threads run in index order in some blocks and in reverse
// order in others, so a missing barrier shows as a wrong result; a barrier some threads never reach and a launch
// past CUDA's grid and block limits are errors. Warp-level collectives (__shfl_xor_sync, the tensor cores'
// mma.sync) are emulated too: each lane of a warp posts its part and waits, yielding, until every lane has; a lane that
// returns or waits at __syncthreads() while others wait in a warp collective is an error, as it is undefined
// behaviour on a GPU. What it cannot check: timing, memory coalescing, the tensor cores' own summation order, and
// races that only true parallelism shows.
// Linux only (ucontext).
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>

#include "io/dtype.h"

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emu {

extern dim3 thread_idx, block_idx, block_dim, grid_dim;

// Runs body once per thread of every block of the grid (blocks in order), switching threads at barriers.
void launch(dim3 grid, dim3 block, const std::function<void()>& body);
// __syncthreads(): waits until every thread of the block still running has reached a barrier.
void barrier();
// Fibers switched so far, for tests that check the emulator itself.
int64_t switches();

constexpr int kWarpSize = 32;
// The calling thread's lane (its linear index in the block, modulo 32).
int lane();
// A warp collective: every lane of the calling thread's warp (32 consecutive linear thread indices; fewer in a
// block's last, partial warp) posts `bytes` (at most kMaxPostBytes) from `mine`; once all have, `all` receives every
// lane's post, lane by lane (kWarpSize * bytes). All lanes of a warp must make the same collectives in the same order.
constexpr size_t kMaxPostBytes = 64;
void warp_exchange(const void* mine, size_t bytes, void* all);

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 as PTX defines it: D = A B + C for a 16 x 16 A and
// a 16 x 8 B held across the warp's lanes in PTX's fragment layout (two 16-bit values to a register, the lower
// index in the low half), fp32 C and D. The products are summed in fp32, in order.
void mma_m16n8k16(bool f16, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);

// ldmatrix.sync.aligned.m8n8.x{count}{.trans}.shared.b16 as PTX defines it: lanes 8j..8j+7 each give the address of
// one row (eight 16-bit values) of matrix j < count; out[j] of lane l is then row l / 4, values 2 (l % 4) and the
// next, of matrix j, or with trans its column l / 4, rows 2 (l % 4) and the next (the lower index in the low half).
void ldmatrix(int count, bool trans, const uint16_t* row, uint32_t out[]);

}  // namespace cuda_emu

#define threadIdx ::cuda_emu::thread_idx
#define blockIdx ::cuda_emu::block_idx
#define blockDim ::cuda_emu::block_dim
#define gridDim ::cuda_emu::grid_dim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() ::cuda_emu::barrier()
#define __align__(n) __attribute__((aligned(n)))

// __shfl_xor_sync over the whole warp: the value of lane (lane ^ lane_mask).
template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: the whole warp*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= ::cuda_emu::kMaxPostBytes, "a shuffle moves at most kMaxPostBytes");
  T all[::cuda_emu::kWarpSize];
  ::cuda_emu::warp_exchange(&value, sizeof(T), all);
  return all[(::cuda_emu::lane() ^ lane_mask) % ::cuda_emu::kWarpSize];
}

// The device functions the kernels use, with the CPU's libm (CUDA's are within 2 ulp of these).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
