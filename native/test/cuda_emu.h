// A small CUDA emulator for the native tests: the engine's CUDA kernels (cuda/kernels.cuh) compiled as plain C++ and
// run on the CPU, each CUDA thread a fiber, so that CI (which has nvcc but no GPU) checks their indexing, their
// reductions and the host code around them against the CPU reference. Every thread of a block runs until it reaches
// __syncthreads() or returns; when all have, the block goes on. __shared__ variables are static (one copy, shared
// by the block's threads; blocks run one after another). Threads run in index order in some blocks and in reverse
// order in others, so a missing barrier shows as a wrong result; a barrier some threads never reach and a launch
// past CUDA's grid and block limits are errors. What it cannot check: timing, memory coalescing, warp-level
// behaviour, and races that only true parallelism shows.
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

// The device functions the kernels use, with the CPU's libm (CUDA's are within 2 ulp of these).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
