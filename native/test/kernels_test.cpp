// Finite-difference checks of every CPU kernel's backward, in fp64, plus the GEMM against a naive product and one
// AdamW step against hand-computed values. For an op y = f(x) and a random upstream gradient dy, the scalar
// L = sum(dy * f(x)) has dL/dx = backward(dy); each input element is perturbed by ±h and compared.
#include <functional>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <random>
#include <vector>

#include "cpu/kernels.h"
#include "harness.h"
#include "vector_widths.h"
#include "model/rope.h"
#include "quant/nf4.h"
#include "io/dtype.h"

using namespace qlora;
using Vec = std::vector<double>;

namespace {

Vec random_vec(size_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Checks the analytic gradient `grad` of loss(x) against central differences at every element of x.
void check_gradient(const char* what, Vec x, const std::function<double(const Vec&)>& loss, const Vec& grad,
                    double tol = 1e-6) {
  const double h = 1e-5;
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = loss(x);
    x[i] = saved - h;
    const double down = loss(x);
    x[i] = saved;
    const double numeric = (up - down) / (2 * h);
    const double err = std::fabs(numeric - grad[i]);
    if (err > tol * std::max(1.0, std::fabs(numeric)))
      qtest::fail_test(__FILE__, __LINE__, what, ": element ", i, " analytic ", grad[i], " numeric ", numeric);
  }
}

}  // namespace

TEST(kernel_gemm_matches_naive_product_for_all_transposes) {
  const int64_t M = 7, N = 600, K = 5;  // N > the column tile, M not a multiple of the row block
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      const Vec A = random_vec(M * K, 1), B = random_vec(K * N, 2);
      Vec C = random_vec(M * N, 3), expected = C;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double a = ta ? A[k * M + m] : A[m * K + k];
            const double b = tb ? B[n * K + k] : B[k * N + n];
            s += a * b;
          }
          expected[m * N + n] = 0.5 * expected[m * N + n] + 2.0 * s;
        }
      cpu::gemm<double>(ta, tb, M, N, K, 2.0, A.data(), B.data(), 0.5, C.data());
      for (size_t i = 0; i < C.size(); ++i) EXPECT_NEAR(C[i], expected[i], 1e-12);
    }
}

TEST(kernel_rmsnorm_backward_matches_finite_differences) {
  const int64_t rows = 3, dim = 8;
  const Vec x = random_vec(rows * dim, 4), w = random_vec(dim, 5), dy = random_vec(rows * dim, 6);
  auto loss = [&](const Vec& xv) {
    Vec y(rows * dim), rstd(rows);
    cpu::rmsnorm_forward<double>(xv.data(), w.data(), rows, dim, 1e-6, y.data(), rstd.data());
    return dot(y, dy);
  };
  Vec y(rows * dim), rstd(rows), dx(rows * dim);
  cpu::rmsnorm_forward<double>(x.data(), w.data(), rows, dim, 1e-6, y.data(), rstd.data());
  cpu::rmsnorm_backward<double>(dy.data(), x.data(), w.data(), rstd.data(), rows, dim, dx.data());
  check_gradient("rmsnorm dx", x, loss, dx);
  // Known value: x = [3, 4], w = 1: rms = sqrt(12.5) → y = [0.8485, 1.1314].
  const Vec x2 = {3, 4}, w2 = {1, 1};
  Vec y2(2), r2(1);
  cpu::rmsnorm_forward<double>(x2.data(), w2.data(), 1, 2, 0.0, y2.data(), r2.data());
  EXPECT_NEAR(y2[0], 3 / std::sqrt(12.5), 1e-12);
  EXPECT_NEAR(y2[1], 4 / std::sqrt(12.5), 1e-12);
}

TEST(kernel_rope_backward_matches_finite_differences) {
  const int64_t B = 2, T = 3, H = 2, D = 6, half = D / 2;
  ModelConfig c;
  c.head_dim = D;
  c.rope_theta = 10000;
  const RopeTables tables = build_rope_tables(c, T);
  const Vec x = random_vec(B * T * H * D, 7), dy = random_vec(B * T * H * D, 8);
  auto loss = [&](const Vec& xv) {
    Vec y = xv;
    cpu::rope_apply<double>(y.data(), B, T, H, D, tables.cos.data(), tables.sin.data(), false);
    return dot(y, dy);
  };
  Vec dx = dy;
  cpu::rope_apply<double>(dx.data(), B, T, H, D, tables.cos.data(), tables.sin.data(), true);
  check_gradient("rope dx", x, loss, dx);
  // Position 0 is the identity; position 1 rotates pair (i, i+half) by inv_freq[i] radians.
  EXPECT_NEAR(tables.cos[0], 1.0, 0.0);
  EXPECT_NEAR(tables.sin[half + 0], std::sin(1.0), 1e-7);
  EXPECT_NEAR(tables.cos[half + 1], std::cos(std::pow(10000.0, -2.0 / 6.0)), 1e-7);
}

