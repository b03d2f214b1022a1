// The GPU backend's caching allocator, with malloc standing in for cudaMalloc: freed blocks are reused for requests
// of about their size without a device allocation, the cache is given back when the device is full or the reserve
// limit would be passed, and a request nothing can satisfy is an error naming the bytes.
#include <cstdlib>
#include <map>

#include "gpu/caching_allocator.h"
#include "harness.h"
#include "util/error.h"

using namespace qlora;
using namespace qlora::gpu;

namespace {

// A "device" of `capacity` bytes that records what is held.
struct FakeDevice {
  explicit FakeDevice(int64_t bytes) : capacity(bytes) {}
  int64_t capacity;
  int64_t held = 0;
  CachingAllocator allocator() {
    return CachingAllocator(
        [this](size_t n) -> void* {
          if (held + static_cast<int64_t>(n) > capacity) return nullptr;
          void* p = std::malloc(n);
          held += static_cast<int64_t>(n);
          sizes[p] = n;
          return p;
        },
        [this](void* p) {
          held -= static_cast<int64_t>(sizes.at(p));
          sizes.erase(p);
          std::free(p);
        });
  }
  std::map<void*, size_t> sizes;  // what is held, by block
};

}  // namespace

TEST(caching_allocator_reuses_freed_blocks_of_about_the_same_size) {
  FakeDevice dev(1 << 20);
  {
    CachingAllocator a = dev.allocator();
    void* x = a.allocate(1500, "activations");
    EXPECT_EQ(a.reserved_bytes(), int64_t{1536});  // rounded to 512
    a.free(x);
    EXPECT_EQ(a.cached_bytes(), int64_t{1536});
    void* y = a.allocate(700, "activations");  // 1536 >= 768 and <= 2 * 768: the same block
    EXPECT_TRUE(y == x);
    EXPECT_EQ(a.device_allocations(), int64_t{1});
    a.free(y);
    void* small = a.allocate(100, "workspace");  // 1536 > 2 * 512: a new block rather than waste two thirds
    EXPECT_TRUE(small != x);
    EXPECT_EQ(a.device_allocations(), int64_t{2});
    EXPECT_EQ(a.in_use_bytes(), int64_t{512});
    EXPECT_THROWS_WITH(a.free(x), "not in use");
    EXPECT_EQ(a.release_cached(), int64_t{1536});
    EXPECT_EQ(dev.held, int64_t{512});
  }
  EXPECT_EQ(dev.held, int64_t{0});  // everything given back with the allocator
}

TEST(caching_allocator_gives_the_cache_back_when_the_device_is_full_or_the_limit_is_reached) {
  FakeDevice dev(4096);
  CachingAllocator a = dev.allocator();
  void* x = a.allocate(3000, "weights");  // 3072
  a.free(x);
  void* y = a.allocate(1024, "activations");  // no cached block fits well, and the device has 1024 left: fine
  EXPECT_EQ(dev.held, int64_t{4096});
  void* z = a.allocate(1024, "gradients");  // the device is full: the cached 3072 goes back first
  EXPECT_EQ(a.cached_bytes(), int64_t{0});
  EXPECT_EQ(dev.held, int64_t{2048});
  EXPECT_THROWS_WITH(a.allocate(3000, "optimizer"), "the GPU has no room for 3.00 KiB more for optimizer");
  a.free(y);
  a.free(z);
  a.set_reserve_limit(2048);
  void* w = a.allocate(1536, "workspace");  // a new block would pass the limit: the cache goes back first
  EXPECT_EQ(a.reserved_bytes(), int64_t{1536});
  EXPECT_THROWS_WITH(a.allocate(1024, "activations"), "device memory would pass its limit: 1.00 KiB more for activations on top of 1.50 KiB of 2.00 KiB");
  a.free(w);
}

TEST(caching_allocator_under_a_limit_reuses_blocks_of_the_very_size_only) {
  // Under a limit (the memory budget) a larger cached block would hold more than is asked for, unseen by the budget:
  // only the same rounded size is reused, and a new block gives the cache back first when the limit needs it.
  FakeDevice dev(1 << 20);
  CachingAllocator a = dev.allocator();
  a.set_reserve_limit(5000);
  void* x = a.allocate(1536, "optimizer");
  a.free(x);
  void* y = a.allocate(1000, "activations");  // 1024: not the cached 1536, although it would fit
  EXPECT_TRUE(y != x);
  EXPECT_EQ(a.in_use_bytes(), int64_t{1024});
  void* z = a.allocate(1500, "optimizer");  // 1536: the cached block
  EXPECT_TRUE(z == x);
  EXPECT_EQ(a.device_allocations(), int64_t{2});
  a.free(y);
  void* big = a.allocate(3000, "weights");  // 3072 + 1536 in use + 1024 cached > 5000: the cache goes back first
  EXPECT_EQ(a.cached_bytes(), int64_t{0});
  EXPECT_EQ(a.reserved_bytes(), int64_t{3072 + 1536});
  EXPECT_EQ(dev.held, int64_t{3072 + 1536});
  a.free(big);
  a.free(z);
}
