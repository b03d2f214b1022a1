// The GPU backend's kernels and host code (cuda/kernels.cuh, cuda/kernel_backend.h), run under the CUDA emulator of
// cuda_emu.h, against the CPU backend: every op on awkward sizes (odd row lengths, GQA, sequence lengths that are
// not multiples of the block, vocabularies larger than a block), NF4 and dropout bit for bit, and the whole model
// (loss, every log-prob, every LoRA gradient, AdamW steps, paging, generation) on the reference fixtures. What runs
// here is what runs on the GPU except the launch itself, device memory, the copy stream and cuBLASLt; those are
// tested by `npm run test:gpu` on a GPU.
#ifndef _WIN32
#include "cuda_emu.h"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "backend_parity.h"
#include "cpu/kernels.h"
#include "cuda/kernel_backend.h"
#include "harness.h"
#include "quant/nf4.h"

using namespace qlora;

namespace {

// The executor of KernelBackend on the CPU: kernels run as emulated CUDA threads, memory is host memory, the GEMM
// is the CPU's (cuBLASLt's part is checked on the GPU).
struct EmulatorExec {
  int threads;
  explicit EmulatorExec(int block_threads) : threads(block_threads) {}
  std::string name() const { return "cuda-emulator"; }
  template <typename... Params, typename... Args>
  void launch(const char*, dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
    cuda_emu::launch(grid, block, [&] { kernel(args...); });
  }
  void* alloc(size_t bytes, const char* what) {
    void* p = std::malloc(bytes);
    if (!p) fail("out of memory for ", what);
    return p;
  }
  void free(void* p) { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
  void zero(void* p, size_t bytes) { std::memset(p, 0, bytes); }
  size_t gemm_workspace_bytes() const { return 0; }
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B, float beta,
            float* C, void*, size_t) {
    cpu::gemm<float>(ta, tb, M, N, K, alpha, A, B, beta, C);
  }
  void* alloc_host(size_t bytes) { return alloc(bytes, "paged-out memory"); }
  void free_host(void* p) { std::free(p); }
  int64_t begin_page_copy(void* dst, const void* src, size_t bytes, bool) {
    std::memcpy(dst, src, bytes);
    return 0;
  }
  double finish_page_copy(int64_t) { return 0.0; }
};

using EmulatedBackend = cuda::KernelBackend<EmulatorExec>;

std::unique_ptr<EmulatedBackend> emulated(int threads) { return std::make_unique<EmulatedBackend>(threads); }
parity::MakeBackend emulated_with(int threads) {
  return [threads]() -> std::unique_ptr<Backend> { return emulated(threads); };
}

// The emulator runs the GPU's fp32 arithmetic: only the order of sums differs from the CPU's.
constexpr parity::ModelTolerance kEmulatedTolerance{1e-5, 1e-5, 1e-4};

}  // namespace

TEST(cuda_emu_runs_every_thread_and_orders_them_at_barriers) {
  // A block sum over 64 threads of a grid of 3 blocks: every thread's value counted once, every thread sees the total.
  std::vector<double> out(3 * 64, -1.0);
  cuda_emu::launch(dim3(3), dim3(64), [&] {
    const double v = static_cast<double>(blockIdx.x * 100 + threadIdx.x);
    const double total = cuda::kernels::block_sum(v);
    out[blockIdx.x * 64 + threadIdx.x] = total;
  });
  for (unsigned b = 0; b < 3; ++b)
    for (unsigned t = 0; t < 64; ++t) EXPECT_EQ(out[b * 64 + t], 64.0 * 100 * b + 63 * 64 / 2);
}

// Blocks of 32 and 256 threads: rows shorter and longer than a block.
TEST(cuda_kernels_elementwise_and_row_ops_match_the_cpu) {
  parity::elementwise_and_row_ops(emulated_with(32));
  parity::elementwise_and_row_ops(emulated_with(256));
}
TEST(cuda_kernels_cross_entropy_and_log_softmax_match_the_cpu) { parity::cross_entropy_and_log_softmax(emulated_with(64)); }
TEST(cuda_kernels_rope_and_attention_match_the_cpu) { parity::rope_and_attention(emulated_with(32)); }
TEST(cuda_kernels_nf4_dequantize_and_dropout_are_bit_identical_to_the_cpu) {
  parity::nf4_dequantize_and_dropout_bit_for_bit(emulated_with(64));
}

TEST(cuda_kernels_nf4_quantize_is_bitsandbytes_byte_for_byte) {
  auto emu = emulated(64);
  // 1000 values in blocks of 64 (a partial last block), one all-zero block, an odd count
  for (int64_t n : {int64_t{1000}, int64_t{999}}) {
    std::vector<float> x = parity::random_floats(static_cast<size_t>(n), 31);
    for (int64_t i = 128; i < 192; ++i) x[i] = 0.0f;
    const nf4::Blockwise4bit expected = nf4::quantize(x.data(), n, 64);
    DeviceArray<float> xd(emu.get(), n, MemCategory::Workspace), absmax(emu.get(), (n + 63) / 64, MemCategory::Workspace);
    DeviceArray<uint8_t> packed(emu.get(), (n + 1) / 2, MemCategory::Workspace);
    xd.upload(x);
    emu->nf4_quantize(xd.get(), n, 64, packed.get(), absmax.get());
    const std::vector<uint8_t> codes = packed.download();
    const std::vector<float> scales = absmax.download();
    EXPECT_TRUE(codes == expected.packed, "NF4 codes of ", n, " values");
    EXPECT_TRUE(std::memcmp(scales.data(), expected.absmax.data(), scales.size() * sizeof(float)) == 0, "absmax");
  }
}

TEST(cuda_backend_whole_model_matches_the_cpu_on_the_reference_fixtures) {
  parity::whole_model(emulated_with(32), kEmulatedTolerance);
}
TEST(cuda_backend_trains_nf4_with_paging_and_generates_like_the_cpu) {
  parity::training_paging_and_generation(emulated_with(64), kEmulatedTolerance);
}
#endif
