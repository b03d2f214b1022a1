// GGUF block formats: hand-built blocks decode to values known exactly (which pins the byte layouts: fp16 constants
// little-endian, Q4_K's 6-bit scale/min packing and nibble order, Q6_K's ql/qh bit placement and scale index), the
// encoders' error on Gaussian data stays within bounds, values already on the Q8_0 grid come back exactly, fp16/bf16
// rounding cases, and malformed sizes are named.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "harness.h"
#include "io/dtype.h"
#include "quant/ggml_quants.h"

using namespace qlora;
using namespace qlora::ggml;

namespace {

// Deterministic N(0, sigma^2) samples (xorshift + Box-Muller in double).
std::vector<float> gaussian(size_t n, uint64_t seed, double sigma) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  auto next = [&] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return (static_cast<double>(s >> 11) + 0.5) / 9007199254740992.0;
  };
  std::vector<float> v(n);
  for (size_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2.0 * std::log(next())), t = 6.283185307179586 * next();
    v[i] = static_cast<float>(sigma * r * std::cos(t));
    if (i + 1 < n) v[i + 1] = static_cast<float>(sigma * r * std::sin(t));
  }
  return v;
}

std::vector<uint8_t> encode(GgmlType t, const std::vector<float>& x, int64_t rows, int64_t cols) {
  std::vector<uint8_t> y(static_cast<size_t>(rows) * row_bytes(t, cols));
  quantize(t, x.data(), y.data(), rows, cols);
  return y;
}

std::vector<float> decode(GgmlType t, const std::vector<uint8_t>& y, int64_t rows, int64_t cols) {
  std::vector<float> x(static_cast<size_t>(rows * cols));
  dequantize(t, y.data(), x.data(), rows, cols);
  return x;
}

// rms(y - x) / rms(x)
double relative_rms(const std::vector<float>& x, const std::vector<float>& y) {
  double e = 0.0, s = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = static_cast<double>(y[i]) - x[i];
    e += d * d;
    s += static_cast<double>(x[i]) * x[i];
  }
  return std::sqrt(e / s);
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

}  // namespace

TEST(ggml_block_sizes_and_names) {
  EXPECT_EQ(row_bytes(GgmlType::Q8_0, 32), size_t{34});
  EXPECT_EQ(row_bytes(GgmlType::Q4_K, 256), size_t{144});
  EXPECT_EQ(row_bytes(GgmlType::Q6_K, 256), size_t{210});
  EXPECT_EQ(row_bytes(GgmlType::F16, 3), size_t{6});
  EXPECT_EQ(row_bytes(GgmlType::BF16, 3), size_t{6});
  EXPECT_EQ(row_bytes(GgmlType::F32, 3), size_t{12});
  EXPECT_EQ(row_bytes(GgmlType::Q4_K, 4096), size_t{16 * 144});
  EXPECT_EQ(row_bytes(GgmlType::Q8_0, 4096), size_t{128 * 34});
  EXPECT_EQ(static_cast<uint32_t>(GgmlType::Q8_0), 8u);
  EXPECT_EQ(static_cast<uint32_t>(GgmlType::Q4_K), 12u);
  EXPECT_EQ(static_cast<uint32_t>(GgmlType::Q6_K), 14u);
  EXPECT_EQ(static_cast<uint32_t>(GgmlType::BF16), 30u);
  EXPECT_TRUE(type_from_name("Q4_K") == GgmlType::Q4_K);
  EXPECT_TRUE(type_from_name("bf16") == GgmlType::BF16);
  EXPECT_TRUE(!type_from_name("q5_k").has_value());
  EXPECT_EQ(static_cast<uint32_t>(GgmlType::Q5_0), 6u);
  EXPECT_EQ(row_bytes(GgmlType::Q5_0, 896), size_t{28 * 22});
  for (GgmlType t : {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K})
    EXPECT_TRUE(type_from_name(type_name(t)) == t, type_name(t));
}

