#include "cuda/memory.h"

#include "cuda/check.cuh"

namespace qlora::cuda {

void* device_malloc(size_t bytes) {
  void* ptr = nullptr;
  const cudaError_t e = cudaMalloc(&ptr, bytes);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // clear it: out of memory is an answer here, not a sticky error
    return nullptr;
  }
  QLORA_CUDA_CHECK(e);
  return ptr;
}

void device_free(void* ptr) { QLORA_CUDA_CHECK(cudaFree(ptr)); }

void* pinned_malloc(size_t bytes) {
  void* ptr = nullptr;
  const cudaError_t e = cudaMallocHost(&ptr, bytes);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    // what moves out of the GPU (optimizer pages, offloaded block inputs) and a step's embedding rows live here
    fail("could not page-lock ", static_cast<double>(bytes) / (1 << 20), " MiB of host memory for what the GPU "
         "moves out of its memory or reads from the host: free some RAM, or give the run a larger GPU memory budget");
  }
  QLORA_CUDA_CHECK(e);
  return ptr;
}

void pinned_free(void* ptr) { QLORA_CUDA_CHECK(cudaFreeHost(ptr)); }

void copy_to_device(void* dst, const void* src, size_t bytes) {
  QLORA_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  QLORA_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

void synchronize() { QLORA_CUDA_CHECK(cudaDeviceSynchronize()); }

void memory_info(size_t* free_bytes, size_t* total_bytes) { QLORA_CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes)); }

PageCopier::PageCopier() {
  cudaStream_t s = nullptr;
  QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream_ = s;
}

PageCopier::~PageCopier() {
  const auto destroy = [](Copy& c) {  // finished slots hold no events
    if (c.start) cudaEventDestroy(static_cast<cudaEvent_t>(c.start));
    if (c.end) cudaEventDestroy(static_cast<cudaEvent_t>(c.end));
  };
  cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  for (Copy& c : copies_) destroy(c);
  for (Copy& c : spare_) destroy(c);
  cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

int64_t PageCopier::begin(void* dst, const void* src, size_t bytes, bool to_host) {
  Copy c;
  if (!spare_.empty()) {
    c = spare_.back();
    spare_.pop_back();
  } else {
    cudaEvent_t start = nullptr, end = nullptr;
    QLORA_CUDA_CHECK(cudaEventCreate(&start));
    QLORA_CUDA_CHECK(cudaEventCreate(&end));
    c.start = start;
    c.end = end;
  }
  const auto stream = static_cast<cudaStream_t>(stream_);
  // after everything the default stream has been given so far (the update that wrote the page, say)
  QLORA_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(c.start), cudaStreamLegacy));
  QLORA_CUDA_CHECK(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(c.start), 0));
  QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, stream));
  QLORA_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(c.end), stream));
  copies_.push_back(c);
  return static_cast<int64_t>(copies_.size()) - 1;
}

double PageCopier::finish(int64_t ticket) {
  if (ticket < 0 || ticket >= static_cast<int64_t>(copies_.size()) || !copies_[static_cast<size_t>(ticket)].end)
    fail("PageCopier::finish: unknown ticket ", ticket);
  Copy& c = copies_[static_cast<size_t>(ticket)];
  const auto end = static_cast<cudaEvent_t>(c.end);
  QLORA_CUDA_CHECK(cudaEventSynchronize(end));
  QLORA_CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, end, 0));
  float ms = 0.0f;
  // from when the default stream reached the copy to its end: the copy itself, plus any wait behind earlier copies
  // still on the copy stream (the time the page was not yet there)
  QLORA_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(c.start), end));
  spare_.push_back(c);
  c = Copy{};
  // once every copy is finished the tickets start again from 0
  bool all_done = true;
  for (const Copy& k : copies_) all_done = all_done && !k.end;
  if (all_done) copies_.clear();
  return ms;
}

}  // namespace qlora::cuda
