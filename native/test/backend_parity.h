// Parity of a backend under test with the CPU backend, op by op on awkward sizes (odd row lengths, GQA, sequence
// lengths that are not multiples of a block, vocabularies larger than a block), NF4 dequantize and dropout bit for
// bit, and the whole model (loss, every log-prob and LoRA gradient on the reference fixtures; NF4 training with
// AdamW under a budget that pages the optimizer; generation with the KV cache). The native tests run these on the
// CUDA kernels under the emulator (cuda_emu_backend_test.cpp), the GPU tests on the GPU (test_gpu/).
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "harness.h"
#include "io/dtype.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optimizer.h"
#include "model/rope.h"
#include "quant/nf4.h"

namespace parity {

using namespace qlora;
using MakeBackend = std::function<std::unique_ptr<Backend>()>;

// How close the whole model must come to the CPU: loss (mean over labelled positions) and log-probs absolutely,
// gradients and trained parameters relatively.
struct ModelTolerance {
  double loss, logprob, gradient;
};

inline std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// `host`'s values in a buffer of `be` (workspace).
template <typename T>
DeviceArray<T> on_device(Backend* be, const std::vector<T>& host) {
  DeviceArray<T> d(be, static_cast<int64_t>(host.size()), MemCategory::Workspace);
  d.upload(host);
  return d;
}

// One buffer on the CPU and one on the backend under test, with the same contents.
struct Twin {
  DeviceArray<float> cpu, dev;
  Twin(Backend* c, Backend* d, const std::vector<float>& host)
      : cpu(c, static_cast<int64_t>(host.size()), MemCategory::Activations),
        dev(d, static_cast<int64_t>(host.size()), MemCategory::Activations) {
    cpu.upload(host);
    dev.upload(host);
  }
  Twin(Backend* c, Backend* d, size_t n) : Twin(c, d, std::vector<float>(n, 0.0f)) {}
};

inline void expect_close(const char* what, const std::vector<float>& expected, const std::vector<float>& got,
                         double tol) {
  EXPECT_EQ(expected.size(), got.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    const double e = expected[i], g = got[i];
    if (!(std::fabs(e - g) <= tol * std::max(1.0, std::fabs(e))))
      qtest::fail_test(__FILE__, __LINE__, what, ": element ", i, " is ", g, ", the CPU's ", e, " (tol ", tol, ")");
  }
}
inline void expect_close(const char* what, const Twin& t, double tol) {
  expect_close(what, t.cpu.download(), t.dev.download(), tol);
}

// AdamW over more tensors than one launch takes (kernels::kTensorsPerLaunch is 16), of sizes from empty to longer
// than a block, with the gradient scale of their norm: unclipped, clipped, and not finite (nothing written).
inline void adamw_over_many_tensors(Backend* c, Backend* e) {
  constexpr size_t kTensors = 19;
  std::vector<std::unique_ptr<Twin>> params, grads, ms, vs;
  for (size_t t = 0; t < kTensors; ++t) {
    const size_t n = t == 3 ? 0 : (t * 97) % 700 + 1;
    params.push_back(std::make_unique<Twin>(c, e, random_floats(n, static_cast<uint32_t>(60 + t))));
    grads.push_back(std::make_unique<Twin>(c, e, random_floats(n, static_cast<uint32_t>(90 + t))));
    ms.push_back(std::make_unique<Twin>(c, e, n));
    vs.push_back(std::make_unique<Twin>(c, e, n));
  }
  auto tensors_on = [&](bool dev) {
    std::vector<AdamWTensor> out;
    for (size_t t = 0; t < kTensors; ++t) {
      auto side = [&](Twin& x) { return (dev ? x.dev : x.cpu).get(); };
      out.push_back({side(*params[t]), side(*grads[t]), side(*ms[t]), side(*vs[t]), params[t]->cpu.size()});
    }
    return out;
  };
  auto grads_on = [&](bool dev) {
    std::vector<std::pair<const float*, int64_t>> out;
    for (auto& g : grads) out.emplace_back((dev ? g->dev : g->cpu).get(), g->cpu.size());
    return out;
  };
  DeviceArray<GradScale> scale_c(c, 1, MemCategory::Workspace), scale_e(e, 1, MemCategory::Workspace);
  // step 1: loss scale 2, no clipping; step 2: a max norm below the norm (clipped); step 3: an infinite gradient
  for (int64_t step = 1; step <= 3; ++step) {
    const double max_norm = step == 2 ? 1.0 : 0.0;
    if (step == 3) {
      grads[5]->cpu.upload(std::vector<float>(static_cast<size_t>(grads[5]->cpu.size()), INFINITY));
      grads[5]->dev.upload(std::vector<float>(static_cast<size_t>(grads[5]->dev.size()), INFINITY));
    }
    c->grad_scale(grads_on(false), 2.0, max_norm, scale_c.get());
    e->grad_scale(grads_on(true), 2.0, max_norm, scale_e.get());
    const GradScale sc = scale_c.download().at(0), se = scale_e.download().at(0);
    EXPECT_EQ(se.finite, sc.finite);
    EXPECT_EQ(se.clipped, sc.clipped);
    EXPECT_EQ(sc.clipped, step == 2 ? 1 : 0);
    EXPECT_EQ(sc.finite, step == 3 ? 0 : 1);
    if (sc.finite) {
      EXPECT_NEAR(se.norm, sc.norm, 1e-12 * sc.norm);
      EXPECT_NEAR(se.scale, sc.scale, 1e-12 * sc.scale);
    }
    const std::vector<float> before = params[7]->dev.download();
    c->adamw_update_many(tensors_on(false), 1e-2, 0.9, 0.999, 1e-8, 0.01, step, scale_c.get());
    e->adamw_update_many(tensors_on(true), 1e-2, 0.9, 0.999, 1e-8, 0.01, step, scale_e.get());
    if (step == 3) EXPECT_TRUE(params[7]->dev.download() == before, "a step of infinite norm changed a parameter");
  }
  for (size_t t = 0; t < kTensors; ++t) {
    expect_close("adamw param", *params[t], 1e-7);
    expect_close("adamw m", *ms[t], 1e-7);
    expect_close("adamw v", *vs[t], 1e-7);
  }
}

inline void elementwise_and_row_ops(const MakeBackend& make) {
  auto cpu = make_cpu_backend();
  auto dev = make();
  Backend* c = cpu.get();
  Backend* e = dev.get();
  const int64_t rows = 7, dim = 301;  // a row longer than a block of 256 and not a multiple of it
  const int64_t n = rows * dim;
  Twin x(c, e, random_floats(n, 1)), y(c, e, random_floats(n, 2)), w(c, e, random_floats(dim, 3));
  c->add_inplace(y.cpu.get(), x.cpu.get(), n);
  e->add_inplace(y.dev.get(), x.dev.get(), n);
  expect_close("add_inplace", y, 0);
  c->add_bias_rows(y.cpu.get(), w.cpu.get(), rows, dim);
  e->add_bias_rows(y.dev.get(), w.dev.get(), rows, dim);
  expect_close("add_bias_rows", y, 0);
  c->scale_inplace(y.cpu.get(), 0.37f, n);
  e->scale_inplace(y.dev.get(), 0.37f, n);
  expect_close("scale_inplace", y, 0);
  EXPECT_NEAR(e->sum_of_squares(y.dev.get(), n), c->sum_of_squares(y.cpu.get(), n), 1e-9 * c->sum_of_squares(y.cpu.get(), n));

  Twin out(c, e, n), rstd(c, e, rows), dx(c, e, n);
  c->rmsnorm_forward(x.cpu.get(), w.cpu.get(), rows, dim, 1e-5, out.cpu.get(), rstd.cpu.get());
  e->rmsnorm_forward(x.dev.get(), w.dev.get(), rows, dim, 1e-5, out.dev.get(), rstd.dev.get());
  expect_close("rmsnorm_forward y", out, 1e-6);
  expect_close("rmsnorm_forward rstd", rstd, 1e-6);
  c->rmsnorm_backward(y.cpu.get(), x.cpu.get(), w.cpu.get(), rstd.cpu.get(), rows, dim, dx.cpu.get());
  e->rmsnorm_backward(y.dev.get(), x.dev.get(), w.dev.get(), rstd.dev.get(), rows, dim, dx.dev.get());
  expect_close("rmsnorm_backward", dx, 1e-6);

  Twin g(c, e, random_floats(n, 4, 3.0f)), dg(c, e, n), du(c, e, n);
  c->swiglu_forward(g.cpu.get(), x.cpu.get(), n, out.cpu.get());
  e->swiglu_forward(g.dev.get(), x.dev.get(), n, out.dev.get());
  expect_close("swiglu_forward", out, 1e-6);
  c->swiglu_backward(y.cpu.get(), g.cpu.get(), x.cpu.get(), n, dg.cpu.get(), du.cpu.get());
  e->swiglu_backward(y.dev.get(), g.dev.get(), x.dev.get(), n, dg.dev.get(), du.dev.get());
  expect_close("swiglu_backward dg", dg, 1e-6);
  expect_close("swiglu_backward du", du, 1e-6);
  // in place, as the model calls it: dg over g, du over u
  Twin g_in_place(c, e, g.cpu.download()), u_in_place(c, e, x.cpu.download());
  c->swiglu_backward(y.cpu.get(), g_in_place.cpu.get(), u_in_place.cpu.get(), n, g_in_place.cpu.get(), u_in_place.cpu.get());
  e->swiglu_backward(y.dev.get(), g_in_place.dev.get(), u_in_place.dev.get(), n, g_in_place.dev.get(), u_in_place.dev.get());
  expect_close("CPU swiglu_backward in place dg", dg.cpu.download(), g_in_place.cpu.download(), 0);
  expect_close("CPU swiglu_backward in place du", du.cpu.download(), u_in_place.cpu.download(), 0);
  expect_close("swiglu_backward in place dg", dg.dev.download(), g_in_place.dev.download(), 0);
  expect_close("swiglu_backward in place du", du.dev.download(), u_in_place.dev.download(), 0);

  const std::vector<int32_t> ids = {3, 0, 6, 6, 1, 5, 2};
  Twin table(c, e, random_floats(7 * dim, 5));
  c->embedding(ids.data(), rows, {table.cpu.get(), FloatFormat::F32}, dim, out.cpu.get());
  e->embedding(ids.data(), rows, {table.dev.get(), FloatFormat::F32}, dim, out.dev.get());
  expect_close("embedding", out, 0);

  // 16-bit storage of hidden states: rounded to nearest even, widened exactly, on both
  for (FloatFormat f : {FloatFormat::BF16, FloatFormat::F16}) {
    std::vector<uint16_t> bits_c(static_cast<size_t>(n));
    DeviceArray<uint16_t> bits_e(e, n, MemCategory::Workspace);
    c->pack_16(x.cpu.get(), n, f, bits_c.data());
    e->pack_16(x.dev.get(), n, f, bits_e.get());
    EXPECT_TRUE(bits_e.download() == bits_c, "pack_16");
    Twin wide(c, e, n);
    c->widen_16(bits_c.data(), n, f, wide.cpu.get());
    e->widen_16(bits_e.get(), n, f, wide.dev.get());
    expect_close("widen_16", wide, 0);
    const std::vector<float> xs = x.cpu.download(), ws = wide.cpu.download();
    for (int64_t i = 0; i < n; ++i)
      EXPECT_TRUE(ws[i] == (f == FloatFormat::BF16 ? round_to_bf16(xs[i]) : round_to_f16(xs[i])), "widen_16 of pack_16 at ", i);
  }

  adamw_over_many_tensors(c, e);
}


// A matrix of 16-bit values (bf16 or fp16 bits) on both backends, and the same values widened to fp32.
struct StoredTwin {
  DeviceArray<uint16_t> cpu, dev;
  std::vector<float> widened;
  FloatFormat format;
  StoredTwin(Backend* c, Backend* d, const std::vector<float>& values, FloatFormat f)
      : cpu(c, static_cast<int64_t>(values.size()), MemCategory::Weights),
        dev(d, static_cast<int64_t>(values.size()), MemCategory::Weights),
        format(f) {
    std::vector<uint16_t> bits(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      bits[i] = f == FloatFormat::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
      widened.push_back(f == FloatFormat::BF16 ? bf16_to_f32(bits[i]) : f16_to_f32(bits[i]));
    }
    cpu.upload(bits);
    dev.upload(bits);
  }
  StoredMatrix on_cpu() const { return {cpu.get(), format}; }
  StoredMatrix on_dev() const { return {dev.get(), format}; }
};

// Frozen weights kept in 16 bits: the embedding reads them widened (exactly), and gemm_stored computes what gemm
// computes with B widened beforehand, for x · W^T and dy · W, few rows and many.
inline void stored_weights(const MakeBackend& make) {
  auto cpu = make_cpu_backend();
  auto dev = make();
  Backend* c = cpu.get();
  Backend* e = dev.get();
  for (FloatFormat f : {FloatFormat::BF16, FloatFormat::F16}) {
    const int64_t vocab = 9, dim = 301, rows = 5;
    const StoredTwin table(c, e, random_floats(vocab * dim, 21), f);
    const std::vector<int32_t> ids = {8, 0, 3, 3, 7};
    Twin out(c, e, rows * dim);
    c->embedding(ids.data(), rows, table.on_cpu(), dim, out.cpu.get());
    e->embedding(ids.data(), rows, table.on_dev(), dim, out.dev.get());
    std::vector<float> expected;
    for (int32_t id : ids) expected.insert(expected.end(), table.widened.begin() + id * dim, table.widened.begin() + (id + 1) * dim);
    expect_close("embedding of a 16-bit table on the CPU", expected, out.cpu.download(), 0);
    expect_close("embedding of a 16-bit table", out, 0);

    // conversions of a stored matrix into each format, bit for bit the CPU's
    for (FloatFormat to : {FloatFormat::F32, FloatFormat::BF16, FloatFormat::F16}) {
      const int64_t n = vocab * dim, bytes = n * float_format_bytes(to);
      std::vector<uint8_t> on_cpu(static_cast<size_t>(bytes));
      DeviceArray<uint8_t> on_dev(e, bytes, MemCategory::Workspace);
      c->convert_stored(table.on_cpu(), n, to, on_cpu.data());
      e->convert_stored(table.on_dev(), n, to, on_dev.get());
      EXPECT_TRUE(on_dev.download() == on_cpu, "convert_stored to format ", static_cast<int>(to));
      if (to == FloatFormat::F32)
        EXPECT_TRUE(std::memcmp(on_cpu.data(), table.widened.data(), static_cast<size_t>(bytes)) == 0, "widened exactly");
    }

    const int64_t N = 37, K = 19;  // W [N, K]
    const StoredTwin w(c, e, random_floats(N * K, 22), f);
    Twin wide(c, e, w.widened);
    for (int64_t M : {int64_t{3}, int64_t{70}}) {
      for (bool tb : {true, false}) {
        const int64_t inner = tb ? K : N, outer = tb ? N : K;  // x [M, K] · W^T, or dy [M, N] · W
        Twin a(c, e, random_floats(M * inner, 23)), got(c, e, random_floats(M * outer, 24)), plain(c, e, M * outer);
        plain.cpu.upload(got.cpu.download());
        c->gemm(false, tb, M, outer, inner, 0.5f, a.cpu.get(), wide.cpu.get(), 1.0f, plain.cpu.get());
        c->gemm_stored(false, tb, M, outer, inner, 0.5f, a.cpu.get(), w.on_cpu(), 1.0f, got.cpu.get());
        e->gemm_stored(false, tb, M, outer, inner, 0.5f, a.dev.get(), w.on_dev(), 1.0f, got.dev.get());
        expect_close("gemm_stored on the CPU, against gemm of the widened B", plain.cpu.download(), got.cpu.download(), 0);
        expect_close("gemm_stored", got, 1e-5);
      }
    }
  }
}

inline void cross_entropy_and_log_softmax(const MakeBackend& make) {
  auto cpu = make_cpu_backend();
  auto dev = make();
  Backend* c = cpu.get();
  Backend* e = dev.get();
  const int64_t rows = 6, vocab = 301;
  Twin logits(c, e, random_floats(rows * vocab, 11, 4.0f)), dl(c, e, rows * vocab);
  const std::vector<int32_t> targets = {5, 300, -100, 250, 0, 99};  // odd rows: targets far into the row
  DeviceArray<int32_t> t_c(c, rows, MemCategory::Workspace), t_e(e, rows, MemCategory::Workspace);
  t_c.upload(targets);
  t_e.upload(targets);
  DeviceArray<double> lp_c(c, rows, MemCategory::Workspace), lp_e(e, rows, MemCategory::Workspace);
  c->cross_entropy(logits.cpu.get(), t_c.get(), rows, vocab, 0.25, dl.cpu.get(), lp_c.get());
  e->cross_entropy(logits.dev.get(), t_e.get(), rows, vocab, 0.25, dl.dev.get(), lp_e.get());
  const std::vector<double> want = lp_c.download();
  auto expect_logprobs = [&](const char* what) {
    const std::vector<double> got = lp_e.download();
    for (int64_t r = 0; r < rows; ++r)
      // the GPU's exponentials and their (compensated) sums in fp32, the CPU's in double
      EXPECT_TRUE(std::fabs(got[r] - want[r]) <= 1e-6, what, " row ", r, ": ", got[r], " vs ", want[r]);
  };
  expect_logprobs("cross_entropy log-probs");
  EXPECT_NEAR(want[2], 0.0, 0.0);  // the ignored row
  expect_close("cross_entropy dlogits", dl, 1e-7);
  e->cross_entropy(logits.dev.get(), t_e.get(), rows, vocab, 1.0, nullptr, lp_e.get());
  expect_logprobs("cross_entropy without gradients");
  std::vector<float> ls_c(rows * vocab), ls_e(rows * vocab);
  c->log_softmax_rows(logits.cpu.get(), rows, vocab, ls_c.data());
  e->log_softmax_rows(logits.dev.get(), rows, vocab, ls_e.data());
  expect_close("log_softmax_rows", ls_c, ls_e, 1e-7);
  // in place, as the model asks for it: the gradient overwrites the logits
  Twin inplace(c, e, random_floats(rows * vocab, 11, 4.0f));
  e->cross_entropy(inplace.dev.get(), t_e.get(), rows, vocab, 0.25, inplace.dev.get(), lp_e.get());
  c->cross_entropy(inplace.cpu.get(), t_c.get(), rows, vocab, 0.25, inplace.cpu.get(), lp_c.get());
  expect_logprobs("cross_entropy in place");
  expect_close("cross_entropy in place", inplace, 1e-7);
  // a target outside the vocabulary: a NaN log-prob and no gradient, never a read outside the row
  const std::vector<int32_t> bad = {5, 301, 0, 0, 0, -7};
  t_c.upload(bad);
  t_e.upload(bad);
  c->cross_entropy(logits.cpu.get(), t_c.get(), rows, vocab, 1.0, dl.cpu.get(), lp_c.get());
  e->cross_entropy(logits.dev.get(), t_e.get(), rows, vocab, 1.0, dl.dev.get(), lp_e.get());
  for (const std::vector<double>& lp : {lp_c.download(), lp_e.download()}) {
    EXPECT_TRUE(std::isnan(lp[1]) && std::isnan(lp[5]) && !std::isnan(lp[0]), "NaN log-probs for targets 301 and -7");
  }
  const std::vector<float> d_bad = dl.dev.download();
  for (int64_t i = 0; i < vocab; ++i) EXPECT_NEAR(d_bad[vocab + i], 0.0, 0.0);

  // Llama 3's vocabulary: a row of 128256 logits, most of them contributing to the sum (a spread of 2), one far
  // above the rest (a confident prediction) in the second row; the fp32 sums stay within the same bounds
  const int64_t big = 128256;
  std::vector<float> wide = random_floats(2 * big, 12, 2.0f);
  wide[big + 777] = 25.0f;
  Twin big_logits(c, e, wide), big_dl(c, e, 2 * big);
  const std::vector<int32_t> big_targets = {128000, 777};
  DeviceArray<int32_t> bt_c(c, 2, MemCategory::Workspace), bt_e(e, 2, MemCategory::Workspace);
  bt_c.upload(big_targets);
  bt_e.upload(big_targets);
  c->cross_entropy(big_logits.cpu.get(), bt_c.get(), 2, big, 0.5, big_dl.cpu.get(), lp_c.get());
  e->cross_entropy(big_logits.dev.get(), bt_e.get(), 2, big, 0.5, big_dl.dev.get(), lp_e.get());
  const std::vector<double> big_want = lp_c.download(), big_got = lp_e.download();
  for (int r = 0; r < 2; ++r)
    EXPECT_TRUE(std::fabs(big_got[r] - big_want[r]) <= 1e-6, "a row of 128256 logits ", r, ": ", big_got[r], " vs ",
                big_want[r]);
  expect_close("cross_entropy dlogits over 128256 logits", big_dl, 1e-7);
}

inline void rope_and_attention(const MakeBackend& make) {
  auto cpu = make_cpu_backend();
  auto dev = make();
  Backend* c = cpu.get();
  Backend* e = dev.get();
  // GQA 6 query heads over 2 kv heads (and 3 over 3, and 2 over 1), 37 positions (more than one tile of 32 keys),
  // heads of 10 dimensions, and of 72 (more than one dimension per thread of a block of 32)
  struct Shape {
    int64_t heads, kv_heads, hd;
  };
  for (const Shape& shape : {Shape{6, 2, 10}, Shape{3, 3, 10}, Shape{2, 1, 72}}) {
    const int64_t heads = shape.heads, kv_heads = shape.kv_heads, hd = shape.hd;
    const int64_t batch = 2, seq = 37;
    const int64_t qn = batch * seq * heads * hd, kvn = batch * seq * kv_heads * hd;
    ModelConfig config;
    config.head_dim = hd;
    config.rope_theta = 10000.0;
    const RopeTables tables = build_rope_tables(config, seq);
    Twin cos(c, e, tables.cos), sin(c, e, tables.sin);
    Twin q(c, e, random_floats(qn, 21)), k(c, e, random_floats(kvn, 22)), v(c, e, random_floats(kvn, 23));
    for (bool inverse : {false, true}) {
      c->rope_apply(q.cpu.get(), batch, seq, heads, hd, cos.cpu.get(), sin.cpu.get(), inverse);
      e->rope_apply(q.dev.get(), batch, seq, heads, hd, cos.dev.get(), sin.dev.get(), inverse);
      expect_close("rope_apply", q, 1e-6);
    }
    c->rope_apply(k.cpu.get(), batch, seq, kv_heads, hd, cos.cpu.get(), sin.cpu.get(), false);
    e->rope_apply(k.dev.get(), batch, seq, kv_heads, hd, cos.dev.get(), sin.dev.get(), false);
    expect_close("rope_apply k", k, 1e-6);

    Twin out(c, e, qn), lse(c, e, batch * heads * seq);
    c->attention_forward(q.cpu.get(), k.cpu.get(), v.cpu.get(), batch, seq, heads, kv_heads, hd, out.cpu.get(), lse.cpu.get());
    e->attention_forward(q.dev.get(), k.dev.get(), v.dev.get(), batch, seq, heads, kv_heads, hd, out.dev.get(), lse.dev.get());
    expect_close("attention_forward out", out, 1e-5);
    expect_close("attention_forward lse", lse, 1e-6);

    // each backend from its own forward pass, as in training
    Twin dout(c, e, random_floats(qn, 24)), dq(c, e, qn), dk(c, e, kvn), dv(c, e, kvn);
    c->attention_backward(dout.cpu.get(), q.cpu.get(), k.cpu.get(), v.cpu.get(), out.cpu.get(), lse.cpu.get(), batch,
                          seq, heads, kv_heads, hd, dq.cpu.get(), dk.cpu.get(), dv.cpu.get());
    e->attention_backward(dout.dev.get(), q.dev.get(), k.dev.get(), v.dev.get(), out.dev.get(), lse.dev.get(), batch,
                          seq, heads, kv_heads, hd, dq.dev.get(), dk.dev.get(), dv.dev.get());
    expect_close("attention_backward dq", dq, 1e-5);
    expect_close("attention_backward dk", dk, 1e-5);
    expect_close("attention_backward dv", dv, 1e-5);

    // Generation: 3 new queries after 34 cached positions (batch 1), against the CPU's cached attention.
    const int64_t past = 34, q_len = 3;
    Twin qc(c, e, random_floats(q_len * heads * hd, 25)), oc(c, e, q_len * heads * hd);
    c->attention_cached(qc.cpu.get(), k.cpu.get(), v.cpu.get(), q_len, past, heads, kv_heads, hd, oc.cpu.get());
    e->attention_cached(qc.dev.get(), k.dev.get(), v.dev.get(), q_len, past, heads, kv_heads, hd, oc.dev.get());
    expect_close("attention_cached", oc, 1e-5);
  }
}

// The tensor-core attention of half compute (cuda/flash_attention.cuh) against the CPU's fp32 attention of the same
// inputs rounded to the compute's 16-bit type, as the kernels stage them; the kernels also round P and dS into their
// products, so the two agree to that type's precision. Sequences that end inside a tile of 64 and of 32 rows, GQA,
// every head size built (16, 32, 64, 128), and generation's prefill over a KV cache.
inline void flash_attention(const MakeBackend& make, bool f16) {
  auto cpu = make_cpu_backend();
  auto dev = make();
  Backend* c = cpu.get();
  Backend* e = dev.get();
  const double tol = f16 ? 4e-3 : 3e-2;
  auto rounded = [f16](std::vector<float> v) {
    for (float& x : v) x = f16 ? round_to_f16(x) : round_to_bf16(x);
    return v;
  };
  struct Shape {
    int64_t heads, kv_heads, hd, seq;
  };
  for (const Shape& shape : {Shape{4, 2, 16, 37}, Shape{2, 1, 32, 100}, Shape{2, 2, 64, 70}, Shape{2, 1, 128, 65}}) {
    const int64_t heads = shape.heads, kv_heads = shape.kv_heads, hd = shape.hd, seq = shape.seq, batch = 2;
    const int64_t qn = batch * seq * heads * hd, kvn = batch * seq * kv_heads * hd;
    Twin q(c, e, rounded(random_floats(qn, 31))), k(c, e, rounded(random_floats(kvn, 32))),
        v(c, e, rounded(random_floats(kvn, 33)));
    Twin out(c, e, qn), lse(c, e, batch * heads * seq);
    c->attention_forward(q.cpu.get(), k.cpu.get(), v.cpu.get(), batch, seq, heads, kv_heads, hd, out.cpu.get(), lse.cpu.get());
    e->attention_forward(q.dev.get(), k.dev.get(), v.dev.get(), batch, seq, heads, kv_heads, hd, out.dev.get(), lse.dev.get());
    expect_close("tensor-core attention out", out, tol);
    expect_close("tensor-core attention lse", lse, 1e-4);

    Twin dout(c, e, rounded(random_floats(qn, 34))), dq(c, e, qn), dk(c, e, kvn), dv(c, e, kvn);
    c->attention_backward(dout.cpu.get(), q.cpu.get(), k.cpu.get(), v.cpu.get(), out.cpu.get(), lse.cpu.get(), batch,
                          seq, heads, kv_heads, hd, dq.cpu.get(), dk.cpu.get(), dv.cpu.get());
    e->attention_backward(dout.dev.get(), q.dev.get(), k.dev.get(), v.dev.get(), out.dev.get(), lse.dev.get(), batch,
                          seq, heads, kv_heads, hd, dq.dev.get(), dk.dev.get(), dv.dev.get());
    expect_close("tensor-core attention dq", dq, tol);
    expect_close("tensor-core attention dk", dk, tol);
    expect_close("tensor-core attention dv", dv, tol);

    // generation's prefill: 20 new rows after 0 and after 17 cached ones (batch element 0's keys as the cache)
    for (int64_t past : {int64_t{0}, int64_t{17}}) {
      const int64_t q_len = 20;
      Twin qc(c, e, rounded(random_floats(q_len * heads * hd, 35))), oc(c, e, q_len * heads * hd);
      c->attention_cached(qc.cpu.get(), k.cpu.get(), v.cpu.get(), q_len, past, heads, kv_heads, hd, oc.cpu.get());
      e->attention_cached(qc.dev.get(), k.dev.get(), v.dev.get(), q_len, past, heads, kv_heads, hd, oc.dev.get());
      expect_close("tensor-core attention of a prefill", oc, tol);
    }
  }
}

// Generation's few-row products. nf4_matmul_nt on awkward sizes (rows of 99 and 301 weights: a row starting inside a
// byte, blocks straddling rows) and on rows of whole 32-weight lanes (the GPU's wide path: 640 weights, fewer lanes
// than a warp; 1344, more than a warp's step), with fp32 or double-quantized block constants, alone or with a bias and
// LoRA's up projection, 1 to 4 rows, every rounding of the quant state; and LoRA's down projection gemm_few_rows_nt.
inline void nf4_matmul_nt(const MakeBackend& make) {
  auto cpu = make_cpu_backend();
  auto dev = make();
  const int64_t rank = 5;
  for (const auto& shape : {std::pair<int64_t, int64_t>{7, 100}, {37, 99}, {19, 301}, {5, 640}, {9, 1344}}) {
    const int64_t out = shape.first, in = shape.second;  // not a structured binding: the lambdas below capture them
    const int64_t n = out * in;
    const nf4::Blockwise4bit q = nf4::quantize(random_floats(static_cast<size_t>(n), 51).data(), n, 64);
    const nf4::DoubleQuantized dq = nf4::double_quantize(q.absmax, 256);
    const std::vector<float> x = random_floats(static_cast<size_t>(4 * in), 52);
    const std::vector<float> t = random_floats(static_cast<size_t>(4 * rank), 53), b = random_floats(out * rank, 54);
    const std::vector<float> bias = random_floats(static_cast<size_t>(out), 55);
    struct Operands {
      DeviceArray<uint8_t> packed, codes;
      DeviceArray<float> absmax, absmax2, map, x, t, b, bias, y;
    };
    auto operands = [&](Backend* be) {
      return Operands{on_device(be, q.packed), on_device(be, dq.codes), on_device(be, q.absmax),
                      on_device(be, dq.state2_absmax), on_device(be, nf4::dynamic_map_signed()), on_device(be, x),
                      on_device(be, t), on_device(be, b), on_device(be, bias),
                      DeviceArray<float>(be, 4 * out, MemCategory::Workspace)};
    };
    Operands oc = operands(cpu.get()), od = operands(dev.get());
    for (bool double_quantized : {false, true})
      for (bool addends : {false, true})
        for (FloatFormat rt : {FloatFormat::F32, FloatFormat::BF16, FloatFormat::F16})
          for (int64_t rows = 1; rows <= 4; ++rows) {
            auto product = [&](Backend* be, Operands& o) {
              Nf4Weight w;
              w.packed = o.packed.get();
              if (double_quantized) {
                w.absmax_codes = o.codes.get();
                w.absmax2 = o.absmax2.get();
                w.absmax_map = o.map.get();
                w.absmax_offset = dq.offset;
              } else {
                w.absmax = o.absmax.get();
              }
              w.out = out;
              w.in = in;
              FewRowsAddends add;
              if (addends) add = {o.bias.get(), o.t.get(), o.b.get(), rank, 0.7f};
              be->nf4_matmul_nt(o.x.get(), rows, w, rt, add, o.y.get());
              std::vector<float> y = o.y.download();
              y.resize(static_cast<size_t>(rows * out));
              return y;
            };
            const std::vector<float> want = product(cpu.get(), oc);
            // the CPU's is the composition it stands for, step by step
            std::vector<float> absmax = q.absmax, w(static_cast<size_t>(n)), composed(static_cast<size_t>(rows * out));
            if (double_quantized) absmax = nf4::double_dequantize(dq.codes.data(), static_cast<int64_t>(dq.codes.size()),
                                                                   dq.state2_absmax.data(), nf4::dynamic_map_signed().data(), dq.offset, 256);
            cpu->nf4_dequantize(q.packed.data(), absmax.data(), n, 64, rt, w.data());
            cpu->gemm(false, true, rows, out, in, 1.0f, x.data(), w.data(), 0.0f, composed.data());
            if (addends) {
              cpu->add_bias_rows(composed.data(), bias.data(), rows, out);
              cpu->gemm(false, true, rows, out, rank, 0.7f, t.data(), b.data(), 1.0f, composed.data());
            }
            EXPECT_TRUE(want == composed, "the CPU's nf4_matmul_nt is its composition bit for bit, ", out, "x", in);
            // to the rounding of a sum in another order: relative to the sum of the terms' magnitudes (a row's sum
            // of hundreds of terms may cancel to far less than they are)
            std::vector<float> magnitude(want.size());
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t o = 0; o < out; ++o) {
                double m = 0.0;
                for (int64_t k = 0; k < in; ++k) m += std::fabs(x[r * in + k] * w[o * in + k]);
                if (addends) {
                  m += std::fabs(bias[o]);
                  for (int64_t j = 0; j < rank; ++j) m += 0.7 * std::fabs(t[r * rank + j] * b[o * rank + j]);
                }
                magnitude[static_cast<size_t>(r * out + o)] = static_cast<float>(m);
              }
            const std::vector<float> got = product(dev.get(), od);
            for (size_t i = 0; i < want.size(); ++i)
              if (!(std::fabs(got[i] - want[i]) <= 1e-6 * magnitude[i]))
                qtest::fail_test(__FILE__, __LINE__, "nf4_matmul_nt ", out, "x", in, ": element ", i, " is ", got[i],
                                 ", the CPU's ", want[i], " (terms of total magnitude ", magnitude[i], ")");
          }
    // LoRA's down projection: x [rows, in] · A^T for A [rank, in]
    const std::vector<float> a = random_floats(static_cast<size_t>(rank * in), 56, 0.05f);  // as LoRA's A
    DeviceArray<float> ad = on_device(dev.get(), a), xd = on_device(dev.get(), x);
    DeviceArray<float> td(dev.get(), 4 * rank, MemCategory::Workspace);
    for (int64_t rows = 1; rows <= 4; ++rows) {
      std::vector<float> want(static_cast<size_t>(rows * rank));
      cpu->gemm_few_rows_nt(x.data(), rows, a.data(), rank, in, want.data());
      std::vector<float> composed(want.size());
      cpu->gemm(false, true, rows, rank, in, 1.0f, x.data(), a.data(), 0.0f, composed.data());
      EXPECT_TRUE(want == composed, "the CPU's gemm_few_rows_nt is its gemm bit for bit");
      dev->gemm_few_rows_nt(xd.get(), rows, ad.get(), rank, in, td.get());
      std::vector<float> got = td.download();
      got.resize(want.size());
      expect_close("gemm_few_rows_nt", want, got, 1e-5);
    }
  }
}