TEST(ggml_malformed_sizes_are_named) {
  std::vector<float> x(2 * 100, 1.0f);
  std::vector<uint8_t> y(4096);
  EXPECT_THROWS_WITH(quantize(GgmlType::Q4_K, x.data(), y.data(), 2, 100),
                     "q4_k: cols 100 is not a multiple of the block size 256");
  EXPECT_THROWS_WITH(quantize(GgmlType::Q6_K, x.data(), y.data(), 1, 200), "block size 256");
  EXPECT_THROWS_WITH(quantize(GgmlType::Q8_0, x.data(), y.data(), 1, 48),
                     "q8_0: cols 48 is not a multiple of the block size 32");
  EXPECT_THROWS_WITH(dequantize(GgmlType::Q8_0, y.data(), x.data(), 1, 33), "block size 32");
  EXPECT_THROWS_WITH(row_bytes(GgmlType::Q4_K, 255), "block size 256");
  EXPECT_THROWS_WITH(quantize(GgmlType::F16, x.data(), y.data(), -1, 4), "negative");
  EXPECT_THROWS_WITH(quantize_row_q4_k(x.data(), y.data(), 100), "not a multiple of the block size 256");
}

// A Q5_0 block built by hand: d = 0.25 (fp16 0x3400), codes q = 0..31 (x = (q - 16) * d); the low nibbles of values
// j and j + 16 share qs[j], their fifth bits are bits j and j + 16 of qh. Decoding gives the values back, and
// encoding them gives these bytes again (the largest magnitude, -4 = (0 - 16) * 0.25, makes d = 4 / 16).
TEST(ggml_q5_0_known_block) {
  uint8_t b[22] = {0x00, 0x34};
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const int q0 = j, q1 = j + 16;
    b[6 + j] = static_cast<uint8_t>((q0 & 15) | ((q1 & 15) << 4));
    qh |= static_cast<uint32_t>(q0 >> 4) << j;
    qh |= static_cast<uint32_t>(q1 >> 4) << (j + 16);
  }
  for (int i = 0; i < 4; ++i) b[2 + i] = static_cast<uint8_t>(qh >> (8 * i));
  float x[32];
  dequantize_row_q5_0(b, x, 32);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(x[i], (i - 16) * 0.25f);
  uint8_t again[22];
  quantize_row_q5_0(x, again, 32);
  for (int i = 0; i < 22; ++i) EXPECT_EQ(static_cast<int>(again[i]), static_cast<int>(b[i]));
}

// A Q8_0 block built by hand: d = 0.5 (fp16 0x3800, stored low byte first), qs = -128, -127, ..., then x = qs * d.
TEST(ggml_q8_0_known_block) {
  uint8_t b[34];
  b[0] = 0x00;
  b[1] = 0x38;
  const int8_t qs[32] = {-128, -127, -64, -3, -2, -1, 0, 1, 2, 3, 5, 7, 11, 13, 17, 19,
                         23,   29,   31,  37, 41, 43, 47, 53, 59, 61, 64, 100, 120, 125, 126, 127};
  std::memcpy(b + 2, qs, 32);
  float y[32];
  dequantize_row_q8_0(b, y, 32);
  for (int i = 0; i < 32; ++i) EXPECT_TRUE(same_bits(y[i], 0.5f * qs[i]), i, ": ", y[i]);
}

// Values x = q * d with d on the fp16 grid and max |q| = 127 are stored as exactly that d and those q, and decode to
// the same floats.
TEST(ggml_q8_0_grid_values_round_trip_exactly) {
  const float ds[] = {0.5f, 0.013671875f, f16_to_f32(0x1234), 3.0f, f16_to_f32(0x0400) /* smallest normal */};
  for (float d : ds) {
    std::vector<float> x(64);
    std::vector<int> q(64);
    for (int i = 0; i < 64; ++i) {
      q[static_cast<size_t>(i)] = (i * 37 + 11) % 255 - 127;  // -127..127
      x[static_cast<size_t>(i)] = static_cast<float>(q[static_cast<size_t>(i)]) * d;
    }
    x[5] = 127.0f * d;  // each block reaches |q| = 127
    q[5] = 127;
    x[40] = -127.0f * d;
    q[40] = -127;
    const std::vector<uint8_t> y = encode(GgmlType::Q8_0, x, 2, 32);
    for (int blk = 0; blk < 2; ++blk) {
      const float stored = f16_to_f32(le16(y.data() + 34 * blk));
      EXPECT_TRUE(stored == d, "block ", blk, " stored d ", stored, " for ", d);
      for (int i = 0; i < 32; ++i)
        EXPECT_EQ(static_cast<int>(static_cast<int8_t>(y[static_cast<size_t>(34 * blk + 2 + i)])),
                  q[static_cast<size_t>(32 * blk + i)]);
    }
    const std::vector<float> back = decode(GgmlType::Q8_0, y, 2, 32);
    for (size_t i = 0; i < x.size(); ++i) EXPECT_TRUE(same_bits(back[i], x[i]), "d ", d, " value ", i);
  }
}