TEST(kernel_rope_llama3_scaling_keeps_high_and_divides_low_frequencies) {
  ModelConfig c;
  c.head_dim = 64;
  c.rope_theta = 500000;
  const std::vector<float> plain = rope_inv_freq(c);
  c.rope_scaling.kind = RopeScaling::Kind::Llama3;
  c.rope_scaling.factor = 8;
  c.rope_scaling.low_freq_factor = 1;
  c.rope_scaling.high_freq_factor = 4;
  c.rope_scaling.original_max_position_embeddings = 8192;
  const std::vector<float> scaled = rope_inv_freq(c);
  EXPECT_NEAR(scaled[0], plain[0], 0.0);                  // wavelength 2π < 2048: unchanged
  EXPECT_NEAR(scaled[31], plain[31] / 8.0f, 1e-12);       // wavelength > 8192: divided by the factor
  for (size_t i = 0; i < scaled.size(); ++i) EXPECT_TRUE(scaled[i] <= plain[i] && scaled[i] >= plain[i] / 8.0f);
  c.rope_scaling.kind = RopeScaling::Kind::Linear;
  c.rope_scaling.factor = 2;
  EXPECT_NEAR(rope_inv_freq(c)[5], plain[5] / 2.0f, 1e-12);
}

TEST(kernel_attention_backward_matches_finite_differences) {
  const int64_t B = 2, T = 5, H = 4, Hkv = 2, D = 3;
  const Vec q = random_vec(B * T * H * D, 9), k = random_vec(B * T * Hkv * D, 10), v = random_vec(B * T * Hkv * D, 11);
  const Vec dout = random_vec(B * T * H * D, 12);
  auto forward = [&](const Vec& qv, const Vec& kv, const Vec& vv) {
    Vec out(B * T * H * D), lse(B * H * T);
    cpu::attention_forward<double>(qv.data(), kv.data(), vv.data(), B, T, H, Hkv, D, out.data(), lse.data());
    return dot(out, dout);
  };
  Vec out(B * T * H * D), lse(B * H * T), dq(q.size()), dk(k.size()), dv(v.size());
  cpu::attention_forward<double>(q.data(), k.data(), v.data(), B, T, H, Hkv, D, out.data(), lse.data());
  cpu::attention_backward<double>(dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), B, T, H, Hkv, D,
                                  dq.data(), dk.data(), dv.data());
  check_gradient("attention dq", q, [&](const Vec& x) { return forward(x, k, v); }, dq);
  check_gradient("attention dk", k, [&](const Vec& x) { return forward(q, x, v); }, dk);
  check_gradient("attention dv", v, [&](const Vec& x) { return forward(q, k, x); }, dv);
  // Causality: the first query attends only to itself, so its output is v[0] of its kv head.
  for (int64_t d = 0; d < D; ++d) EXPECT_NEAR(out[d], v[d], 1e-12);
  // lse is the log-sum-exp of each row's scaled scores: row 1 of head 0 (batch 0) over keys 0 and 1 of kv head 0
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  double s0 = 0, s1 = 0;
  for (int64_t d = 0; d < D; ++d) {
    s0 += q[H * D + d] * k[d] * scale;
    s1 += q[H * D + d] * k[Hkv * D + d] * scale;
  }
  EXPECT_NEAR(lse[1], std::log(std::exp(s0) + std::exp(s1)), 1e-12);
}

namespace {
// attention_backward as it was before key tiles: each query row over all its keys, in turn.
template <typename T>
void row_by_row_attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse,
                                   int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                   T* dq, T* dk, T* dv) {
  const int64_t group = heads / kv_heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  std::vector<T> p(static_cast<size_t>(seq)), ds(static_cast<size_t>(seq));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      for (int64_t j = 0; j < seq; ++j)
        for (int64_t d = 0; d < head_dim; ++d)
          dk[(b * seq + j) * kv_stride + kvh * head_dim + d] = dv[(b * seq + j) * kv_stride + kvh * head_dim + d] = 0;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int64_t i = 0; i < seq; ++i) {
          const T* doi = dout + (b * seq + i) * q_stride + h * head_dim;
          const T* oi = out + (b * seq + i) * q_stride + h * head_dim;
          const T* qi = q + (b * seq + i) * q_stride + h * head_dim;
          const T row_lse = lse[(b * heads + h) * seq + i];
          T row_dot = 0;
          for (int64_t d = 0; d < head_dim; ++d) row_dot += doi[d] * oi[d];
          cpu::dot_rows(qi, k + b * seq * kv_stride + kvh * head_dim, kv_stride, i + 1, head_dim, p.data());
          cpu::dot_rows(doi, v + b * seq * kv_stride + kvh * head_dim, kv_stride, i + 1, head_dim, ds.data());
          for (int64_t j = 0; j <= i; ++j) p[j] = std::exp(p[j] * scale - row_lse);
          T* dqi = dq + (b * seq + i) * q_stride + h * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) dqi[d] = 0;
          for (int64_t j = 0; j <= i; ++j) {
            const T dsj = p[j] * (ds[j] - row_dot) * scale;
            const T* kj = k + (b * seq + j) * kv_stride + kvh * head_dim;
            T* dkj = dk + (b * seq + j) * kv_stride + kvh * head_dim;
            T* dvj = dv + (b * seq + j) * kv_stride + kvh * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) dqi[d] += dsj * kj[d];
            for (int64_t d = 0; d < head_dim; ++d) dkj[d] += dsj * qi[d];
            for (int64_t d = 0; d < head_dim; ++d) dvj[d] += p[j] * doi[d];
          }
        }
    }
}

