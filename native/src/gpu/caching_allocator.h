// The device allocator of the GPU backend: plain device allocations (cudaMalloc; never managed memory), kept in a
// cache when freed and handed out again for a request of about the same size, because cudaMalloc and cudaFree
// synchronize the device and a training step frees and allocates the same activation buffers every time. The
// allocator itself knows nothing of CUDA (it is given the raw allocate and free functions), so its logic is tested
// on the CPU. Single-stream use: a block freed by compute is reused by compute in stream order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <unordered_map>

namespace qlora::gpu {

class CachingAllocator {
 public:
  // raw_alloc returns nullptr when the device has no room; raw_free gives a pointer from raw_alloc back.
  using RawAlloc = std::function<void*(size_t bytes)>;
  using RawFree = std::function<void(void* ptr)>;
  CachingAllocator(RawAlloc raw_alloc, RawFree raw_free);
  ~CachingAllocator();  // gives every block back
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // A block of at least `bytes` (rounded up to 512): a cached one of the same rounded size up to twice it (exactly
  // that size under a reserve limit), else a new one. When the device has no room, or a new block would take the reserved bytes over the reserve limit, the
  // cache is given back first. Throws EngineError naming the bytes and `what` when even that is not enough.
  void* allocate(size_t bytes, const std::string& what);
  void free(void* ptr);
  // Gives every cached (free) block back to the device; returns the bytes released.
  int64_t release_cached();

  // 0: no limit. The budget of the engine bounds what it holds in use; this bounds what it holds from the device,
  // cache included (a reused block may be up to twice the request), so that the budget means device memory: past
  // it, even with the cache given back, allocate() throws.
  void set_reserve_limit(int64_t bytes) { reserve_limit_ = bytes; }
  int64_t reserved_bytes() const { return reserved_; }  // held from the device: in use + cached
  int64_t cached_bytes() const { return cached_; }
  int64_t in_use_bytes() const { return reserved_ - cached_; }
  int64_t device_allocations() const { return device_allocations_; }  // raw_alloc calls that succeeded

  static constexpr size_t kRound = 512;

 private:
  void* fresh_block(size_t bytes, const std::string& what);
  RawAlloc raw_alloc_;
  RawFree raw_free_;
  std::multimap<size_t, void*> cache_;             // free blocks by size
  struct Block {
    size_t size = 0;
    bool cached = false;
  };
  std::unordered_map<void*, Block> blocks_;  // every block held, in use or cached
  int64_t reserved_ = 0, cached_ = 0, reserve_limit_ = 0, device_allocations_ = 0;
};

}  // namespace qlora::gpu
