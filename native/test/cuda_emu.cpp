// The fibers of cuda_emu.h (ucontext): see there.
#ifndef _WIN32
#include "cuda_emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace cuda_emu {

dim3 thread_idx, block_idx, block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  dim3 index;
  size_t linear = 0;        // index in the block: x fastest, then y, then z
  int64_t collectives = 0;  // warp collectives this thread has made in the current block
  bool done = false;
  bool at_barrier = false;
};

// A warp's collectives in the current block: lanes post into one of two buffers by the parity of the collective's
// number, so that a lane that runs ahead into the next collective never overwrites a post others still read (it
// cannot get two ahead: that needs every lane to have arrived at the next one, after reading this one).
struct WarpState {
  int64_t arrived = 0;  // posts so far, over all collectives
  int lanes = 0;        // 32, or fewer in the block's last warp
  alignas(16) unsigned char posts[2][kWarpSize][kMaxPostBytes];
};

ucontext_t scheduler;
std::vector<std::unique_ptr<Fiber>> pool;  // stacks are reused from launch to launch
Fiber* current = nullptr;
const std::function<void()>* current_body = nullptr;
int64_t switch_count = 0;
std::vector<WarpState> warps;  // of the block being run
int64_t events = 0;            // arrivals and returns: a pass of the scheduler without any is a deadlock
// An exception cannot unwind across fibers: a thread's is kept here and rethrown by the scheduler, which abandons the
// block (its other fibers' stacks are reused by the next launch).
std::exception_ptr thread_failure;

void fiber_entry() {
  try {
    (*current_body)();
  } catch (...) {
    thread_failure = std::current_exception();
  }
  current->done = true;
  ++events;
  swapcontext(&current->context, &scheduler);
}

// Threads run in index order in even blocks and in reverse order in odd ones: a kernel that reads what another
// thread writes without a barrier between gets different results in the two orders, which the tests see.
void run_block(size_t threads, bool reverse) {
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = *pool[t];
    f.index = dim3(static_cast<unsigned>(t % block_dim.x), static_cast<unsigned>((t / block_dim.x) % block_dim.y),
                   static_cast<unsigned>(t / (static_cast<size_t>(block_dim.x) * block_dim.y)));
    f.linear = t;
    f.collectives = 0;
    f.done = false;
    f.at_barrier = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  warps.assign((threads + kWarpSize - 1) / kWarpSize, WarpState{});
  for (size_t w = 0; w < warps.size(); ++w)
    warps[w].lanes = static_cast<int>(std::min<size_t>(kWarpSize, threads - w * kWarpSize));
  for (;;) {
    // run every thread until it waits at __syncthreads() or returns; a thread waiting in a warp collective yields
    // and is run again on the next pass
    for (;;) {
      const int64_t events_before = events;
      bool any_running = false;
      for (size_t k = 0; k < threads; ++k) {
        Fiber& f = *pool[reverse ? threads - 1 - k : k];
        if (f.done || f.at_barrier) continue;
        any_running = true;
        current = &f;
        thread_idx = f.index;
        ++switch_count;
        swapcontext(&scheduler, &f.context);
        if (thread_failure) std::rethrow_exception(std::exchange(thread_failure, nullptr));
      }
      if (!any_running) break;
      if (events == events_before)
        throw std::runtime_error("cuda_emu: in block (" + std::to_string(block_idx.x) + ", " +
                                 std::to_string(block_idx.y) + ", " + std::to_string(block_idx.z) +
                                 ") lanes of a warp wait in a warp collective that the others never reach");
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
  ++events;
  ++switch_count;
  swapcontext(&current->context, &scheduler);
}

int64_t switches() { return switch_count; }

int lane() { return static_cast<int>(current->linear % kWarpSize); }

void warp_exchange(const void* mine, size_t bytes, void* all) {
  if (bytes > kMaxPostBytes) throw std::runtime_error("cuda_emu: a warp collective of " + std::to_string(bytes) + " bytes");
  Fiber* self = current;
  WarpState& warp = warps[self->linear / kWarpSize];
  const int64_t n = self->collectives++;
  unsigned char (*posts)[kMaxPostBytes] = warp.posts[n % 2];
  std::memcpy(posts[self->linear % kWarpSize], mine, bytes);
  ++warp.arrived;
  ++events;
  while (warp.arrived < warp.lanes * (n + 1)) {  // wait for the other lanes, letting them run
    ++switch_count;
    swapcontext(&self->context, &scheduler);
  }
  current = self;
  thread_idx = self->index;
  unsigned char* out = static_cast<unsigned char*>(all);
  for (int l = 0; l < kWarpSize; ++l) {
    if (l < warp.lanes)
      std::memcpy(out + l * bytes, posts[l], bytes);
    else
      std::memset(out + l * bytes, 0, bytes);  // no such lane in a partial warp
  }
}

namespace {
float half_value(bool f16, uint32_t reg, int which) {
  const uint16_t bits = static_cast<uint16_t>(which == 0 ? reg & 0xffffu : reg >> 16);
  return f16 ? qlora::f16_to_f32(bits) : qlora::bf16_to_f32(bits);
}
}  // namespace

// The fragment layout of PTX's m16n8k16 (groupID = lane / 4, threadID_in_group = lane % 4):
// A (16 x 16, row-major): a[0] holds (g, 2t), (g, 2t+1); a[1] (g+8, 2t..); a[2] (g, 2t+8..); a[3] (g+8, 2t+8..).
// B (16 x 8, k x n): b[0] holds (2t, g), (2t+1, g); b[1] (2t+8, g), (2t+9, g).
// C, D (16 x 8): c[0], c[1] at (g, 2t), (g, 2t+1); c[2], c[3] at (g+8, 2t), (g+8, 2t+1).
void mma_m16n8k16(bool f16, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  struct Post {
    uint32_t a[4];
    uint32_t b[2];
  } mine{}, all[kWarpSize];
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  const float c_in[4] = {c[0], c[1], c[2], c[3]};  // d may alias c
  warp_exchange(&mine, sizeof(Post), all);
  auto a_at = [&](int row, int col) {
    const int holder = (row % 8) * 4 + (col % 8) / 2;
    return half_value(f16, all[holder].a[(row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0)], col % 2);
  };
  auto b_at = [&](int k, int col) {
    const int holder = col * 4 + (k % 8) / 2;
    return half_value(f16, all[holder].b[k >= 8 ? 1 : 0], k % 2);
  };
  const int g = lane() / 4, t = lane() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    float acc = c_in[i];
    for (int k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, col);
    d[i] = acc;
  }
}

void ldmatrix(int count, bool trans, const uint16_t* row, uint32_t out[]) {
  const uint16_t* rows[kWarpSize];
  warp_exchange(&row, sizeof row, rows);
  const int l = lane(), g = l / 4, t = l % 4;
  for (int j = 0; j < count; ++j) {
    const uint16_t* const* m = rows + 8 * j;  // matrix j's rows
    for (int r = 0; r < 8; ++r)
      if (reinterpret_cast<uintptr_t>(m[r]) % 16 != 0)
        throw std::runtime_error("cuda_emu: ldmatrix row address of lane " + std::to_string(8 * j + r) +
                                 " is not 16-byte aligned");
    const uint16_t lo = trans ? m[2 * t][g] : m[g][2 * t];
    const uint16_t hi = trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
    out[j] = uint32_t{lo} | uint32_t{hi} << 16;
  }
}

}  // namespace cuda_emu
#endif
