// The fibers of cuda_emu.h (ucontext): see there.
#ifndef _WIN32
#include "cuda_emu.h"

#include <ucontext.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace cuda_emu {

dim3 thread_idx, block_idx, block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  dim3 index;
  bool done = false;
  bool at_barrier = false;
};

ucontext_t scheduler;
std::vector<std::unique_ptr<Fiber>> pool;  // stacks are reused from launch to launch
Fiber* current = nullptr;
const std::function<void()>* current_body = nullptr;
int64_t switch_count = 0;

void fiber_entry() {
  (*current_body)();
  current->done = true;
  swapcontext(&current->context, &scheduler);
}

// Threads run in index order in even blocks and in reverse order in odd ones: a kernel that reads what another
// thread writes without a barrier between gets different results in the two orders, which the tests see.
void run_block(size_t threads, bool reverse) {
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = *pool[t];
    f.index = dim3(static_cast<unsigned>(t % block_dim.x), static_cast<unsigned>((t / block_dim.x) % block_dim.y),
                   static_cast<unsigned>(t / (static_cast<size_t>(block_dim.x) * block_dim.y)));
    f.done = false;
    f.at_barrier = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (;;) {
    for (size_t k = 0; k < threads; ++k) {
      Fiber& f = *pool[reverse ? threads - 1 - k : k];
      if (f.done || f.at_barrier) continue;
      current = &f;
      thread_idx = f.index;
      ++switch_count;
      swapcontext(&scheduler, &f.context);
    }
    bool any_waiting = false, any_done = false;
    for (size_t t = 0; t < threads; ++t) {
      any_waiting = any_waiting || pool[t]->at_barrier;
      any_done = any_done || pool[t]->done;
      pool[t]->at_barrier = false;
    }
    if (!any_waiting) return;
    // On a GPU a barrier that some threads of the block never reach (they returned) is undefined behaviour.
    if (any_done)
      throw std::runtime_error("cuda_emu: some threads of block (" + std::to_string(block_idx.x) + ", " +
                               std::to_string(block_idx.y) + ", " + std::to_string(block_idx.z) +
                               ") returned while others wait at __syncthreads()");
  }
}

}  // namespace

void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  // CUDA's launch limits (compute capability 7.5 and newer): a launch past them fails on the GPU
  if (threads == 0 || threads > 1024 || block.z > 64) throw std::runtime_error("cuda_emu: a block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.x > 0x7fffffffu || grid.y == 0 || grid.y > 65535 || grid.z == 0 || grid.z > 65535)
    throw std::runtime_error("cuda_emu: a grid of " + std::to_string(grid.x) + " x " + std::to_string(grid.y) + " x " +
                             std::to_string(grid.z) + " blocks");
  while (pool.size() < threads) pool.push_back(std::make_unique<Fiber>());
  grid_dim = grid;
  block_dim = block;
  current_body = &body;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        run_block(threads, (x + y + z) % 2 == 1);
      }
  current_body = nullptr;
}

void barrier() {
  current->at_barrier = true;
  ++switch_count;
  swapcontext(&current->context, &scheduler);
}

int64_t switches() { return switch_count; }

}  // namespace cuda_emu
#endif
