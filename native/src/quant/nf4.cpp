// NF4 blockwise quantization and double quantization, reproducing bitsandbytes' CUDA kernels to the bit
// (kQuantizeBlockwise with dQuantizeNF4 / dQuantize, create_dynamic_map). The float operations below are kept in
// the same order and precision as there; comments say where that matters.
#include "quant/nf4.h"

#include <algorithm>
#include <cmath>

#include "util/error.h"
#include "util/per_thread.h"
#include "util/simd_clones.h"

namespace qlora::nf4 {

const float kCodes[16] = {code_value(0),  code_value(1),  code_value(2),  code_value(3),
                          code_value(4),  code_value(5),  code_value(6),  code_value(7),
                          code_value(8),  code_value(9),  code_value(10), code_value(11),
                          code_value(12), code_value(13), code_value(14), code_value(15)};

void check_blocksize(int blocksize, const char* what) {
  QLORA_CHECK(blocksize > 0 && blocksize % 2 == 0, what, " blocksize must be a positive even number, got ", blocksize);
}

void check_rows(int64_t row_len, int64_t row_stride, const char* what) {
  if (row_len <= 0 || row_stride < row_len) fail(what, ": rows of ", row_len, " values ", row_stride, " apart");
}

namespace {

// The result of quantizing n values in blocks of `blocksize` (checked, naming `what`), its bytes not yet written.
Blockwise4bit blockwise_sized(int64_t n, int blocksize, const char* what) {
  check_blocksize(blocksize, what);
  QLORA_CHECK(n >= 0, what, ": negative length ", n);
  Blockwise4bit out;
  out.packed.resize(static_cast<size_t>((n + 1) / 2));
  out.absmax.resize(static_cast<size_t>((n + blocksize - 1) / blocksize));
  return out;
}

// max |x| over a block; NaN is skipped as fmaxf does in the kernel. Whole chunks of 64 go through loops the
// compiler vectorizes: |x| with NaN as 0 (which changes no maximum of values >= 0), then halving maxima; the
// maximum of values >= 0 is the same in any order.
inline float block_absmax(const float* x, int64_t count) {
  constexpr int64_t kChunk = 64;
  float m = 0.0f;
  int64_t i = 0;
  for (; i + kChunk <= count; i += kChunk) {
    float a[kChunk];
    for (int64_t k = 0; k < kChunk; ++k) {
      const float v = std::fabs(x[i + k]);
      a[k] = v > 0.0f ? v : 0.0f;
    }
    for (int64_t width = kChunk / 2; width >= 1; width /= 2)
      for (int64_t k = 0; k < width; ++k) a[k] = a[k + width] > a[k] ? a[k + width] : a[k];
    if (a[0] > m) m = a[0];
  }
  for (; i < count; ++i) {
    const float v = std::fabs(x[i]);
    if (v > m) m = v;
  }
  return m;
}

}  // namespace

// Vectorized: the codes are counts of kMidpoints exceeded (the decision tree's code, as the static_assert in
// nf4_codebook.h and nf4_test check), instead of a branch per tree level and value.
QLORA_SIMD_CLONES
float quantize_block(const float* x, int64_t count, uint8_t* packed) {
  const float absmax = block_absmax(x, count);
  const int64_t bytes = (count + 1) / 2;
  if (absmax == 0.0f) {  // the GPU path computes 0 * inf = NaN -> code 0
    std::fill(packed, packed + bytes, uint8_t{0});
    return absmax;
  }
  // The kernel multiplies by the fp32 reciprocal; x / absmax would round differently.
  const float scale = 1.0f / absmax;
  constexpr int64_t kChunk = 64;
  uint8_t codes[kChunk + 1];
  for (int64_t start = 0; start < count; start += kChunk) {
    const int64_t len = std::min(kChunk, count - start);
    for (int64_t k = 0; k < len; ++k) {
      const float v = x[start + k] * scale;
      int code = 0;
      for (int t = 0; t < 15; ++t) code += v > kMidpoints[t] ? 1 : 0;
      codes[k] = static_cast<uint8_t>(code);
    }
    // An odd count leaves one padding element in the last byte's low nibble. The kernel loads it as 0.0f and
    // quantizes it like any other element (code 7, the NF4 zero; NaN's 0 where the scale is infinite).
    if (len % 2 != 0) codes[len] = quantize_normalized(0.0f * scale);
    for (int64_t k = 0; k < len; k += 2)
      packed[(start + k) / 2] = static_cast<uint8_t>((codes[k] << 4) | codes[k + 1]);
  }
  return absmax;
}

Blockwise4bit quantize(const float* x, int64_t n, int blocksize) {
  Blockwise4bit out = blockwise_sized(n, blocksize, "nf4::quantize");
  const int64_t nblocks = static_cast<int64_t>(out.absmax.size());
  // Blocks are independent and start on a byte (an even block size), so threads never share a byte.
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t count = std::min<int64_t>(blocksize, n - begin);
    out.absmax[static_cast<size_t>(b)] = quantize_block(x + begin, count, out.packed.data() + begin / 2);
  }
  return out;
}

