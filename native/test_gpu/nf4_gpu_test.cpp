// NF4 on the GPU against the CPU reference (itself bit-identical to bitsandbytes): quantize byte for byte and
// dequantize bit for bit, on sizes that are not multiples of anything (odd lengths, partial last blocks, one
// element), block sizes 64 to 4096, zero blocks and NaN; and the bitsandbytes vectors directly.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../test/harness.h"
#include "cuda/memory.h"
#include "cuda/nf4_kernels.h"
#include "io/dtype.h"
#include "io/safetensors.h"
#include "quant/nf4.h"
#include "util/philox.h"

using namespace qlora;

namespace {

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { ptr = static_cast<T*>(cuda::device_malloc(std::max<size_t>(1, n) * sizeof(T))); }
  DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { cuda::copy_to_device(ptr, host.data(), n * sizeof(T)); }
  ~DeviceBuffer() { cuda::device_free(ptr); }
  std::vector<T> get() const {
    std::vector<T> host(n);
    cuda::copy_to_host(host.data(), ptr, n * sizeof(T));
    return host;
  }
};

std::vector<float> random_weights(int64_t n, uint64_t seed) {
  const Philox rng(seed, RngStream::TinyModelInit);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = 0.02f * rng.normal(static_cast<uint64_t>(i));
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void check_quantize(const std::vector<float>& x, int blocksize, const std::string& label) {
  const int64_t n = static_cast<int64_t>(x.size());
  const nf4::Blockwise4bit cpu = nf4::quantize(x.data(), n, blocksize);
  DeviceBuffer<float> dx(x);
  DeviceBuffer<uint8_t> packed(cpu.packed.size());
  DeviceBuffer<float> absmax(cpu.absmax.size());
  cuda::nf4_quantize(dx.ptr, n, blocksize, packed.ptr, absmax.ptr);
  EXPECT_TRUE(packed.get() == cpu.packed, label, ": packed codes differ from the CPU's");
  EXPECT_TRUE(same_bits(absmax.get(), cpu.absmax), label, ": absmax differs from the CPU's");
  for (FloatFormat r : {FloatFormat::F32, FloatFormat::BF16, FloatFormat::F16}) {
    std::vector<float> want(x.size());
    nf4::dequantize(cpu.packed.data(), cpu.absmax.data(), n, blocksize, want.data());
    for (float& v : want) v = r == FloatFormat::F32 ? v : r == FloatFormat::BF16 ? round_to_bf16(v) : round_to_f16(v);
    DeviceBuffer<float> out(x.size());
    cuda::nf4_dequantize(packed.ptr, absmax.ptr, n, blocksize, r, out.ptr);
    EXPECT_TRUE(same_bits(out.get(), want), label, ": dequantized values differ from the CPU's (round_to ", static_cast<int>(r), ")");
  }
}

}  // namespace

TEST(gpu_nf4_quantize_and_dequantize_match_the_cpu_on_awkward_sizes) {
  for (int64_t n : {1, 2, 3, 63, 64, 65, 127, 1001, 4097, 300007})
    for (int blocksize : {64, 128, 4096}) check_quantize(random_weights(n, static_cast<uint64_t>(n)), blocksize, "n " + std::to_string(n) + " block " + std::to_string(blocksize));
}

TEST(gpu_nf4_zero_blocks_nan_and_exact_midpoints) {
  std::vector<float> x(64 * 3 + 5, 0.0f);          // block 0 all zero
  x[64] = std::numeric_limits<float>::quiet_NaN();  // block 1: NaN skipped by the absmax, code 0
  x[65] = 1.0f;
  x[66] = 0.03979014977812767f;  // exactly on a midpoint: the lower code
  for (int i = 128; i < 64 * 3 + 5; ++i) x[static_cast<size_t>(i)] = (i % 7 - 3) * 0.25f;
  check_quantize(x, 64, "edges");
}

TEST(gpu_nf4_matches_the_bitsandbytes_vectors) {
  auto store = TensorStore::open_file(qtest::reference("nf4-vectors.safetensors"));
  for (const std::string v : {"v0", "v2"}) {
    const std::vector<float> x = store->read_f32(v + ".input_bf16");
    const int64_t n = static_cast<int64_t>(x.size());
    DeviceBuffer<float> dx(x);
    DeviceBuffer<uint8_t> packed(static_cast<size_t>((n + 1) / 2));
    DeviceBuffer<float> absmax(static_cast<size_t>((n + 63) / 64));
    cuda::nf4_quantize(dx.ptr, n, 64, packed.ptr, absmax.ptr);
    const uint8_t* want = store->data(v + "_plain.packed_u8");
    const std::vector<uint8_t> got = packed.get();
    EXPECT_TRUE(got.size() == store->info(v + "_plain.packed_u8").nbytes && std::memcmp(got.data(), want, got.size()) == 0,
                v, ": packed codes differ from bitsandbytes'");
    DeviceBuffer<float> out(x.size());
    cuda::nf4_dequantize(packed.ptr, absmax.ptr, n, 64, FloatFormat::BF16, out.ptr);
    EXPECT_TRUE(same_bits(out.get(), store->read_f32(v + "_plain.dequant_f32")), v, ": dequantized values differ from bitsandbytes'");
  }
}