inline void nf4_dequantize_and_dropout_bit_for_bit(const MakeBackend& make) {
  auto cpu = make_cpu_backend();
  auto dev = make();
  // NF4 dequantize of bitsandbytes' layout in blocks of 64, every rounding: bit for bit. 1000 and 999 values, into
  // rows of 50 (the GPU's value by value path); 37 rows of 96 (as a weight's rows: its wide path, 32 values a
  // thread), contiguous and 104 apart. Into 16 bits with the block constants in fp32 or double-quantized (restored in
  // the same pass).
  for (const auto& shape : {std::tuple<int64_t, int64_t, int64_t>{1000, 50, 56}, {999, 50, 56}, {37 * 96, 96, 104}}) {
    // not a structured binding: the lambdas below capture them
    const int64_t n = std::get<0>(shape), row_len = std::get<1>(shape), stride = std::get<2>(shape);
    const std::vector<float> x = random_floats(static_cast<size_t>(n), 31);
    const nf4::Blockwise4bit q = nf4::quantize(x.data(), n, 64);
    const nf4::DoubleQuantized dq = nf4::double_quantize(q.absmax, 256);
    const std::vector<float>& map = nf4::dynamic_map_signed();
    const std::vector<float> restored = nf4::double_dequantize(dq.codes.data(), static_cast<int64_t>(dq.codes.size()),
                                                               dq.state2_absmax.data(), map.data(), dq.offset, 256);
    DeviceArray<uint8_t> packed = on_device(dev.get(), q.packed), codes = on_device(dev.get(), dq.codes);
    DeviceArray<float> absmax = on_device(dev.get(), q.absmax), absmax2 = on_device(dev.get(), dq.state2_absmax);
    DeviceArray<float> map_dev = on_device(dev.get(), map);
    // the weight as n values in one row (row_len says how they are written), on the CPU or the device
    auto weight = [&](bool on_dev, bool double_quantized) {
      Nf4Weight w;
      w.packed = on_dev ? packed.get() : q.packed.data();
      if (double_quantized) {
        w.absmax_codes = on_dev ? codes.get() : dq.codes.data();
        w.absmax2 = on_dev ? absmax2.get() : dq.state2_absmax.data();
        w.absmax_map = on_dev ? map_dev.get() : map.data();
        w.absmax_offset = dq.offset;
      } else {
        w.absmax = on_dev ? absmax.get() : q.absmax.data();
      }
      w.out = 1;
      w.in = n;
      return w;
    };
    for (FloatFormat rt : {FloatFormat::F32, FloatFormat::BF16, FloatFormat::F16}) {
      std::vector<float> want(static_cast<size_t>(n));
      cpu->nf4_dequantize(q.packed.data(), q.absmax.data(), n, 64, rt, want.data());
      DeviceArray<float> got(dev.get(), n, MemCategory::Workspace);
      dev->nf4_dequantize(packed.get(), absmax.get(), n, 64, rt, got.get());
      EXPECT_TRUE(std::memcmp(got.download().data(), want.data(), want.size() * sizeof(float)) == 0, "dequantize");
      // straight into 16 bits: the fp32 values rounded on, on both
      for (bool double_quantized : {false, true}) {
        if (double_quantized) cpu->nf4_dequantize(q.packed.data(), restored.data(), n, 64, rt, want.data());
        for (FloatFormat out : {FloatFormat::BF16, FloatFormat::F16}) {
          std::vector<uint16_t> want16(static_cast<size_t>(n)), cpu16(static_cast<size_t>(n));
          for (size_t i = 0; i < want.size(); ++i) want16[i] = out == FloatFormat::BF16 ? f32_to_bf16(want[i]) : f32_to_f16(want[i]);
          cpu->nf4_dequantize_16(weight(false, double_quantized), rt, out, n, n, cpu16.data());
          DeviceArray<uint16_t> got16(dev.get(), n, MemCategory::Workspace);
          dev->nf4_dequantize_16(weight(true, double_quantized), rt, out, n, n, got16.get());
          EXPECT_TRUE(cpu16 == want16, "CPU dequantize to 16 bits");
          EXPECT_TRUE(got16.download() == want16, "dequantize to 16 bits");
          // into rows of row_len values stride apart: the gaps untouched
          const int64_t rows = (n + row_len - 1) / row_len;
          std::vector<uint16_t> strided_want(static_cast<size_t>(rows * stride), 0xffff), strided_cpu = strided_want;
          for (int64_t i = 0; i < n; ++i) strided_want[static_cast<size_t>(i / row_len * stride + i % row_len)] = want16[static_cast<size_t>(i)];
          cpu->nf4_dequantize_16(weight(false, double_quantized), rt, out, row_len, stride, strided_cpu.data());
          DeviceArray<uint16_t> strided_got(dev.get(), rows * stride, MemCategory::Workspace);
          strided_got.upload(std::vector<uint16_t>(static_cast<size_t>(rows * stride), 0xffff));
          dev->nf4_dequantize_16(weight(true, double_quantized), rt, out, row_len, stride, strided_got.get());
          EXPECT_TRUE(strided_cpu == strided_want, "CPU dequantize into wider rows");
          EXPECT_TRUE(strided_got.download() == strided_want, "dequantize into wider rows");
        }
      }
    }
  }
  // double quantization's block constants (1000 of them: the last group of 256 is partial), bit for bit
  {
    std::vector<float> constants = random_floats(1000, 33, 0.01f);
    for (float& v : constants) v = std::fabs(v) + 0.03f;
    const nf4::DoubleQuantized dq = nf4::double_quantize(constants, 256);
    const std::vector<float>& map = nf4::dynamic_map_signed();
    const std::vector<float> want = nf4::double_dequantize(dq.codes.data(), 1000, dq.state2_absmax.data(), map.data(), dq.offset, 256);
    std::vector<float> on_cpu(1000);
    cpu->absmax_dequantize(dq.codes.data(), 1000, dq.state2_absmax.data(), map.data(), dq.offset, 256, on_cpu.data());
    DeviceArray<uint8_t> codes(dev.get(), 1000, MemCategory::Workspace);
    DeviceArray<float> state2(dev.get(), static_cast<int64_t>(dq.state2_absmax.size()), MemCategory::Workspace);
    DeviceArray<float> code2(dev.get(), 256, MemCategory::Workspace), got(dev.get(), 1000, MemCategory::Workspace);
    codes.upload(dq.codes);
    state2.upload(dq.state2_absmax);
    code2.upload(map);
    dev->absmax_dequantize(codes.get(), 1000, state2.get(), code2.get(), dq.offset, 256, got.get());
    EXPECT_TRUE(std::memcmp(on_cpu.data(), want.data(), want.size() * sizeof(float)) == 0, "CPU absmax_dequantize");
    EXPECT_TRUE(std::memcmp(got.download().data(), want.data(), want.size() * sizeof(float)) == 0, "absmax_dequantize");
  }
  // dropout: offsets that start inside a Philox block, counts that end inside one
  for (uint64_t offset : {uint64_t{0}, uint64_t{3}, uint64_t{1000001}}) {
    const int64_t n = 517;
    const std::vector<float> x = random_floats(n, 41);
    std::vector<float> want(n);
    cpu->dropout(x.data(), n, 0.3f, 1234, 7, offset, want.data());
    DeviceArray<float> xd(dev.get(), n, MemCategory::Workspace), out(dev.get(), n, MemCategory::Workspace);
    xd.upload(x);
    dev->dropout(xd.get(), n, 0.3f, 1234, 7, offset, out.get());
    EXPECT_TRUE(std::memcmp(out.download().data(), want.data(), want.size() * sizeof(float)) == 0, "dropout at offset ", offset);
    // in place, as LoRA's backward applies it to its own buffer
    std::vector<float> in_place = x;
    cpu->dropout(in_place.data(), n, 0.3f, 1234, 7, offset, in_place.data());
    dev->dropout(xd.get(), n, 0.3f, 1234, 7, offset, xd.get());
    EXPECT_TRUE(std::memcmp(in_place.data(), want.data(), want.size() * sizeof(float)) == 0, "CPU dropout in place");
    EXPECT_TRUE(std::memcmp(xd.download().data(), want.data(), want.size() * sizeof(float)) == 0, "dropout in place");
  }
}