// Q4_K's 12-byte scales: sub-blocks 0..3 keep scale and min in the low 6 bits of bytes 0..3 and 4..7; sub-blocks
// 4..7 keep their low 4 bits in bytes 8..11 (scale low nibble, min high nibble) and their top 2 bits in the top
// bits of bytes 0..3 (scales) and 4..7 (mins). The bytes below are worked out by hand from that rule.
TEST(ggml_q4_k_scale_packing) {
  const uint8_t sc[8] = {1, 2, 3, 63, 42, 29, 48, 5};
  const uint8_t mn[8] = {0, 4, 63, 1, 27, 38, 60, 7};
  const uint8_t expected[12] = {0x81, 0x42, 0xC3, 0x3F, 0x40, 0x84, 0xFF, 0x01, 0xBA, 0x6D, 0xC0, 0x75};
  uint8_t packed[12];
  pack_q4_k_scales(sc, mn, packed);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(static_cast<int>(packed[i]), static_cast<int>(expected[i]));
  uint8_t sc2[8], mn2[8];
  unpack_q4_k_scales(expected, sc2, mn2);
  for (int j = 0; j < 8; ++j) {
    EXPECT_EQ(static_cast<int>(sc2[j]), static_cast<int>(sc[j]));
    EXPECT_EQ(static_cast<int>(mn2[j]), static_cast<int>(mn[j]));
  }
}

// A Q4_K block built by hand (d = 1, dmin = 0.5, the scales above; in chunk c byte l holds code (l + c) % 16 low and
// 15 - l % 16 high): value 64c + l is sc[2c] * ((l + c) % 16) - 0.5 * m[2c], value 64c + 32 + l is
// sc[2c + 1] * (15 - l % 16) - 0.5 * m[2c + 1]. All exact in fp32.
TEST(ggml_q4_k_known_block) {
  const uint8_t sc[8] = {1, 2, 3, 63, 42, 29, 48, 5};
  const uint8_t mn[8] = {0, 4, 63, 1, 27, 38, 60, 7};
  uint8_t b[144] = {0x00, 0x3C, 0x00, 0x38, 0x81, 0x42, 0xC3, 0x3F, 0x40, 0x84, 0xFF, 0x01, 0xBA, 0x6D, 0xC0, 0x75};
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) b[16 + 32 * c + l] = static_cast<uint8_t>(((l + c) % 16) | ((15 - l % 16) << 4));
  float y[256];
  dequantize_row_q4_k(b, y, 256);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const float lo = static_cast<float>(sc[2 * c] * ((l + c) % 16)) - 0.5f * mn[2 * c];
      const float hi = static_cast<float>(sc[2 * c + 1] * (15 - l % 16)) - 0.5f * mn[2 * c + 1];
      EXPECT_TRUE(same_bits(y[64 * c + l], lo), "value ", 64 * c + l, ": ", y[64 * c + l], " vs ", lo);
      EXPECT_TRUE(same_bits(y[64 * c + 32 + l], hi), "value ", 64 * c + 32 + l, ": ", y[64 * c + 32 + l], " vs ", hi);
    }
  }
}

// Q6_K bit placement, poking single bytes of an otherwise zero block (every code 0, i.e. q - 32 = -32): ql[l] feeds
// values l (low nibble) and l + 64 (high nibble), ql[l + 32] values l + 32 and l + 96, qh[l] bit pairs 0-1, 2-3, 4-5,
// 6-7 the high bits of values l, l + 32, l + 64, l + 96; the second half (values 128..255) uses ql[64..127] and
// qh[32..63] the same way. Value v takes scales[v / 16]; d (fp16) is the last two bytes.
TEST(ggml_q6_k_bit_placement) {
  uint8_t b[210] = {};
  int8_t scales[16];
  for (int j = 0; j < 16; ++j) scales[j] = static_cast<int8_t>(j % 2 ? -(j + 1) : j + 1);
  std::memcpy(b + 192, scales, 16);
  b[208] = 0x00;  // d = 0.5
  b[209] = 0x38;
  int q[256];
  for (int& v : q) v = 0;
  b[5] = 0x3A;               // value 5 low 0xA, value 69 low 0x3
  q[5] |= 0xA;
  q[69] |= 0x3;
  b[32 + 7] = 0xC1;          // value 39 low 0x1, value 103 low 0xC
  q[39] |= 0x1;
  q[103] |= 0xC;
  b[128 + 9] = 0xE4;         // qh[9] = 11 10 01 00: values 9, 41, 73, 105 get high bits 0, 1, 2, 3
  q[41] |= 1 << 4;
  q[73] |= 2 << 4;
  q[105] |= 3 << 4;
  b[64 + 3] = 0xF2;          // second half: ql[64 + 3] -> value 131 low 0x2, value 195 low 0xF
  q[131] |= 0x2;
  q[195] |= 0xF;
  b[64 + 32 + 30] = 0x5B;    // second half: ql[64 + 62] -> value 190 low 0xB, value 254 low 0x5
  q[190] |= 0xB;
  q[254] |= 0x5;
  b[128 + 32 + 31] = 0x1B;   // qh[63] = 00 01 10 11: values 159, 191, 223, 255 get high bits 3, 2, 1, 0
  q[159] |= 3 << 4;
  q[191] |= 2 << 4;
  q[223] |= 1 << 4;
  b[128 + 32 + 3] = 0x03;    // qh[35] bits 0-1 -> value 131 high 3
  q[131] |= 3 << 4;
  float y[256];
  dequantize_row_q6_k(b, y, 256);
  for (int v = 0; v < 256; ++v) {
    const float expected = (0.5f * static_cast<float>(scales[v / 16])) * static_cast<float>(q[v] - 32);
    EXPECT_TRUE(same_bits(y[v], expected), "value ", v, ": ", y[v], " vs ", expected);
  }
}