// attention_forward's row as it was before its value sum kept its sums in registers.
template <typename T>
T plain_attend_row(const T* qi, const T* k, const T* v, int64_t kv_stride, int64_t last, int64_t head_dim, T scale,
                   T* p, T* oi) {
  T max_score = -INFINITY;
  cpu::dot_rows(qi, k, kv_stride, last + 1, head_dim, p);
  for (int64_t j = 0; j <= last; ++j) {
    p[j] *= scale;
    max_score = std::max(max_score, p[j]);
  }
  T sum = 0;
  for (int64_t j = 0; j <= last; ++j) {
    p[j] = std::exp(p[j] - max_score);
    sum += p[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j <= last; ++j) p[j] *= inv;
  for (int64_t d = 0; d < head_dim; ++d) oi[d] = 0;
  for (int64_t j = 0; j <= last; ++j)
    for (int64_t d = 0; d < head_dim; ++d) oi[d] += p[j] * v[j * kv_stride + d];
  return max_score + std::log(sum);
}

template <typename T>
void expect_tiled_attention_backward_is_row_by_row(int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads,
                                                   int64_t head_dim, uint32_t seed) {
  const auto values = [](int64_t n, uint32_t s) {
    const Vec r = random_vec(static_cast<size_t>(n), s);
    return std::vector<T>(r.begin(), r.end());
  };
  const int64_t nq = batch * seq * heads * head_dim, nkv = batch * seq * kv_heads * head_dim;
  const std::vector<T> q = values(nq, seed), k = values(nkv, seed + 1), v = values(nkv, seed + 2),
                       dout = values(nq, seed + 3);
  std::vector<T> out(static_cast<size_t>(nq)), lse(static_cast<size_t>(batch * heads * seq));
  cpu::attention_forward<T>(q.data(), k.data(), v.data(), batch, seq, heads, kv_heads, head_dim, out.data(),
                            lse.data());
  {
    const int64_t group = heads / kv_heads, q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    std::vector<T> p(static_cast<size_t>(seq)), oi(static_cast<size_t>(head_dim));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < seq; ++i) {
          const int64_t kv_offset = b * seq * kv_stride + (h / group) * head_dim;
          const T row_lse = plain_attend_row(q.data() + (b * seq + i) * q_stride + h * head_dim, k.data() + kv_offset,
                                             v.data() + kv_offset, kv_stride, i, head_dim, scale, p.data(), oi.data());
          EXPECT_TRUE(row_lse == lse[static_cast<size_t>((b * heads + h) * seq + i)], "lse of row ", i);
          for (int64_t d = 0; d < head_dim; ++d)
            EXPECT_TRUE(std::memcmp(&oi[d], &out[(b * seq + i) * q_stride + h * head_dim + d], sizeof(T)) == 0,
                        "out of row ", i, " at ", d);
        }
  }
  std::vector<T> dq(q.size(), T(7)), dk(k.size(), T(7)), dv(v.size(), T(7));
  std::vector<T> rq(q.size()), rk(k.size()), rv(v.size());
  cpu::attention_backward<T>(dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), batch, seq, heads,
                             kv_heads, head_dim, dq.data(), dk.data(), dv.data());
  row_by_row_attention_backward<T>(dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), batch, seq,
                                   heads, kv_heads, head_dim, rq.data(), rk.data(), rv.data());
  const std::string what = std::string(sizeof(T) == 4 ? "f32" : "f64") + " seq " + std::to_string(seq) +
                           " head_dim " + std::to_string(head_dim);
  for (size_t i = 0; i < dq.size(); ++i) EXPECT_TRUE(std::memcmp(&dq[i], &rq[i], sizeof(T)) == 0, what, " dq ", i);
  for (size_t i = 0; i < dk.size(); ++i) EXPECT_TRUE(std::memcmp(&dk[i], &rk[i], sizeof(T)) == 0, what, " dk ", i);
  for (size_t i = 0; i < dv.size(); ++i) EXPECT_TRUE(std::memcmp(&dv[i], &rv[i], sizeof(T)) == 0, what, " dv ", i);
}
}  // namespace

// The backward pass in tiles of keys keeps every sum's order: bit for bit the row-by-row loop, in fp32 (the vector
// code this CPU runs) and fp64, over several tiles and a partial one, grouped query heads and odd head sizes; so does
// the forward pass, its value sums kept in registers.
TEST(kernel_attention_in_key_tiles_and_registers_equals_the_row_by_row_loops) {
  for (const int64_t seq : {int64_t{1}, cpu::kNtTile, 2 * cpu::kNtTile + 7}) {
    expect_tiled_attention_backward_is_row_by_row<float>(2, seq, 6, 2, 24, 40);
    expect_tiled_attention_backward_is_row_by_row<float>(2, seq, 4, 2, 64, 41);
    expect_tiled_attention_backward_is_row_by_row<double>(2, seq, 3, 1, 5, 42);
  }
}