namespace {

// Runs `visit(b, begin, count, values)` for every block of n values, on every core, with the block's values that
// `load` wrote into a buffer of the thread's own.
template <typename Visit>
void for_each_loaded_block(int64_t n, int blocksize, const BlockLoader& load, Visit visit) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  PerThreadScratch<float> scratch(static_cast<size_t>(std::min<int64_t>(blocksize, n)));
#pragma omp parallel num_threads(scratch.threads())
  {
    float* values = scratch.mine();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * blocksize;
      const int64_t count = std::min<int64_t>(blocksize, n - begin);
      load(begin, count, values);
      visit(b, begin, count, values);
    }
  }
}

}  // namespace

Blockwise4bit quantize_loaded(int64_t n, int blocksize, const BlockLoader& load) {
  Blockwise4bit out = blockwise_sized(n, blocksize, "nf4::quantize_loaded");
  for_each_loaded_block(n, blocksize, load, [&](int64_t b, int64_t begin, int64_t count, const float* values) {
    out.absmax[static_cast<size_t>(b)] = quantize_block(values, count, out.packed.data() + begin / 2);
  });
  return out;
}

std::vector<float> absmax_loaded(int64_t n, int blocksize, const BlockLoader& load) {
  check_blocksize(blocksize, "nf4::absmax_loaded");
  QLORA_CHECK(n >= 0, "nf4::absmax_loaded: negative length ", n);
  std::vector<float> absmax(static_cast<size_t>((n + blocksize - 1) / blocksize));
  for_each_loaded_block(n, blocksize, load, [&](int64_t b, int64_t, int64_t count, const float* values) {
    absmax[static_cast<size_t>(b)] = block_absmax(values, count);
  });
  return absmax;
}

void dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, float* out, Rounding round) {
  check_blocksize(blocksize, "nf4::dequantize");
  // Block by block (an even block size: a block starts on a byte), two values a byte.
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    float table[16];
    block_values(absmax[b], round, table);
    const int64_t begin = b * blocksize, end = std::min<int64_t>(n, begin + blocksize);
    int64_t i = begin;
    for (; i + 1 < end; i += 2) {
      const uint8_t byte = packed[i / 2];
      out[i] = table[byte >> 4];
      out[i + 1] = table[byte & 0x0f];
    }
    if (i < end) out[i] = table[packed[i / 2] >> 4];
  }
}