// Every 6-bit code at every position: a block packed by this test's own reading of the layout decodes to
// (d * scale) * (q - 32).
TEST(ggml_q6_k_full_layout) {
  uint8_t b[210] = {};
  int q[256];
  for (int v = 0; v < 256; ++v) q[v] = (v * 29 + 7) % 64;
  for (int v = 0; v < 256; ++v) {
    const int h = v / 128, r = v % 128, k = r / 32, l = r % 32;
    uint8_t& low = b[64 * h + (k % 2) * 32 + l];
    low = static_cast<uint8_t>(low | ((q[v] & 0xF) << (k >= 2 ? 4 : 0)));
    b[128 + 32 * h + l] = static_cast<uint8_t>(b[128 + 32 * h + l] | ((q[v] >> 4) << (2 * k)));
  }
  for (int j = 0; j < 16; ++j) b[192 + j] = static_cast<uint8_t>(static_cast<int8_t>(3 * j - 20));
  b[208] = 0x66;  // d = fp16 0x2E66
  b[209] = 0x2E;
  const float d = f16_to_f32(0x2E66);
  float y[256];
  dequantize_row_q6_k(b, y, 256);
  for (int v = 0; v < 256; ++v) {
    const float expected = (d * static_cast<float>(3 * (v / 16) - 20)) * static_cast<float>(q[v] - 32);
    EXPECT_TRUE(same_bits(y[v], expected), "value ", v);
  }
}

// Gaussian data (sigma 0.02, like LLM weights), 64 rows of 1024: relative RMS error of each format. The bounds sit
// a little above what these encoders give (q8_0 0.535%, q6_k 1.77%, q4_k 7.07%; llama.cpp's reference quantizers
// give 0.535%, 1.78%, 7.13% on such data).
TEST(ggml_gaussian_round_trip_error) {
  const int64_t rows = 64, cols = 1024;
  const std::vector<float> x = gaussian(static_cast<size_t>(rows * cols), 1, 0.02);
  struct Case {
    GgmlType t;
    double bound;
  };
  const Case cases[] = {{GgmlType::F32, 0.0},      {GgmlType::F16, 3e-4},     {GgmlType::BF16, 2.2e-3},
                        {GgmlType::Q8_0, 0.0056}, {GgmlType::Q6_K, 0.0182}, {GgmlType::Q4_K, 0.0722}};
  for (const Case& c : cases) {
    const std::vector<uint8_t> y = encode(c.t, x, rows, cols);
    EXPECT_EQ(y.size(), static_cast<size_t>(rows) * row_bytes(c.t, cols));
    const double e = relative_rms(x, decode(c.t, y, rows, cols));
    EXPECT_TRUE(e <= c.bound, type_name(c.t), " relative rms error ", e, " above ", c.bound);
  }
  // Q8_0 per value: within half a step of the stored d (plus the rounding of d itself).
  const std::vector<uint8_t> y = encode(GgmlType::Q8_0, x, rows, cols);
  const std::vector<float> back = decode(GgmlType::Q8_0, y, rows, cols);
  for (size_t blk = 0; blk < x.size() / 32; ++blk) {
    const float d = f16_to_f32(le16(y.data() + 34 * blk));
    for (size_t i = 32 * blk; i < 32 * blk + 32; ++i)
      EXPECT_TRUE(std::fabs(back[i] - x[i]) <= 0.5f * d * 1.001f, "value ", i);
  }
}