// A reference model with its PEFT adapter, loaded on the CPU and on the backend under test (the models and adapters
// go before their backends).
struct ReferenceOnBoth {
  std::unique_ptr<Backend> cpu, dev;
  std::unique_ptr<LlamaModel> model_cpu, model_dev;
  std::unique_ptr<LoraAdapter> adapter_cpu, adapter_dev;
  ReferenceOnBoth(const MakeBackend& make, const std::string& name, bool quantize_nf4 = false)
      : cpu(make_cpu_backend()), dev(make()) {
    LoadOptions lo;
    lo.quantize_nf4 = quantize_nf4;
    model_cpu = LlamaModel::load(cpu.get(), qtest::reference(name), lo);
    model_dev = LlamaModel::load(dev.get(), qtest::reference(name), lo);
    adapter_cpu = LoraAdapter::load_peft(cpu.get(), model_cpu->config(), qtest::reference(name + "-adapter"));
    adapter_dev = LoraAdapter::load_peft(dev.get(), model_dev->config(), qtest::reference(name + "-adapter"));
  }
};

// How one LoRA gradient on the backend under test (got) compares with the CPU's (want), in double.
struct GradientPair {
  double dot = 0, want2 = 0, got2 = 0, diff2 = 0;
};

// Each LoRA gradient of the two adapters, compared.
inline std::vector<GradientPair> compare_gradients(LoraAdapter& want, LoraAdapter& got) {
  auto gw = want.parameters_and_grads();
  auto gg = got.parameters_and_grads();
  std::vector<GradientPair> pairs;
  for (size_t i = 0; i < gw.size(); ++i) {
    const std::vector<float> w = gw[i].second->download(), g = gg[i].second->download();
    GradientPair p;
    for (size_t j = 0; j < w.size(); ++j) {
      const double a = w[j], b = g[j];
      p.dot += a * b;
      p.want2 += a * a;
      p.got2 += b * b;
      p.diff2 += (b - a) * (b - a);
    }
    pairs.push_back(p);
  }
  return pairs;
}