// The CPU backend's NF4 dequantizer (codes looked up in vectors) gives nf4::dequantize's bits: every rounding, at both
// vector widths, for block sizes it vectorizes and ones it leaves to nf4::dequantize, with a partial last block and
// an odd count, and block constants of 0, negative, subnormal, huge, infinite and NaN.
TEST(kernel_nf4_dequantize_equals_the_reference_bit_for_bit) {
  std::mt19937 gen(77);
  for (const int blocksize : {64, 32, 128, 2, 6}) {
    for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{blocksize}, int64_t{5 * blocksize + 17},
                            int64_t{9 * blocksize + 1}}) {
      std::vector<uint8_t> packed(static_cast<size_t>((n + 1) / 2));
      for (uint8_t& b : packed) b = static_cast<uint8_t>(gen());
      std::vector<float> absmax(static_cast<size_t>((n + blocksize - 1) / blocksize));
      const float specials[] = {0.0f, -0.75f, 1e-40f, 3e38f, INFINITY, NAN};
      for (size_t i = 0; i < absmax.size(); ++i)
        absmax[i] = i < 6 ? specials[i] : std::ldexp(static_cast<float>(gen() % 1000) / 997.0f, static_cast<int>(gen() % 20) - 10);
      for (int round_to = 0; round_to < 3; ++round_to) {
        const nf4::Rounding round = round_to == 1 ? round_to_bf16 : round_to == 2 ? round_to_f16 : nullptr;
        std::vector<float> expected(static_cast<size_t>(n));
        nf4::dequantize(packed.data(), absmax.data(), n, blocksize, expected.data(), round);
        qtest::at_both_vector_widths([&](bool narrow) {
          std::vector<float> got(static_cast<size_t>(n), 7.0f);
          cpu::nf4_dequantize_f32(packed.data(), absmax.data(), n, blocksize, round_to, got.data());
          for (int64_t i = 0; i < n; ++i) {
            // a NaN block constant gives NaN values either way; its sign and payload come from the compiler's
            // choice of instructions for the code times the constant, which the two builds make differently
            const bool same = std::memcmp(&got[i], &expected[i], 4) == 0 ||
                              (std::isnan(got[i]) && std::isnan(expected[i]) && std::isnan(absmax[i / blocksize]));
            EXPECT_TRUE(same, "blocksize ", blocksize, " n ", n, " round ", round_to, narrow ? " (8 lanes)" : "",
                        " at ", i, ": ", got[i], " vs ", expected[i]);
          }
        });
      }
    }
  }
}

// exp_shifted's table is 2^(i/32), and its results are glibc's expf bits (the algorithm glibc runs, in vectors), on
// every 61st float from the underflow to the overflow threshold and past them, through the vector lanes and the
// scalar tail alike. glibc's FMA build (chosen on CPUs with FMA) may round a result near a boundary the other way:
// such results must be one ulp apart and rare.
TEST(vector_exp_gives_the_bits_of_glibc_expf) {
  for (int i = 0; i < 32; ++i) {
    const uint64_t bits = cpu::vector_exp_detail::kTable[i] + (static_cast<uint64_t>(i) << 47);
    double table;
    std::memcpy(&table, &bits, sizeof table);
    EXPECT_EQ(table, static_cast<double>(std::exp2(static_cast<long double>(i) / 32)));
  }
  std::vector<float> xs;
  for (uint32_t b = 0x80000000u; b <= 0xc2d80000u; b += 61) {  // -0 down to -108
    float x;
    std::memcpy(&x, &b, sizeof x);
    xs.push_back(x);
  }
  for (uint32_t b = 0; b <= 0x42b40000u; b += 61) {  // 0 up to 90
    float x;
    std::memcpy(&x, &b, sizeof x);
    xs.push_back(x);
  }
  for (float x : {INFINITY, -INFINITY, NAN, -NAN, 0x1.62e42ep6f, 0x1.62e430p6f, -0x1.9fe368p6f, -0x1.9fe36ap6f, -0x1.5d589ep6f})
    xs.push_back(x);
  std::vector<float> got = xs;
  cpu::exp_shifted(got.data(), static_cast<int64_t>(got.size()), 0.0f);
  int64_t differ = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const float expected = std::exp(xs[i]);
    EXPECT_TRUE(std::isnan(expected) == std::isnan(got[i]), "exp(", xs[i], ") = ", got[i], " vs ", expected);
    if (std::isnan(expected) || std::memcmp(&got[i], &expected, sizeof expected) == 0) continue;
    ++differ;
    EXPECT_TRUE(std::fabs(std::nextafter(got[i], expected) - expected) == 0.0f, "exp(", xs[i], ") = ", got[i], " vs ", expected);
    EXPECT_EQ(got[i], cpu::exp_like_glibc(xs[i]));
  }
  EXPECT_TRUE(differ <= 8, differ, " of ", xs.size(), " results differ from std::exp by an ulp");
  // the shift is subtracted in float first; every length's tail takes the scalar path to the same bits
  for (int64_t n = 0; n <= 19; ++n) {
    std::vector<float> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = 0.37f * static_cast<float>(i) - 3.1f;
    std::vector<float> y = x;
    cpu::exp_shifted(y.data(), n, 1.7f);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(y[static_cast<size_t>(i)], cpu::exp_like_glibc(x[static_cast<size_t>(i)] - 1.7f));
  }
}

