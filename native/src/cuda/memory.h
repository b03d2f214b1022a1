// Device and page-locked host memory, copies, and the page-copy stream of the paged optimizer, through the CUDA
// runtime. Plain C++ declarations (no CUDA types), so that code compiled without nvcc can call them; defined in
// memory.cu, which is built only with the CUDA backend.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace qlora::cuda {

// cudaMalloc; nullptr when the device has no room (any other failure is an EngineError).
void* device_malloc(size_t bytes);
void device_free(void* ptr);
// cudaMallocHost: page-locked, so that copies to and from it run asynchronously.
void* pinned_malloc(size_t bytes);
void pinned_free(void* ptr);
// Synchronous copies (tests, loading weights).
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
void synchronize();
// Free and total memory of the current device (cudaMemGetInfo).
void memory_info(size_t* free_bytes, size_t* total_bytes);

// Copies between device and page-locked host memory on a stream of their own, ordered after the compute issued on
// the default stream so far (the engine computes on the default stream; a compute stream of its own would have to
// be handed to this), timed with events.
class PageCopier {
 public:
  PageCopier();
  ~PageCopier();
  PageCopier(const PageCopier&) = delete;
  PageCopier& operator=(const PageCopier&) = delete;
  // to_host: device src -> host dst; else host src -> device dst. Returns a ticket.
  int64_t begin(void* dst, const void* src, size_t bytes, bool to_host);
  // Waits for the copy, makes the default stream wait for it too, and returns its duration in ms.
  double finish(int64_t ticket);

 private:
  struct Copy {
    void* start = nullptr;  // cudaEvent_t
    void* end = nullptr;
  };
  void* stream_ = nullptr;  // cudaStream_t
  std::vector<Copy> copies_;
  std::vector<Copy> spare_;  // events of finished copies, reused
};

}  // namespace qlora::cuda
