// Device memory on the GPU: the caching allocator over cudaMalloc (reuse without a device allocation, the cache
// given back under the reserve limit) and page copies on their own stream (a page out to pinned memory and back
// arrives intact, and each copy is timed).
#include <cstring>
#include <vector>

#include "../test/harness.h"
#include "cuda/memory.h"
#include "gpu/caching_allocator.h"

using namespace qlora;

TEST(gpu_caching_allocator_over_cudamalloc) {
  gpu::CachingAllocator a([](size_t n) { return cuda::device_malloc(n); }, [](void* p) { cuda::device_free(p); });
  void* x = a.allocate(3 << 20, "activations");
  a.free(x);
  void* y = a.allocate(2 << 20, "activations");
  EXPECT_TRUE(x == y, "a freed block of about the size is reused");
  EXPECT_EQ(a.device_allocations(), int64_t{1});
  a.free(y);
  a.set_reserve_limit(3 << 20);
  void* z = a.allocate(1 << 20, "workspace");  // the cached 3 MiB goes back before a new block passes the limit
  EXPECT_EQ(a.reserved_bytes(), int64_t{1 << 20});
  a.free(z);
  // a request larger than the device is an error naming it, not a crash
  size_t free_bytes = 0, total = 0;
  cuda::memory_info(&free_bytes, &total);
  EXPECT_THROWS_WITH(a.allocate(total * 2, "weights"), "the GPU has no room for");
}

TEST(gpu_page_copies_round_trip_on_their_stream_and_are_timed) {
  const size_t n = 5'000'003;  // not a multiple of anything
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) values[i] = static_cast<float>(i) * 0.5f - 7.0f;
  float* device = static_cast<float*>(cuda::device_malloc(n * sizeof(float)));
  float* host = static_cast<float*>(cuda::pinned_malloc(n * sizeof(float)));
  cuda::copy_to_device(device, values.data(), n * sizeof(float));
  cuda::PageCopier copier;
  const double out_ms = copier.finish(copier.begin(host, device, n * sizeof(float), true));
  EXPECT_TRUE(std::memcmp(host, values.data(), n * sizeof(float)) == 0, "paged out intact");
  for (size_t i = 0; i < n; ++i) host[i] += 1.0f;
  const int64_t a = copier.begin(device, host, n * sizeof(float), false);
  const double in_ms = copier.finish(a);
  std::vector<float> back(n);
  cuda::copy_to_host(back.data(), device, n * sizeof(float));
  for (size_t i = 0; i < n; i += 9973) EXPECT_EQ(back[i], values[i] + 1.0f);
  EXPECT_TRUE(out_ms > 0.0 && in_ms > 0.0, out_ms, " ms out, ", in_ms, " ms in");
  cuda::pinned_free(host);
  cuda::device_free(device);
}