TEST(kernel_attention_cached_equals_full_causal_attention) {
  // Queries of positions 3..6 over a cache of 7 rows give the full pass's rows 3..6, whatever was cached first.
  const int64_t T = 7, H = 4, Hkv = 2, D = 3, past = 3, n = T - past;
  const Vec q = random_vec(T * H * D, 30), k = random_vec(T * Hkv * D, 31), v = random_vec(T * Hkv * D, 32);
  Vec full(T * H * D), lse(H * T), cached(n * H * D);
  cpu::attention_forward<double>(q.data(), k.data(), v.data(), 1, T, H, Hkv, D, full.data(), lse.data());
  cpu::attention_cached<double>(q.data() + past * H * D, k.data(), v.data(), n, past, H, Hkv, D, cached.data());
  for (int64_t i = 0; i < n * H * D; ++i) EXPECT_EQ(cached[i], full[past * H * D + i]);
  // One token at a time, as decoding runs.
  for (int64_t t = 0; t < T; ++t) {
    Vec one(H * D);
    cpu::attention_cached<double>(q.data() + t * H * D, k.data(), v.data(), 1, t, H, Hkv, D, one.data());
    for (int64_t i = 0; i < H * D; ++i) EXPECT_EQ(one[i], full[t * H * D + i]);
  }
  // In fp32, at a 64-wide head and rows past a vector's length, bit for bit too (the vector softmax and P.V)
  {
    const int64_t T2 = 45, H2 = 4, Hkv2 = 2, D2 = 64, past2 = 20, n2 = T2 - past2;
    std::vector<float> q2(T2 * H2 * D2), k2(T2 * Hkv2 * D2), v2(T2 * Hkv2 * D2);
    std::mt19937 gen(33);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (auto* x : {&q2, &k2, &v2})
      for (float& e : *x) e = dist(gen);
    std::vector<float> full2(T2 * H2 * D2), lse2(H2 * T2), cached2(n2 * H2 * D2);
    cpu::attention_forward<float>(q2.data(), k2.data(), v2.data(), 1, T2, H2, Hkv2, D2, full2.data(), lse2.data());
    cpu::attention_cached<float>(q2.data() + past2 * H2 * D2, k2.data(), v2.data(), n2, past2, H2, Hkv2, D2, cached2.data());
    for (int64_t i = 0; i < n2 * H2 * D2; ++i) EXPECT_EQ(cached2[i], full2[past2 * H2 * D2 + i]);
  }
}

TEST(kernel_swiglu_backward_matches_finite_differences) {
  const int64_t n = 20;
  const Vec g = random_vec(n, 13, 2.0), u = random_vec(n, 14), dout = random_vec(n, 15);
  auto forward = [&](const Vec& gv, const Vec& uv) {
    Vec out(n);
    cpu::swiglu_forward<double>(gv.data(), uv.data(), n, out.data());
    return dot(out, dout);
  };
  Vec dg(n), du(n);
  cpu::swiglu_backward<double>(dout.data(), g.data(), u.data(), n, dg.data(), du.data());
  check_gradient("swiglu dg", g, [&](const Vec& x) { return forward(x, u); }, dg);
  check_gradient("swiglu du", u, [&](const Vec& x) { return forward(g, x); }, du);
}

TEST(kernel_cross_entropy_gradient_and_ignore_index) {
  const int64_t rows = 4, V = 7;
  const Vec logits = random_vec(rows * V, 16, 3.0);
  const std::vector<int32_t> targets = {3, cpu::kIgnoreIndex, 0, 6};
  const double scale = 1.0 / 3.0;  // mean over the three labelled rows
  auto loss = [&](const Vec& l) { return cpu::cross_entropy<double>(l.data(), targets.data(), rows, V, 1.0, nullptr, nullptr) * scale; };
  Vec dlogits(rows * V);
  std::vector<double> logprobs(rows);
  const double total = cpu::cross_entropy<double>(logits.data(), targets.data(), rows, V, scale, dlogits.data(), logprobs.data());
  check_gradient("cross-entropy dlogits", logits, loss, dlogits);
  EXPECT_NEAR(total, -(logprobs[0] + logprobs[2] + logprobs[3]), 1e-12);
  EXPECT_NEAR(logprobs[1], 0.0, 0.0);
  // Uniform logits: -log p = log V.
  const Vec flat(V, 0.25);
  const int32_t t0 = 2;
  EXPECT_NEAR(cpu::cross_entropy<double>(flat.data(), &t0, 1, V, 1.0, nullptr, nullptr), std::log(7.0), 1e-12);
}

TEST(kernel_log_softmax_rows_matches_cross_entropy_and_normalizes) {
  const int64_t rows = 3, V = 5;
  const Vec logits = random_vec(rows * V, 21, 4.0);
  std::vector<float> out(rows * V);
  cpu::log_softmax_rows<double>(logits.data(), rows, V, out.data());
  for (int64_t r = 0; r < rows; ++r) {
    double total = 0.0;
    for (int64_t i = 0; i < V; ++i) total += std::exp(static_cast<double>(out[r * V + i]));
    EXPECT_NEAR(total, 1.0, 1e-6);
    for (int32_t t = 0; t < V; ++t) {
      double lp = 0.0;
      cpu::cross_entropy<double>(logits.data() + r * V, &t, 1, V, 1.0, nullptr, &lp);
      EXPECT_NEAR(out[r * V + t], lp, 1e-6);
    }
  }
  // a huge logit: no overflow, the others at -inf-ish but finite
  const Vec big = {1000.0, 0.0};
  std::vector<float> o2(2);
  cpu::log_softmax_rows<double>(big.data(), 1, 2, o2.data());
  EXPECT_NEAR(o2[0], 0.0, 1e-12);
  EXPECT_NEAR(o2[1], -1000.0, 1e-3);
}

