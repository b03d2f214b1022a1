#include "gpu/caching_allocator.h"

#include <algorithm>

#include "util/error.h"

namespace qlora::gpu {

CachingAllocator::CachingAllocator(RawAlloc raw_alloc, RawFree raw_free)
    : raw_alloc_(std::move(raw_alloc)), raw_free_(std::move(raw_free)) {}

CachingAllocator::~CachingAllocator() {
  for (auto& [ptr, block] : blocks_) {
    (void)block;
    raw_free_(ptr);
  }
}

void* CachingAllocator::allocate(size_t bytes, const std::string& what) {
  const size_t size = (std::max<size_t>(bytes, 1) + kRound - 1) / kRound * kRound;
  // the smallest cached block that fits, unless it would waste more than the request itself; under a reserve limit
  // only a block of the very size (a training step asks for the same sizes every time), so that what is held in
  // use stays what was asked for and the limit is not reached through waste
  auto it = cache_.lower_bound(size);
  if (it != cache_.end() && it->first <= (reserve_limit_ > 0 ? size : 2 * size)) {
    void* ptr = it->second;
    cached_ -= static_cast<int64_t>(it->first);
    cache_.erase(it);
    blocks_[ptr].cached = false;
    return ptr;
  }
  return fresh_block(size, what);
}

void* CachingAllocator::fresh_block(size_t size, const std::string& what) {
  const int64_t n = static_cast<int64_t>(size);
  if (reserve_limit_ > 0 && reserved_ + n > reserve_limit_) {
    release_cached();
    if (reserved_ + n > reserve_limit_)
      fail("the engine's device memory would pass its limit: ", format_bytes(n), " more for ", what, " on top of ",
           format_bytes(reserved_), " of ", format_bytes(reserve_limit_));
  }
  void* ptr = raw_alloc_(size);
  if (!ptr && cached_ > 0) {
    release_cached();
    ptr = raw_alloc_(size);
  }
  if (!ptr)
    fail("the GPU has no room for ", format_bytes(n), " more for ", what, " (the engine holds ",
         format_bytes(reserved_), "); lower the batch size or the sequence length, or set a memory budget so that "
         "the optimizer pages to host memory");
  blocks_[ptr] = Block{size, false};
  reserved_ += n;
  ++device_allocations_;
  return ptr;
}

void CachingAllocator::free(void* ptr) {
  if (!ptr) return;
  const auto it = blocks_.find(ptr);
  QLORA_CHECK(it != blocks_.end() && !it->second.cached, "free of a pointer that is not in use");
  it->second.cached = true;
  cache_.emplace(it->second.size, ptr);
  cached_ += static_cast<int64_t>(it->second.size);
}

int64_t CachingAllocator::release_cached() {
  const int64_t released = cached_;
  for (auto& [size, ptr] : cache_) {
    (void)size;
    raw_free_(ptr);
    blocks_.erase(ptr);
  }
  reserved_ -= cached_;
  cached_ = 0;
  cache_.clear();
  return released;
}

}  // namespace qlora::gpu
