// The GPU GEMM (cuBLASLt, fp32 accumulation) against the CPU reference GEMM in fp64, for every transpose
// combination on sizes that are multiples of nothing, with fp32 inputs (within fp32 rounding) and bf16 / fp16 inputs
// (the CPU given the same rounded inputs).
#include <array>
#include <cmath>
#include <vector>

#include "../test/harness.h"
#include "cpu/kernels.h"
#include "cuda/memory.h"
#include "gpu/cublaslt.h"
#include "io/dtype.h"
#include "util/philox.h"

using namespace qlora;

namespace {

std::vector<float> random_matrix(int64_t n, uint64_t seed) {
  const Philox rng(seed, RngStream::TinyModelInit);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = rng.normal(static_cast<uint64_t>(i));
  return x;
}

void* upload(const void* host, size_t bytes) {
  void* d = cuda::device_malloc(bytes);
  cuda::copy_to_device(d, host, bytes);
  return d;
}

// max |gpu - ref| / max |ref| over C
double gemm_error(bool ta, bool tb, int64_t M, int64_t N, int64_t K, gpu::GemmType in) {
  std::vector<float> a = random_matrix(M * K, 1), b = random_matrix(K * N, 2), c = random_matrix(M * N, 3);
  std::vector<uint16_t> a16(a.size()), b16(b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    a16[i] = in == gpu::GemmType::BF16 ? f32_to_bf16(a[i]) : f32_to_f16(a[i]);
    a[i] = in == gpu::GemmType::F32 ? a[i] : in == gpu::GemmType::BF16 ? bf16_to_f32(a16[i]) : f16_to_f32(a16[i]);
  }
  for (size_t i = 0; i < b.size(); ++i) {
    b16[i] = in == gpu::GemmType::BF16 ? f32_to_bf16(b[i]) : f32_to_f16(b[i]);
    b[i] = in == gpu::GemmType::F32 ? b[i] : in == gpu::GemmType::BF16 ? bf16_to_f32(b16[i]) : f16_to_f32(b16[i]);
  }
  const bool f32 = in == gpu::GemmType::F32;
  void* da = f32 ? upload(a.data(), a.size() * 4) : upload(a16.data(), a16.size() * 2);
  void* db = f32 ? upload(b.data(), b.size() * 4) : upload(b16.data(), b16.size() * 2);
  void* dc = upload(c.data(), c.size() * 4);
  gpu::CublasLt::get().matmul(ta, tb, M, N, K, 0.75f, da, db, 0.5f, dc, in, gpu::GemmType::F32, nullptr, 0, nullptr);
  std::vector<float> got(c.size());
  cuda::copy_to_host(got.data(), dc, got.size() * 4);
  cuda::device_free(da);
  cuda::device_free(db);
  cuda::device_free(dc);
  // the reference in fp64 on the same (rounded) inputs
  std::vector<double> a64(a.begin(), a.end()), b64(b.begin(), b.end()), ref(c.begin(), c.end());
  cpu::gemm<double>(ta, tb, M, N, K, 0.75, a64.data(), b64.data(), 0.5, ref.data());
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  return err / scale;
}

}  // namespace

TEST(gpu_gemm_matches_the_cpu_for_every_transpose_on_awkward_sizes) {
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (const auto& [M, N, K] : {std::array<int64_t, 3>{37, 53, 71}, {1, 129, 33}, {200, 3, 517}}) {
        const double e32 = gemm_error(ta, tb, M, N, K, gpu::GemmType::F32);
        EXPECT_TRUE(e32 < 1e-5, "fp32 ", ta, tb, " ", M, "x", N, "x", K, ": relative error ", e32);
        for (gpu::GemmType t : {gpu::GemmType::BF16, gpu::GemmType::F16}) {
          const double e = gemm_error(ta, tb, M, N, K, t);
          // the inputs are exact in both; only the fp32 accumulation order differs
          EXPECT_TRUE(e < 1e-5, "16-bit inputs ", ta, tb, " ", M, "x", N, "x", K, ": relative error ", e);
        }
      }
}