TEST(kernel_adamw_step_matches_hand_computation) {
  // torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), one step from zero state:
  // p1 = p0 (1 - lr wd) - lr * g / (|g| + eps) = 1.0 * 0.999 - 0.1 * sign(g).
  Vec p = {1.0, -2.0}, g = {0.5, -0.25}, m = {0, 0}, v = {0, 0};
  cpu::adamw_update<double>(p.data(), g.data(), m.data(), v.data(), 2, 0.1, 0.9, 0.999, 1e-8, 0.01, 1, 1.0);
  EXPECT_NEAR(p[0], 0.999 - 0.1 * 0.5 / (0.5 + 1e-8), 1e-12);
  EXPECT_NEAR(p[1], -2.0 * 0.999 + 0.1 * 0.25 / (0.25 + 1e-8), 1e-12);
  EXPECT_NEAR(m[0], 0.05, 1e-15);
  EXPECT_NEAR(v[1], 0.001 * 0.0625, 1e-15);
  // Second step, gradient scaled by 0.5 (clipping): m2 = 0.9 m1 + 0.1 g', v2 = 0.999 v1 + 0.001 g'^2.
  const double p1 = p[0];
  cpu::adamw_update<double>(p.data(), g.data(), m.data(), v.data(), 2, 0.1, 0.9, 0.999, 1e-8, 0.01, 2, 0.5);
  const double m2 = 0.9 * 0.05 + 0.1 * 0.25, v2 = 0.999 * 0.001 * 0.25 + 0.001 * 0.0625;
  const double expected = p1 * 0.999 - (0.1 / (1 - 0.81)) * m2 / (std::sqrt(v2) / std::sqrt(1 - 0.999 * 0.999) + 1e-8);
  EXPECT_NEAR(p[0], expected, 1e-12);
}

TEST(kernel_gemm_few_rows_equals_the_blocked_path_bit_for_bit) {
  // x·W^T for 1..4 rows takes gemm_nt_few_rows; the same rows inside a 7-row product take the blocked path.
  const int64_t N = 37, K = 53;
  std::mt19937 gen(40);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> a(7 * K), b(N * K), big(7 * N);
  for (float& v : a) v = dist(gen);
  for (float& v : b) v = dist(gen);
  cpu::gemm<float>(false, true, 7, N, K, 1.0f, a.data(), b.data(), 0.0f, big.data());
  qtest::at_both_vector_widths([&](bool narrow) {
    for (int64_t M = 1; M <= cpu::kFewRows; ++M) {
      std::vector<float> few(M * N, std::nanf(""));
      cpu::gemm<float>(false, true, M, N, K, 1.0f, a.data(), b.data(), 0.0f, few.data());
      for (int64_t i = 0; i < M * N; ++i)
        EXPECT_TRUE(few[i] == big[i], "narrow ", narrow, " row-major index ", i, ": ", few[i], " vs ", big[i]);
    }
  });
}

TEST(kernel_gemm_few_rows_of_weights_off_cache_lines_equals_the_blocked_path_bit_for_bit) {
  // A weight read where a model file's mapping holds it starts anywhere on a cache line: gemm_nt_few_rows then takes a
  // short first chunk of k (nt_first_chunk) so that the rest start on lines. The sums stay those of the blocked path,
  // for bf16 and fp32 weights at every offset (rows of whole lines: the short chunk; rows of 53 values: none).
  std::mt19937 gen(41);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const auto check = [&](auto zero, int64_t K, int64_t offset_bytes) {
    using TB = decltype(zero);
    const int64_t N = 37;
    std::vector<float> a(7 * K), big(7 * N);
    for (float& v : a) v = dist(gen);
    std::vector<uint8_t> storage(N * K * sizeof(TB) + 128);
    uint8_t* line = storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64;
    TB* b = reinterpret_cast<TB*>(line + offset_bytes);
    for (int64_t i = 0; i < N * K; ++i) {
      if constexpr (std::is_same_v<TB, float>)
        b[i] = dist(gen);
      else
        b[i] = cpu::Bf16Bits{f32_to_bf16(dist(gen))};
    }
    cpu::gemm<float>(false, true, 7, N, K, 1.0f, a.data(), b, 0.0f, big.data());
    qtest::at_both_vector_widths([&](bool narrow) {
      for (int64_t M = 1; M <= cpu::kFewRows; ++M) {
        std::vector<float> few(M * N, std::nanf(""));
        cpu::gemm<float>(false, true, M, N, K, 1.0f, a.data(), b, 0.0f, few.data());
        for (int64_t i = 0; i < M * N; ++i)
          EXPECT_TRUE(few[i] == big[i], sizeof(TB), "-byte weights ", offset_bytes, " bytes past a line, K ", K,
                      ", narrow ", narrow, ", index ", i, ": ", few[i], " vs ", big[i]);
      }
    });
  };
  EXPECT_EQ(cpu::nt_first_chunk(reinterpret_cast<const void*>(uintptr_t{64 * 9 + 8}), 2, 640), 28);
  EXPECT_EQ(cpu::nt_first_chunk(reinterpret_cast<const void*>(uintptr_t{64 * 9}), 2, 640), cpu::kNtChunk);
  EXPECT_EQ(cpu::nt_first_chunk(reinterpret_cast<const void*>(uintptr_t{64 * 9 + 8}), 2, 53), cpu::kNtChunk);
  for (const int64_t offset : {0, 2, 8, 30, 62}) {
    check(cpu::Bf16Bits{}, 640, offset);
    check(cpu::Bf16Bits{}, 53, offset);
  }
  for (const int64_t offset : {0, 4, 8, 60}) {
    check(0.0f, 528, offset);
    check(0.0f, 53, offset);
  }
}