const char* const kReferenceModels[] = {"llama-shared", "llama3-shared", "qwen2-shared"};

// Gate's and up's outputs held in 16 bits (begin_half_activation), as torch's autocast holds them: the fused GEMM
// writes its fp32 sums rounded into the output's own bytes (rows with room for LoRA's columns), SwiGLU reads the
// rounded values, and its backward, reading its output gradient held so too (down's fused input-gradient GEMM
// writes it), writes the rounded gradients in their place.
inline void half_activations(const MakeBackend& make, bool f16) {
  const int64_t M = 7, N = 16, K = 24, R = 4;
  auto backend = make();
  Backend* be = backend.get();
  const int64_t columns = be->lora_fused_columns(R), ld = K + columns, out_ld = N + columns;
  const auto to16 = [f16](float v) { return f16 ? f32_to_f16(v) : f32_to_bf16(v); };
  const auto from16 = [f16](uint16_t b) { return f16 ? f16_to_f32(b) : bf16_to_f32(b); };
  // 16-bit values at most one unit in the last place apart (the GPU's GEMM may sum in another order for a 16-bit
  // output, its exp differ from the host's in the last fp32 bit)
  const auto near = [](uint16_t a, uint16_t b) { return std::abs(int{a} - int{b}) <= 1; };
  const auto rows_of = [](const DeviceArray<float>& y) {  // y's bytes as 16-bit values
    const std::vector<float> bytes = y.download();
    std::vector<uint16_t> out(bytes.size() * 2);
    std::memcpy(out.data(), bytes.data(), bytes.size() * sizeof(float));
    return out;
  };
  const std::vector<float> xs = parity::random_floats(M * K, 61), ts = parity::random_floats(M * R, 62),
                           bs = parity::random_floats(N * R, 63);
  DeviceArray<float> x(be, M * K, MemCategory::Activations), t(be, M * R, MemCategory::Activations),
      b(be, N * R, MemCategory::Activations), dout(be, M * N, MemCategory::Activations);
  x.upload(xs);
  t.upload(ts);
  b.upload(bs);
  DeviceArray<uint16_t> w(be, N * ld, MemCategory::Workspace);
  // gate's and up's products in fp32, then held
  std::vector<float> fp32[2];
  DeviceArray<float> held[2] = {DeviceArray<float>(be, M * N, MemCategory::Activations),
                                DeviceArray<float>(be, M * N, MemCategory::Activations)};
  std::optional<SharedGemmInput> scopes[2];
  for (int i = 0; i < 2; ++i) {
    std::vector<uint16_t> w_rows(static_cast<size_t>(N * ld), 0);
    const std::vector<float> ws = parity::random_floats(N * K, 65 + i);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        w_rows[static_cast<size_t>(n * ld + k)] = to16(ws[static_cast<size_t>(n * K + k)]);
    DeviceArray<float> y(be, M * N, MemCategory::Activations);
    w.upload(w_rows);
    be->gemm_with_lora_up(M, N, K, x.get(), w.get(), R, t.get(), b.get(), 0.5f, y.get());
    fp32[i] = y.download();
    scopes[i].emplace(be, held[i].get(), M, N, columns, SharedGemmInput::kHalfActivation);
    w.upload(w_rows);
    be->gemm_with_lora_up(M, N, K, x.get(), w.get(), R, t.get(), b.get(), 0.5f, held[i].get());
    const std::vector<uint16_t> rows = rows_of(held[i]);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t n = 0; n < N; ++n)
        EXPECT_TRUE(near(rows[static_cast<size_t>(r * out_ld + n)], to16(fp32[i][static_cast<size_t>(r * N + n)])),
                    "the GEMM's output held in 16 bits");
  }
  // SwiGLU's output gradient held in 16 bits from the fused GEMM that writes it (down's dx = [dy | dt] [W ; A])
  std::vector<float> douts;
  std::optional<SharedGemmInput> dout_scope;
  {
    const int64_t Kd = 24;  // down's output width
    const std::vector<float> dys = parity::random_floats(M * Kd, 70), dts = parity::random_floats(M * R, 71),
                             as = parity::random_floats(R * N, 72), wds = parity::random_floats(Kd * N, 73);
    std::vector<uint16_t> wd_rows(static_cast<size_t>((Kd + columns) * N), 0);
    for (size_t i = 0; i < wds.size(); ++i) wd_rows[i] = to16(wds[i]);
    DeviceArray<float> dy(be, M * Kd, MemCategory::Activations), dt(be, M * R, MemCategory::Activations),
        a(be, R * N, MemCategory::Activations), dout32(be, M * N, MemCategory::Activations);
    DeviceArray<uint16_t> wd(be, (Kd + columns) * N, MemCategory::Workspace);
    dy.upload(dys);
    dt.upload(dts);
    a.upload(as);
    wd.upload(wd_rows);
    be->gemm_dx_with_lora(M, N, Kd, dy.get(), wd.get(), N, R, dt.get(), a.get(), 0.0f, dout32.get());
    douts = dout32.download();
    dout_scope.emplace(be, dout.get(), M, N, 0, SharedGemmInput::kHalfActivation);
    wd.upload(wd_rows);
    be->gemm_dx_with_lora(M, N, Kd, dy.get(), wd.get(), N, R, dt.get(), a.get(), 0.0f, dout.get());
    const std::vector<uint16_t> rows = rows_of(dout);
    for (int64_t i = 0; i < M * N; ++i)
      EXPECT_TRUE(near(rows[static_cast<size_t>(i)], to16(douts[static_cast<size_t>(i)])),
                  "the input gradient's GEMM output held in 16 bits");
  }
  // SwiGLU of the held values, and its backward in their place
  DeviceArray<float> m(be, M * N, MemCategory::Activations);
  be->swiglu_forward(held[0].get(), held[1].get(), M * N, m.get());
  const std::vector<float> ms = m.download();
  std::vector<uint16_t> want_dg(static_cast<size_t>(M * N)), want_du(static_cast<size_t>(M * N));
  for (int64_t i = 0; i < M * N; ++i) {
    const float g = from16(to16(fp32[0][static_cast<size_t>(i)])), u = from16(to16(fp32[1][static_cast<size_t>(i)]));
    const float s = 1.0f / (1.0f + std::exp(-g)), d = from16(to16(douts[static_cast<size_t>(i)]));
    EXPECT_TRUE(std::fabs(ms[static_cast<size_t>(i)] - g * s * u) <= 1e-5f * std::max(1.0f, std::fabs(g * s * u)),
                "SwiGLU reads the rounded values");
    want_du[static_cast<size_t>(i)] = to16(d * g * s);
    want_dg[static_cast<size_t>(i)] = to16(d * u * s * (1.0f + g * (1.0f - s)));
  }
  be->swiglu_backward(dout.get(), held[0].get(), held[1].get(), M * N, held[0].get(), held[1].get());
  const std::vector<uint16_t> dg_rows = rows_of(held[0]), du_rows = rows_of(held[1]);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = 0; n < N; ++n) {
      const size_t at = static_cast<size_t>(r * out_ld + n), i = static_cast<size_t>(r * N + n);
      EXPECT_TRUE(near(dg_rows[at], want_dg[i]) && near(du_rows[at], want_du[i]), "SwiGLU's gradients in place");
    }
}