// The bytes do not depend on how the matrix is split: the whole matrix (threaded) equals row ranges encoded one at a
// time, so a tensor can be streamed in row ranges.
TEST(ggml_streaming_row_ranges_match_whole) {
  const int64_t rows = 40, cols = 512;
  const std::vector<float> x = gaussian(static_cast<size_t>(rows * cols), 2, 1.0);
  for (GgmlType t : {GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    const std::vector<uint8_t> whole = encode(t, x, rows, cols);
    std::vector<uint8_t> parts(whole.size());
    const size_t rb = row_bytes(t, cols);
    for (int64_t r0 = 0; r0 < rows; r0 += 7) {
      const int64_t n = std::min<int64_t>(7, rows - r0);
      quantize(t, x.data() + r0 * cols, parts.data() + static_cast<size_t>(r0) * rb, n, cols);
    }
    EXPECT_TRUE(whole == parts, type_name(t));
    std::vector<float> a = decode(t, whole, rows, cols), b(a.size());
    for (int64_t r = 0; r < rows; ++r)
      dequantize(t, whole.data() + static_cast<size_t>(r) * rb, b.data() + r * cols, 1, cols);
    EXPECT_TRUE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0, type_name(t));
  }
}

// Zeros, constant sub-blocks and a lone outlier: exact where the format can be exact, finite everywhere.
TEST(ggml_special_blocks) {
  std::vector<float> x(512, 0.0f);
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    const std::vector<float> back = decode(t, encode(t, x, 2, 256), 2, 256);
    for (float v : back) EXPECT_TRUE(v == 0.0f, type_name(t));
  }
  // Q4_K: a sub-block of -0.5 (all min, no scale) next to a sub-block of +0.25 and zeros.
  for (int i = 0; i < 32; ++i) x[static_cast<size_t>(i)] = -0.5f;
  for (int i = 32; i < 64; ++i) x[static_cast<size_t>(i)] = 0.25f;
  {
    const std::vector<float> back = decode(GgmlType::Q4_K, encode(GgmlType::Q4_K, x, 2, 256), 2, 256);
    for (size_t i = 0; i < 512; ++i) EXPECT_NEAR(back[i], x[i], 2e-3);
  }
  // One large value among small ones: finite, and the large value itself is close.
  std::vector<float> y = gaussian(256, 3, 0.01);
  y[77] = 40.0f;
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
    const std::vector<float> back = decode(t, encode(t, y, 1, 256), 1, 256);
    for (float v : back) EXPECT_TRUE(std::isfinite(v), type_name(t));
    EXPECT_NEAR(back[77], 40.0f, 40.0f * 0.02);
  }
  // Inf and NaN inputs do not crash nor write non-finite block constants (llama.cpp's loader rejects those).
  y[3] = std::numeric_limits<float>::infinity();
  y[4] = std::numeric_limits<float>::quiet_NaN();
  y[200] = std::numeric_limits<float>::quiet_NaN();
  {
    const std::vector<uint8_t> q8 = encode(GgmlType::Q8_0, y, 1, 256);
    for (size_t blk = 0; blk < 8; ++blk) EXPECT_TRUE(std::isfinite(f16_to_f32(le16(q8.data() + 34 * blk))), blk);
    const std::vector<uint8_t> q4 = encode(GgmlType::Q4_K, y, 1, 256);
    EXPECT_TRUE(std::isfinite(f16_to_f32(le16(q4.data()))) && std::isfinite(f16_to_f32(le16(q4.data() + 2))));
    const std::vector<uint8_t> q6 = encode(GgmlType::Q6_K, y, 1, 256);
    EXPECT_TRUE(std::isfinite(f16_to_f32(le16(q6.data() + 208))));
  }
}