TEST(kernel_vector_code_is_the_version_the_cpu_chose) {
  // doctor's description of the CPU kernels' version; QLORA_EXPECT_VECTOR_CODE (set by the emulated-CPU tests, which
  // run this under qemu's CPU models) names the one the CPU must have chosen.
  const std::string code = cpu::vector_code();
  EXPECT_TRUE(!code.empty(), "an empty description");
  if (const char* expected = std::getenv("QLORA_EXPECT_VECTOR_CODE"))
    EXPECT_TRUE(code == expected, "vector code ", code, ", expected ", expected);
}

TEST(kernel_philox_gives_the_published_known_answers) {
  // Random123's kat_vectors for Philox4x32-10, through the rounds every device and the CPU's dropout share.
  const auto check = [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key, std::array<uint32_t, 4> want) {
    const std::array<uint32_t, 4> got = philox4x32(counter, key);
    for (int w = 0; w < 4; ++w) EXPECT_TRUE(got[w] == want[w], "word ", w, ": ", got[w], " vs ", want[w]);
  };
  check({0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
  check({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
        {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
  check({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
        {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST(kernel_dropout_keeps_the_values_whose_philox_uniform_reaches_p) {
  // Eight Philox blocks at a time in vectors, with the counters before the first block and after the last group one
  // at a time: every offset within a block and lengths short of, at and past a group give each value the mask of
  // Philox::uniform at its own counter (the last offset: block indices that pass 2^32 inside a group). At both vector
  // widths: the AVX-512 multiplies, then the AVX2 ones (qemu's CPUs: AVX2, and GCC's vectors on the baseline).
  const Philox rng(1234567, RngStream::Dropout, 9);
  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.25f + 0.01f * static_cast<float>(i);
  qtest::at_both_vector_widths([&](bool) {
    for (const float p : {0.05f, 0.5f})
      for (const uint64_t offset : std::initializer_list<uint64_t>{0, 1, 3, 4, 7, (uint64_t{1} << 34) - 8})
        for (const int64_t n : {1, 31, 32, 100, 1000}) {
          const float keep_scale = 1.0f / (1.0f - p);
          std::vector<float> out(static_cast<size_t>(n), std::nanf(""));
          cpu::dropout_f32(x.data(), n, p, keep_scale, rng, offset, out.data());
          int64_t kept = 0;
          for (int64_t i = 0; i < n; ++i) {
            const bool keep = rng.uniform(offset + static_cast<uint64_t>(i)) >= p;
            const float want = keep ? x[i] * keep_scale : 0.0f;
            kept += keep;
            EXPECT_TRUE(out[i] == want, "p ", p, " offset ", offset, " n ", n, " index ", i, ": ", out[i], " vs ", want);
          }
          if (n == 1000) EXPECT_NEAR(static_cast<double>(kept) / n, 1.0 - p, 0.05);
        }
  });
}

TEST(kernel_dot_rows_equals_the_loop_over_d_bit_for_bit) {
  // Attention's scores q·k_j (and backward's dout·v_j) for 1..37 keys (partial tiles of 16), head dims of 8, 64, 70
  // and 300 (16 values a row at a time, then one at a time; past a chunk of 256), rows further apart than a head (the
  // other heads between them): each the sum over d in order, at both vector widths.
  std::mt19937 gen(11);
  std::normal_distribution<float> dist;
  qtest::at_both_vector_widths([&](bool narrow) {
    for (const int64_t dim : {8, 64, 70, 300})
      for (const int64_t count : {1, 16, 37}) {
        const int64_t ld = 3 * dim + 5;
        std::vector<float> x(dim), rows(count * ld), out(count, std::nanf(""));
        for (float& v : x) v = dist(gen);
        for (float& v : rows) v = dist(gen);
        cpu::dot_rows_f32(x.data(), rows.data(), ld, count, dim, out.data());
        for (int64_t j = 0; j < count; ++j) {
          float dot = 0.0f;
          for (int64_t d = 0; d < dim; ++d) dot += x[d] * rows[j * ld + d];
          EXPECT_TRUE(out[j] == dot, "narrow ", narrow, " dim ", dim, " count ", count, " row ", j, ": ", out[j],
                      " vs ", dot);
        }
      }
  });
}

TEST(kernel_gemm_transposes_a_large_b_by_chunks_to_the_same_bits) {
  // B^T is transposed a chunk at a time inside the panels (few rows, or an LM head) or whole in tiles (many rows):
  // here both paths are taken on sizes that are multiples of nothing (several panels, column tiles and k chunks;
  // sums in registers for 64 or 16 columns at a time and the rest a row at a time), at both vector widths, and must give
  // what a plain row-major B gives, bit for bit, and that is the sum over k in order, one product at a time.
  qtest::at_both_vector_widths([&](bool narrow) {
    for (const int64_t M : {65, 70, 300}) {  // 65: a last block of one row
      const int64_t N = 600, K = 300;
      std::vector<float> a(M * K), b(N * K), plain(M * N), chunked(M * N, 1.0f), via_gemm(M * N, 2.0f), bt(K * N);
      std::mt19937 gen(7);
      std::normal_distribution<float> dist;
      for (float& x : a) x = dist(gen);
      for (float& x : b) x = dist(gen);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n) bt[k * N + n] = b[n * K + k];
      cpu::gemm_row_major<float>(M, N, K, 1.5f, a.data(), bt.data(), false, 0.0f, plain.data());
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float sum = 0.0f;
          for (int64_t k = 0; k < K; ++k) sum += a[m * K + k] * b[n * K + k];
          EXPECT_TRUE(plain[m * N + n] == 1.5f * sum, "narrow ", narrow, " M ", M, " row ", m, " column ", n, ": ",
                      plain[m * N + n], " vs ", 1.5f * sum);
        }
      cpu::gemm_row_major<float>(M, N, K, 1.5f, a.data(), b.data(), true, 0.0f, chunked.data());
      cpu::gemm<float>(false, true, M, N, K, 1.5f, a.data(), b.data(), 0.0f, via_gemm.data());  // M 300: whole
      for (int64_t i = 0; i < M * N; ++i) {
        EXPECT_TRUE(plain[i] == chunked[i], "narrow ", narrow, " M ", M, " index ", i, ": ", plain[i], " vs ",
                    chunked[i]);
        EXPECT_TRUE(plain[i] == via_gemm[i], "narrow ", narrow, " M ", M, " index ", i, ": ", plain[i], " vs ",
                    via_gemm[i]);
      }
    }
  });
}

TEST(kernel_gemm_of_a_transposed_a_is_the_sum_in_order) {
  // op(A) = A^T (LoRA's weight gradients: dy^T x) is transposed whole first, 16 rows at a time and the rest in tiles:
  // 37 rows of A^T (two blocks of 16 and 5 more), 300 long, each sum over k in order, at both vector widths.
  const int64_t M = 37, N = 70, K = 300;
  std::mt19937 gen(13);
  std::normal_distribution<float> dist;
  std::vector<float> a_stored(K * M), b(K * N), c(M * N);
  for (float& x : a_stored) x = dist(gen);
  for (float& x : b) x = dist(gen);
  qtest::at_both_vector_widths([&](bool narrow) {
    cpu::gemm<float>(true, false, M, N, K, 1.0f, a_stored.data(), b.data(), 0.0f, c.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float sum = 0.0f;
        for (int64_t k = 0; k < K; ++k) sum += a_stored[k * M + m] * b[k * N + n];
        EXPECT_TRUE(c[m * N + n] == 1.0f * sum, "narrow ", narrow, " row ", m, " column ", n, ": ", c[m * N + n],
                    " vs ", sum);
      }
  });
}

TEST(kernel_gemm_with_a_16_bit_b_equals_gemm_of_the_widened_b_bit_for_bit) {
  // A frozen weight kept as bf16 or fp16 bits is widened where it is read or packed: every path (few rows, panels
  // packing x·W^T by chunks, the whole transpose of a small B for many rows, and dy·W) gives the bits of the fp32
  // GEMM of the widened B.
  const int64_t N = 600, K = 300;
  std::mt19937 gen(9);
  std::normal_distribution<float> dist;
  std::vector<uint16_t> bf(N * K), hf(N * K);
  std::vector<float> wide_bf(N * K), wide_hf(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    const float v = dist(gen);
    bf[i] = f32_to_bf16(v);
    hf[i] = f32_to_f16(v);
    // every 97th fp16 weight one of the values a widening can get wrong: zeros, subnormals, the extreme normals
    static constexpr uint16_t kEdges[] = {0x0000, 0x8000, 0x0001, 0x8001, 0x0200,
                                          0x03ff, 0x83ff, 0x0400, 0x7bff, 0xfbff};
    if (i % 97 == 0) hf[i] = kEdges[(i / 97) % std::size(kEdges)];
    wide_bf[i] = bf16_to_f32(bf[i]);
    wide_hf[i] = f16_to_f32(hf[i]);
  }
  const auto* b16 = reinterpret_cast<const cpu::Bf16Bits*>(bf.data());
  const auto* h16 = reinterpret_cast<const cpu::F16Bits*>(hf.data());
  qtest::at_both_vector_widths([&](bool narrow) {
    for (const int64_t M : {3, 70, 300}) {
      for (const bool tb : {true, false}) {
        const int64_t inner = tb ? K : N, outer = tb ? N : K;
        std::vector<float> a(M * inner);
        for (float& x : a) x = dist(gen);
        std::vector<float> want_bf(M * outer, 1.0f), want_hf(M * outer, 1.0f), got_bf(M * outer, 1.0f),
            got_hf(M * outer, 1.0f);
        cpu::gemm<float>(false, tb, M, outer, inner, 0.5f, a.data(), wide_bf.data(), 0.25f, want_bf.data());
        cpu::gemm<float>(false, tb, M, outer, inner, 0.5f, a.data(), wide_hf.data(), 0.25f, want_hf.data());
        cpu::gemm<float>(false, tb, M, outer, inner, 0.5f, a.data(), b16, 0.25f, got_bf.data());
        cpu::gemm<float>(false, tb, M, outer, inner, 0.5f, a.data(), h16, 0.25f, got_hf.data());
        for (int64_t i = 0; i < M * outer; ++i) {
          EXPECT_TRUE(want_bf[i] == got_bf[i], "narrow ", narrow, " bf16 M ", M, " trans_b ", tb, " index ", i, ": ",
                      got_bf[i], " vs ", want_bf[i]);
          EXPECT_TRUE(want_hf[i] == got_hf[i], "narrow ", narrow, " fp16 M ", M, " trans_b ", tb, " index ", i, ": ",
                      got_hf[i], " vs ", want_hf[i]);
        }
      }
    }
  });
}