inline void whole_model(const MakeBackend& make, const ModelTolerance& tol) {
  // Loss, every log-prob and every LoRA gradient of the reference models (Llama with its adapter, Llama 3 with rope
  // scaling, Qwen2 with q/k/v biases and GQA), batch 2, with checkpointing.
  const std::vector<int32_t>& ids = qtest::reference_ids();
  for (const char* name : kReferenceModels) {
    ReferenceOnBoth r(make, name);
    RunOptions opt;
    opt.compute_grads = true;
    opt.want_logprobs = true;
    const RunResult rc = r.model_cpu->run(ids.data(), ids.data(), 2, 6, r.adapter_cpu.get(), opt);
    const RunResult re = r.model_dev->run(ids.data(), ids.data(), 2, 6, r.adapter_dev.get(), opt);
    EXPECT_NEAR(re.loss_sum / re.labelled, rc.loss_sum / rc.labelled, tol.loss);
    EXPECT_EQ(re.labelled, rc.labelled);
    for (size_t i = 0; i < rc.logprobs.size(); ++i) EXPECT_NEAR(re.logprobs[i], rc.logprobs[i], tol.logprob);
    const std::vector<GradientPair> grads = compare_gradients(*r.adapter_cpu, *r.adapter_dev);
    for (size_t i = 0; i < grads.size(); ++i) {
      const GradientPair& g = grads[i];
      EXPECT_TRUE(std::sqrt(g.diff2) <= tol.gradient * std::sqrt(g.want2) + 1e-9, name, " gradient ", i,
                  ": relative difference ", std::sqrt(g.diff2 / std::max(g.want2, 1e-30)));
    }
  }
}