// fp16: round to nearest even at halfway points, subnormals, overflow to inf, NaN kept NaN; bytes little-endian.
TEST(ggml_f16_rounding) {
  struct Case {
    float in;
    uint16_t out;
  };
  const Case cases[] = {
      {1.0f, 0x3C00},
      {bits_to_f32(0x3F801000), 0x3C00},  // 1 + 2^-11: halfway between 1 and 1 + 2^-10, ties to even (down)
      {bits_to_f32(0x3F803000), 0x3C02},  // 1 + 3 * 2^-11: halfway, ties to even (up)
      {bits_to_f32(0x3F801001), 0x3C01},  // just above halfway
      {-2.5f, 0xC100},
      {65504.0f, 0x7BFF},
      {65519.99f, 0x7BFF},
      {65520.0f, 0x7C00},                  // halfway to 65536: to even, which is inf
      {std::numeric_limits<float>::infinity(), 0x7C00},
      {-std::numeric_limits<float>::infinity(), 0xFC00},
      {-0.0f, 0x8000},
      {bits_to_f32(0x33800000), 0x0001},  // 2^-24, the smallest subnormal
      {bits_to_f32(0x33000000), 0x0000},  // 2^-25: halfway to 2^-24, ties to even 0
      {bits_to_f32(0x33400000), 0x0001},  // 1.5 * 2^-25: above halfway
      {bits_to_f32(0x38000000), 0x0200},  // 2^-15, subnormal
      {bits_to_f32(0x387FC000), 0x03FF},  // the largest subnormal
      {bits_to_f32(0x387FDFFF), 0x03FF},  // just below halfway to the smallest normal
      {bits_to_f32(0x387FE000), 0x0400},  // halfway between the largest subnormal and the smallest normal: even
  };
  for (const Case& c : cases) {
    uint8_t b[2];
    quantize_row_f16(&c.in, b, 1);
    EXPECT_EQ(static_cast<int>(le16(b)), static_cast<int>(c.out));
    float back;
    dequantize_row_f16(b, &back, 1);
    EXPECT_TRUE(same_bits(back, f16_to_f32(c.out)), c.in);
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  uint8_t b[2];
  quantize_row_f16(&nan, b, 1);
  EXPECT_TRUE((le16(b) & 0x7C00) == 0x7C00 && (le16(b) & 0x03FF) != 0, le16(b));
  float back;
  dequantize_row_f16(b, &back, 1);
  EXPECT_TRUE(std::isnan(back));
}

// bf16 as ggml's fp32 -> bf16 and PyTorch's cast: the top 16 bits rounded to nearest even, NaN quieted (never
// turned into inf), subnormals kept.
TEST(ggml_bf16_rounding) {
  struct Case {
    uint32_t in;
    uint16_t out;
  };
  const Case cases[] = {
      {0x3F800000, 0x3F80},  // 1
      {0x3F808000, 0x3F80},  // halfway, ties to even (down)
      {0x3F818000, 0x3F82},  // halfway, ties to even (up)
      {0x3F808001, 0x3F81},  // above halfway
      {0xBF80FFFF, 0xBF81},  // negative, rounds away in magnitude
      {0x7F7FFFFF, 0x7F80},  // the largest float rounds to inf
      {0x7F800000, 0x7F80},  // inf
      {0xFF800000, 0xFF80},  // -inf
      {0x00000001, 0x0000},  // tiny subnormal rounds to 0
      {0x000116C2, 0x0001},  // subnormal kept (not flushed)
      {0x80008000, 0x8000},  // -subnormal halfway: to even, -0
      {0x7FC00000, 0x7FC0},  // quiet NaN
      {0x7F800001, 0x7FC0},  // signalling NaN whose payload is in the low bits: quieted, stays NaN
      {0xFF812345, 0xFFC1},  // negative NaN keeps its sign and top payload
  };
  for (const Case& c : cases) {
    const float in = bits_to_f32(c.in);
    uint8_t b[2];
    quantize_row_bf16(&in, b, 1);
    EXPECT_EQ(static_cast<int>(le16(b)), static_cast<int>(c.out));
    float back;
    dequantize_row_bf16(b, &back, 1);
    EXPECT_TRUE(same_bits(back, bits_to_f32(static_cast<uint32_t>(c.out) << 16)), c.in);
  }
}

// f32 is stored as is.
TEST(ggml_f32_passthrough) {
  const float x[3] = {1.5f, -0.0f, std::numeric_limits<float>::denorm_min()};
  uint8_t b[12];
  quantize_row_f32(x, b, 3);
  EXPECT_EQ(static_cast<int>(b[0]), 0);  // 1.5f = 0x3FC00000, low byte first
  EXPECT_EQ(static_cast<int>(b[1]), 0);
  EXPECT_EQ(static_cast<int>(b[2]), 0xC0);
  EXPECT_EQ(static_cast<int>(b[3]), 0x3F);
  float y[3];
  dequantize_row_f32(b, y, 3);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(same_bits(x[i], y[i]), i);
}