namespace {

// torch.linspace(start, end, steps, dtype=float32) on the CPU: the first half counts up from start, the second
// half down from end. ATen's kernel is compiled with FMA contraction, so `start + step * idx` is one fused
// multiply-add; plain fp32 multiply-then-add differs in the last bit for some of the 65-point boundaries (checked
// against the map bitsandbytes 0.50 wrote into nf4-vectors.safetensors).
std::vector<float> torch_linspace_f32(float start, float end, int64_t steps) {
  std::vector<float> out(static_cast<size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int64_t halfway = steps / 2;
  for (int64_t idx = 0; idx < steps; ++idx) {
    out[static_cast<size_t>(idx)] = idx < halfway ? std::fma(step, static_cast<float>(idx), start)
                                                   : std::fma(-step, static_cast<float>(steps - idx - 1), end);
  }
  return out;
}

// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponent e = 10^-6 .. 10^0, the midpoints
// of 2^i + 1 evenly spaced boundaries in [0.1, 1], scaled by ±e (the Python float scale is cast to fp32 first, as
// torch does for tensor * scalar), plus 0 and 1, sorted.
std::vector<float> make_dynamic_map_signed() {
  std::vector<float> data;
  data.reserve(256);
  for (int i = 0; i < 7; ++i) {
    const std::vector<float> boundaries = torch_linspace_f32(0.1f, 1.0f, (int64_t{1} << i) + 1);
    const float scale = static_cast<float>(std::pow(10.0, -6 + i));
    std::vector<float> means(boundaries.size() - 1);
    for (size_t k = 0; k + 1 < boundaries.size(); ++k) means[k] = (boundaries[k] + boundaries[k + 1]) / 2.0f;
    for (float m : means) data.push_back(scale * m);
    for (float m : means) data.push_back(-scale * m);
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  QLORA_CHECK(data.size() == 256, "dynamic map has ", data.size(), " values");
  std::sort(data.begin(), data.end());
  return data;
}

// bitsandbytes' dQuantize (non-stochastic): a 7-step binary search over the sorted 256-entry map, then rounding
// to the nearer neighbour by comparing with the fp32 midpoint.
uint8_t quantize_dynamic(const float* code, float x) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

}  // namespace

const std::vector<float>& dynamic_map_signed() {
  static const std::vector<float> map = make_dynamic_map_signed();
  return map;
}

void quantize_blockwise_8bit(const float* x, int64_t n, const std::vector<float>& code, int blocksize,
                             uint8_t* codes_out, float* absmax_out) {
  QLORA_CHECK(code.size() == 256, "8-bit map must have 256 entries, got ", code.size());
  QLORA_CHECK(blocksize > 0, "8-bit blocksize must be positive, got ", blocksize);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t count = std::min<int64_t>(blocksize, n - begin);
    const float absmax = block_absmax(x + begin, count);
    absmax_out[b] = absmax;
    if (absmax == 0.0f) {  // NaN on the GPU (0 * inf), which its binary search maps to index 0
      for (int64_t i = 0; i < count; ++i) codes_out[begin + i] = 0;
      continue;
    }
    const float scale = 1.0f / absmax;
    for (int64_t i = 0; i < count; ++i) codes_out[begin + i] = quantize_dynamic(code.data(), x[begin + i] * scale);
  }
}

float double_quant_offset(const std::vector<float>& absmax) {
  if (absmax.empty()) return 0.0f;
  // torch's mean over fp32; summing in double and rounding once matches the references' offsets bit for bit.
  double sum = 0.0;
  for (float a : absmax) sum += a;
  return static_cast<float>(sum / static_cast<double>(absmax.size()));
}

DoubleQuantized double_quantize(const std::vector<float>& absmax, int blocksize2) {
  QLORA_CHECK(blocksize2 > 0, "double quantization blocksize must be positive, got ", blocksize2);
  DoubleQuantized out;
  const int64_t n = static_cast<int64_t>(absmax.size());
  if (n == 0) return out;
  out.offset = double_quant_offset(absmax);
  std::vector<float> centered(absmax.size());
  for (size_t i = 0; i < absmax.size(); ++i) centered[i] = absmax[i] - out.offset;
  out.codes.resize(absmax.size());
  out.state2_absmax.resize(static_cast<size_t>((n + blocksize2 - 1) / blocksize2));
  quantize_blockwise_8bit(centered.data(), n, dynamic_map_signed(), blocksize2, out.codes.data(),
                          out.state2_absmax.data());
  return out;
}

std::vector<float> double_dequantize(const uint8_t* codes, int64_t n, const float* state2_absmax, const float* code2,
                                     float offset, int blocksize2) {
  std::vector<float> out(static_cast<size_t>(n));
  double_dequantize_into(codes, n, state2_absmax, code2, offset, blocksize2, out.data());
  return out;
}

void double_dequantize_into(const uint8_t* codes, int64_t n, const float* state2_absmax, const float* code2,
                            float offset, int blocksize2, float* out) {
  QLORA_CHECK(blocksize2 > 0, "double quantization blocksize must be positive, got ", blocksize2);
  // Two separate fp32 roundings, as bitsandbytes does (dequantize_blockwise, then `absmax += offset`): the build's
  // -ffp-contract=off never fuses the product and the sum into one multiply-add. A group of blocksize2 constants per
  // iteration, threaded, with no division per value (generation restores a layer's constants at every token).
  const int64_t groups = (n + blocksize2 - 1) / blocksize2;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = state2_absmax[g];
    for (int64_t i = g * blocksize2; i < std::min(n, (g + 1) * blocksize2); ++i) {
      const float product = code2[codes[i]] * scale;
      out[i] = product + offset;
    }
  }
}

}  // namespace qlora::nf4