inline void training_paging_and_generation(const MakeBackend& make, const ModelTolerance& tol) {
  // NF4 weights, a new adapter with dropout, 4 AdamW steps; the emulated backend under a budget that pages the
  // optimizer. The losses of every step and the final parameters agree with the CPU's; then greedy decoding with the
  // KV cache gives the same logits.
  const std::vector<int32_t>& ids = qtest::reference_ids();
  auto cpu = make_cpu_backend();
  auto dev = make();
  LoadOptions lo;
  lo.quantize_nf4 = true;
  auto mc = LlamaModel::load(cpu.get(), qtest::reference("llama-shared"), lo);
  auto me = LlamaModel::load(dev.get(), qtest::reference("llama-shared"), lo);
  LoraConfig lc;
  lc.rank = 4;
  lc.dropout = 0.1;
  auto ac = LoraAdapter::create(cpu.get(), mc->config(), lc, 3);
  auto ae = LoraAdapter::create(dev.get(), me->config(), lc, 3);
  AdamW oc(cpu.get(), ac.get());
  AdamW oe(dev.get(), ae.get());
  constexpr size_t kOptimizer = static_cast<size_t>(MemCategory::Optimizer);
  RunOptions ro;
  ro.compute_grads = true;
  ro.training = true;
  ro.seed = 9;
  for (uint32_t step = 1; step <= 4; ++step) {
    ro.step = step;
    ac->zero_grad();
    ae->zero_grad();
    const RunResult rc = mc->run(ids.data(), ids.data(), 2, 6, ac.get(), ro);
    const RunResult re = me->run(ids.data(), ids.data(), 2, 6, ae.get(), ro);
    EXPECT_NEAR(re.loss_sum / re.labelled, rc.loss_sum / rc.labelled, tol.loss);
    const int64_t run_peak = dev->memory().total_peak - dev->memory().current[kOptimizer];
    AdamWOptions ao;
    ao.lr = 1e-2;
    ao.max_grad_norm = 1.0;
    const StepReport sc = oc.step(ao), se = oe.step(ao);
    EXPECT_NEAR(se.grad_norm, sc.grad_norm, tol.gradient * sc.grad_norm);
    // after the first step, a budget with room for the run and half the optimizer state
    if (step == 1) dev->set_memory_budget(run_peak + dev->memory().current[kOptimizer] / 2);
  }
  EXPECT_TRUE(!dev->take_page_moves().empty(), "the budget pages the optimizer");
  auto pc = ac->parameters_and_grads();
  auto pe = ae->parameters_and_grads();
  for (size_t i = 0; i < pc.size(); ++i) expect_close("trained parameter", pc[i].first->download(), pe[i].first->download(), tol.gradient);
  // Generation from the same adapter on both (Adam's steps magnify the runs' rounding differences into the
  // parameters, and those would be all the logits then show).
  for (size_t i = 0; i < pc.size(); ++i) pe[i].first->upload(pc[i].first->download());

  dev->set_memory_budget(0);  // a prefill of 5 rows dequantizes whole weights into workspace: no room in this budget
  KvCache cache_c, cache_e;
  std::vector<float> lc_rows = mc->decode(ids.data(), 5, cache_c, ac.get());
  std::vector<float> le_rows = me->decode(ids.data(), 5, cache_e, ae.get());
  expect_close("prefill logits", lc_rows, le_rows, tol.logprob);
  for (int t = 5; t < 9; ++t) {
    lc_rows = mc->decode(ids.data() + t, 1, cache_c, ac.get());
    le_rows = me->decode(ids.data() + t, 1, cache_e, ae.get());
    expect_close("decode logits", lc_rows, le_rows, tol.logprob);
  }
}

