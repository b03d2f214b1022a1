// The CUDA executor of KernelBackend (cuda/kernel_backend.h): kernel launches on the default stream, device memory
// from the caching allocator, cuBLASLt for the GEMMs, page copies on the PageCopier's stream. Also the standalone NF4
// calls of nf4_kernels.h. The only translation unit that includes cuda/kernels.cuh (its kernels are defined there).
#include "cuda/cuda_backend.h"

#include <string>
#include <utility>
#include <vector>

#include "cuda/check.cuh"
#include "cuda/kernel_backend.h"
#include "cuda/memory.h"
#include "cuda/nf4_kernels.h"
#include "gpu/caching_allocator.h"
#include "gpu/cublaslt.h"

namespace qlora {

namespace {

// A GEMM's name in the profile: its types, shape and transposes ("gemm bf16 8192x2048x2048 NT").
std::string gemm_op(const char* types, bool ta, bool tb, int64_t M, int64_t N, int64_t K) {
  return std::string("gemm ") + types + " " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
         " " + (ta ? "T" : "N") + (tb ? "T" : "N");
}

class CudaExec {
 public:
  static constexpr int kThreads = 256;
  static_assert(kThreads <= cuda::kernels::kMaxThreads && (kThreads & (kThreads - 1)) == 0,
                "the kernels' block reductions take a power of two up to kMaxThreads threads");
  static constexpr int64_t kRoundingSlack = int64_t{64} << 20;
  const int threads = kThreads;
  const int64_t max_grid_blocks = 4096;  // 1M threads: enough to fill any GPU, each looping over the rest

  explicit CudaExec(const CudaBackendOptions& options)
      : lt_(&gpu::CublasLt::get(options.library_dir)),
        allocator_([](size_t bytes) { return cuda::device_malloc(bytes); }, [](void* p) { cuda::device_free(p); }) {
    int device = 0;
    QLORA_CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    QLORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    if (prop.major * 10 + prop.minor < 75)
      fail("the GPU ", prop.name, " (compute capability ", prop.major, ".", prop.minor,
           ") is older than Turing (7.5), the oldest this engine is built for; train on the CPU (--device cpu)");
    if (options.compute == GpuCompute::BF16 && prop.major < 8)
      fail("bf16 compute needs an Ampere or newer GPU (compute capability 8.0); ", prop.name, " has ", prop.major, ".",
           prop.minor, ": use fp16 (--dtype fp16) or fp32 compute (--dtype f32)");
    name_ = std::string("cuda:") + prop.name;
    // The architecture the kernels were built for on this GPU: the device's, or older where the build has only an
    // older architecture's PTX, which the driver compiles for it (the tensor-core kernels are traps there).
    cudaFuncAttributes built{};
    QLORA_CUDA_CHECK(cudaFuncGetAttributes(&built, cuda::kernels::flash_attention_forward<64, false>));
    sm_ = std::min(prop.major * 10 + prop.minor, built.ptxVersion);
  }

  ~CudaExec() {
    for (const Timed& t : timed_) spare_.insert(spare_.end(), {t.start, t.stop});
    for (cudaEvent_t e : spare_) cudaEventDestroy(e);  // no check: a failing destructor has nowhere to report
  }
  CudaExec(const CudaExec&) = delete;
  CudaExec& operator=(const CudaExec&) = delete;

  std::string name() const { return name_; }
  int sm() const { return sm_; }

  template <typename... Params, typename... Args>
  void launch(const char* what, dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
    timed(what, [&] { kernel<<<grid, block>>>(args...); });
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
      fail("CUDA kernel ", what, " (grid ", grid.x, "x", grid.y, "x", grid.z, ", block ", block.x, ") failed to start: ",
           cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  }

  // ---- profile: a pair of CUDA events around each kernel and GEMM while on, read back by take_profile ----
  void set_profiling(bool on) { profiling_ = on; }
  std::vector<OpTime> take_profile() {
    drain_timings();
    return profile_.take();
  }

  void* alloc(size_t bytes, const char* what) { return allocator_.allocate(bytes, what); }
  // The budget bounds what the allocator holds from the device, its cache included, so that paging really frees
  // device memory; the slack covers the rounding of each block to 512 bytes.
  void set_memory_limit(int64_t budget) {
    allocator_.set_reserve_limit(budget > 0 ? budget + kRoundingSlack : 0);
    if (budget > 0 && allocator_.reserved_bytes() > budget + kRoundingSlack) allocator_.release_cached();
  }
  void free(void* p) { allocator_.free(p); }
  void upload(void* dst, const void* src, size_t bytes) { cuda::copy_to_device(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) { cuda::copy_to_host(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) {
    QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cudaStreamLegacy));
  }
  void zero(void* p, size_t bytes) { QLORA_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cudaStreamLegacy)); }