// bf16 or fp16 compute (GEMM inputs rounded to the half type, fp32 accumulation) against the CPU's fp32: issue 6's
// bounds, the loss within 1% and each LoRA gradient's cosine similarity with the CPU's >= 0.999, on the reference
// fixtures; with fp16's loss scaling the gradients are loss_scale times the CPU's.
// quantize_nf4: both models quantized on load (the GPU then dequantizes into 16 bits, with LoRA's up projection in
// the base GEMM).
inline void whole_model_half(const MakeBackend& make_half, double loss_scale = 1.0, bool quantize_nf4 = false) {
  const std::vector<int32_t>& ids = qtest::reference_ids();
  for (const char* name : kReferenceModels) {
    ReferenceOnBoth r(make_half, name, quantize_nf4);
    RunOptions opt;
    opt.compute_grads = true;
    const RunResult rc = r.model_cpu->run(ids.data(), ids.data(), 2, 6, r.adapter_cpu.get(), opt);
    RunOptions scaled = opt;
    scaled.loss_scale = loss_scale;
    const RunResult rd = r.model_dev->run(ids.data(), ids.data(), 2, 6, r.adapter_dev.get(), scaled);
    EXPECT_TRUE(std::fabs(rd.loss_sum - rc.loss_sum) <= 0.01 * std::fabs(rc.loss_sum), name, ": half-precision loss ",
                rd.loss_sum, ", fp32 ", rc.loss_sum);
    EXPECT_TRUE(rd.loss_sum != rc.loss_sum, name, ": half-precision compute gave the fp32 loss exactly (not rounding?)");
    const std::vector<GradientPair> grads = compare_gradients(*r.adapter_cpu, *r.adapter_dev);
    for (size_t i = 0; i < grads.size(); ++i) {
      const GradientPair& g = grads[i];
      if (g.want2 == 0 && g.got2 == 0) continue;  // a gradient that is zero on both sides agrees
      const double cosine = g.dot / std::sqrt(g.want2 * g.got2);
      EXPECT_TRUE(cosine >= 0.999, name, " gradient ", i, ": cosine similarity ", cosine);
      EXPECT_TRUE(std::fabs(std::sqrt(g.got2 / g.want2) / loss_scale - 1.0) <= 0.01, name, " gradient ", i, ": norm ",
                  std::sqrt(g.got2), " for ", loss_scale, " times ", std::sqrt(g.want2));
    }
  }
}

}  // namespace parity