  // cuBLASLt's recommended workspace for Hopper; smaller GPUs use less of it.
  size_t gemm_workspace_bytes() const { return static_cast<size_t>(kCudaGemmWorkspaceBytes); }
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta,
            float* C, void* workspace, size_t workspace_bytes) {
    const std::string op = profiling_ ? gemm_op("f32", ta, tb, M, N, K) : std::string();
    timed(op.c_str(), [&] {
      lt_->matmul(ta, tb, M, N, K, alpha, A, B, beta, C, gpu::GemmType::F32, gpu::GemmType::F32, workspace,
                  workspace_bytes, nullptr);
    });
  }
  // False when cuBLASLt has no half algorithm for this shape and alignment: the backend computes it in fp32.
  bool gemm_half(bool f16, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
                 const uint16_t* B, float beta, float* C, void* workspace, size_t workspace_bytes, int64_t lda = 0,
                 int64_t ldb = 0) {
    bool done = false;
    const std::string op = profiling_ ? gemm_op(f16 ? "f16" : "bf16", ta, tb, M, N, K) : std::string();
    timed(op.c_str(), [&] {
      done = lt_->try_matmul(ta, tb, M, N, K, alpha, A, B, beta, C, f16 ? gpu::GemmType::F16 : gpu::GemmType::BF16,
                             gpu::GemmType::F32, workspace, workspace_bytes, nullptr, lda, ldb);
    });
    return done;
  }
  // gemm_half with C written (beta 0) in the inputs' 16 bits, its rows ldc values apart: the fp32 sums rounded.
  bool gemm_half_to_half(bool f16, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
                         const uint16_t* B, uint16_t* C, int64_t ldc, void* workspace, size_t workspace_bytes,
                         int64_t ldb = 0) {
    bool done = false;
    const std::string op = profiling_ ? gemm_op(f16 ? "f16>f16" : "bf16>bf16", ta, tb, M, N, K) : std::string();
    timed(op.c_str(), [&] {
      const gpu::GemmType half = f16 ? gpu::GemmType::F16 : gpu::GemmType::BF16;
      done = lt_->try_matmul(ta, tb, M, N, K, alpha, A, B, 0.0f, C, half, half, workspace, workspace_bytes, nullptr, 0,
                             ldb, ldc);
    });
    return done;
  }

  void* alloc_host(size_t bytes) { return cuda::pinned_malloc(bytes); }
  void free_host(void* p) { cuda::pinned_free(p); }
  int64_t begin_page_copy(void* dst, const void* src, size_t bytes, bool to_host) {
    return copier_.begin(dst, src, bytes, to_host);
  }
  double finish_page_copy(int64_t ticket) { return copier_.finish(ticket); }

 private:
  struct Timed {
    std::string op;
    cudaEvent_t start, stop;
  };
  // Runs `work` (launches on the legacy stream) between two events when profiling; they are read back later. The
  // events go back to the spares if anything throws.
  template <typename Work>
  void timed(const char* op, Work&& work) {
    if (!profiling_) return work();
    const cudaEvent_t start = spare_event(), stop = spare_event();
    try {
      QLORA_CUDA_CHECK(cudaEventRecord(start, cudaStreamLegacy));
      work();
      QLORA_CUDA_CHECK(cudaEventRecord(stop, cudaStreamLegacy));
    } catch (...) {
      spare_.insert(spare_.end(), {start, stop});
      throw;
    }
    timed_.push_back({op, start, stop});
    if (timed_.size() >= 8192) drain_timings();  // bounded, even if nobody takes the profile
  }
  cudaEvent_t spare_event() {
    if (spare_.empty()) {
      cudaEvent_t e = nullptr;
      QLORA_CUDA_CHECK(cudaEventCreate(&e));
      return e;
    }
    const cudaEvent_t e = spare_.back();
    spare_.pop_back();
    return e;
  }
  // Each pair leaves timed_ before it is read, so that an error halfway leaves every event in exactly one list.
  void drain_timings() {
    if (timed_.empty()) return;
    std::vector<Timed> pending;
    pending.swap(timed_);
    size_t next = 0;
    try {
      QLORA_CUDA_CHECK(cudaEventSynchronize(pending.back().stop));
      for (; next < pending.size(); ++next) {
        float ms = 0.0f;
        QLORA_CUDA_CHECK(cudaEventElapsedTime(&ms, pending[next].start, pending[next].stop));
        profile_.add(pending[next].op, ms);
        spare_.insert(spare_.end(), {pending[next].start, pending[next].stop});
      }
    } catch (...) {
      for (; next < pending.size(); ++next) spare_.insert(spare_.end(), {pending[next].start, pending[next].stop});
      throw;
    }
  }

  const gpu::CublasLt* lt_;
  gpu::CachingAllocator allocator_;
  cuda::PageCopier copier_;
  std::string name_;
  int sm_ = 0;  // compute capability the kernels were built for, major * 10 + minor
  bool profiling_ = false;
  std::vector<Timed> timed_;
  std::vector<cudaEvent_t> spare_;
  OpProfile profile_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options) {
  auto backend = std::make_unique<cuda::KernelBackend<CudaExec>>(options);
  backend->set_compute(options.compute);
  return backend;
}

}  // namespace qlora

namespace qlora::cuda {

constexpr int kNf4Threads = 256;

void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, FloatFormat round_to, float* out) {
  if (n <= 0) return;
  nf4::check_blocksize(blocksize, "cuda::nf4_dequantize");
  const int64_t bytes = (n + 1) / 2;
  const int64_t blocks = std::min<int64_t>((bytes + kNf4Threads - 1) / kNf4Threads, 65535);
  kernels::nf4_dequantize<<<static_cast<unsigned>(blocks), kNf4Threads>>>(packed, absmax, n, blocksize,
                                                                        static_cast<int>(round_to), out);
  QLORA_CUDA_CHECK_LAUNCH("nf4_dequantize");
}

void nf4_quantize(const float* x, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
  if (n <= 0) return;
  nf4::check_blocksize(blocksize, "cuda::nf4_quantize");
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  kernels::nf4_quantize<<<static_cast<unsigned>(blocks), kNf4Threads>>>(x, n, blocksize, packed, absmax);
  QLORA_CUDA_CHECK_LAUNCH("nf4_quantize");
}

}  // namespace qlora::cuda
