// Whole-model checks on the reference Llama fixture: the gradient of the loss with respect to all LoRA parameters
// against finite differences (fp32 model, so along directions where the signal is large: the gradient itself and
// single large elements), identical gradients with and without checkpointing, and dropout that is reproducible.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <tuple>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "harness.h"
#include "io/safetensors.h"
#include "vector_widths.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optimizer.h"
#include "quant/nf4.h"

using namespace qlora;

namespace {

struct Snapshot {
  std::vector<std::vector<float>> values;
};

Snapshot snapshot(LoraAdapter& a, bool grads) {
  Snapshot s;
  for (auto& [p, g] : a.parameters_and_grads()) s.values.push_back((grads ? g : p)->download());
  return s;
}

void restore_with_step(LoraAdapter& a, const Snapshot& base, const Snapshot& dir, double t) {
  auto pg = a.parameters_and_grads();
  for (size_t i = 0; i < pg.size(); ++i) {
    std::vector<float> v = base.values[i];
    for (size_t j = 0; j < v.size(); ++j) v[j] += static_cast<float>(t * dir.values[i][j]);
    pg[i].first->upload(v);
  }
}

const std::vector<int32_t>& kIds = qtest::reference_ids();

double loss_of(LlamaModel& m, LoraAdapter& a, const RunOptions& base_opts) {
  RunOptions o = base_opts;
  o.compute_grads = false;
  const RunResult r = m.run(kIds.data(), kIds.data(), 2, 6, &a, o);
  return r.loss_sum / static_cast<double>(r.labelled);
}

}  // namespace

TEST(model_lora_gradient_matches_finite_differences) {
  auto backend = make_cpu_backend();
  auto model = LlamaModel::load(backend.get(), qtest::reference("llama-shared"), {});
  auto adapter = LoraAdapter::load_peft(backend.get(), model->config(), qtest::reference("llama-shared-adapter"));
  RunOptions opt;
  opt.compute_grads = true;
  model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), opt);
  const Snapshot params = snapshot(*adapter, false), grads = snapshot(*adapter, true);
  double norm2 = 0;
  for (const auto& g : grads.values)
    for (float x : g) norm2 += static_cast<double>(x) * x;
  const double norm = std::sqrt(norm2);
  EXPECT_TRUE(norm > 1e-4, "gradient norm ", norm);
  // Along the unit gradient direction the directional derivative equals |g|.
  Snapshot unit = grads;
  for (auto& g : unit.values)
    for (float& x : g) x = static_cast<float>(x / norm);
  const double t = 1e-2;
  restore_with_step(*adapter, params, unit, t);
  const double up = loss_of(*model, *adapter, opt);
  restore_with_step(*adapter, params, unit, -t);
  const double down = loss_of(*model, *adapter, opt);
  restore_with_step(*adapter, params, unit, 0);
  const double numeric = (up - down) / (2 * t);
  EXPECT_NEAR(numeric / norm, 1.0, 1e-2);
  // And along a fixed pseudo-random direction that mixes all tensors.
  Snapshot mix = grads;
  uint32_t state = 12345;
  double expected = 0;
  for (size_t i = 0; i < mix.values.size(); ++i)
    for (size_t j = 0; j < mix.values[i].size(); ++j) {
      state = state * 1664525u + 1013904223u;
      const float d = (static_cast<float>(state >> 8) / 16777216.0f - 0.5f) * 0.2f;
      mix.values[i][j] = d;
      expected += static_cast<double>(d) * grads.values[i][j];
    }
  restore_with_step(*adapter, params, mix, t);
  const double up2 = loss_of(*model, *adapter, opt);
  restore_with_step(*adapter, params, mix, -t);
  const double down2 = loss_of(*model, *adapter, opt);
  restore_with_step(*adapter, params, mix, 0);
  EXPECT_NEAR((up2 - down2) / (2 * t), expected, 2e-2 * std::fabs(expected) + 1e-5);
}

TEST(model_checkpointing_gives_identical_gradients) {
  auto backend = make_cpu_backend();
  auto model = LlamaModel::load(backend.get(), qtest::reference("llama-shared"), {});
  auto adapter = LoraAdapter::load_peft(backend.get(), model->config(), qtest::reference("llama-shared-adapter"));
  RunOptions opt;
  opt.compute_grads = true;
  opt.gradient_checkpointing = true;
  const RunResult with = model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), opt);
  const Snapshot g1 = snapshot(*adapter, true);
  const int64_t peak_with = backend->memory().peak[static_cast<size_t>(MemCategory::Activations)];
  adapter->zero_grad();
  backend->reset_peak_memory();
  opt.gradient_checkpointing = false;
  const RunResult without = model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), opt);
  const Snapshot g2 = snapshot(*adapter, true);
  const int64_t peak_without = backend->memory().peak[static_cast<size_t>(MemCategory::Activations)];
  EXPECT_EQ(with.loss_sum, without.loss_sum);
  for (size_t i = 0; i < g1.values.size(); ++i)
    for (size_t j = 0; j < g1.values[i].size(); ++j) EXPECT_EQ(g1.values[i][j], g2.values[i][j]);
  EXPECT_TRUE(peak_with < peak_without, "checkpointing should lower activation memory: ", peak_with, " vs ",
              peak_without);
}

TEST(model_dropout_is_reproducible_and_its_gradient_is_exact) {
  auto backend = make_cpu_backend();
  auto model = LlamaModel::load(backend.get(), qtest::reference("llama-shared"), {});
  LoraConfig lc;
  lc.dropout = 0.3;
  auto adapter = LoraAdapter::create(backend.get(), model->config(), lc, 7);
  // B starts at zero; give it values so that every path carries gradient.
  for (auto& [p, g] : adapter->parameters_and_grads()) {
    (void)g;
    std::vector<float> v = p->download();
    for (size_t j = 0; j < v.size(); ++j) v[j] += 0.01f * std::sin(static_cast<float>(j));
    p->upload(v);
  }
  RunOptions opt;
  opt.training = true;
  opt.seed = 42;
  opt.step = 3;
  opt.compute_grads = true;
  const RunResult a = model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), opt);
  const RunResult b = model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), opt);
  EXPECT_EQ(a.loss_sum, b.loss_sum);
  adapter->zero_grad();
  model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), opt);
  const Snapshot params = snapshot(*adapter, false), grads = snapshot(*adapter, true);
  double norm2 = 0;
  for (const auto& g : grads.values)
    for (float x : g) norm2 += static_cast<double>(x) * x;
  Snapshot unit = grads;
  for (auto& g : unit.values)
    for (float& x : g) x = static_cast<float>(x / std::sqrt(norm2));
  restore_with_step(*adapter, params, unit, 1e-2);
  const double up = loss_of(*model, *adapter, opt);
  restore_with_step(*adapter, params, unit, -1e-2);
  const double down = loss_of(*model, *adapter, opt);
  EXPECT_NEAR((up - down) / 2e-2 / std::sqrt(norm2), 1.0, 1e-2);
  // A different step draws a different mask.
  restore_with_step(*adapter, params, unit, 0);
  RunOptions other = opt;
  other.step = 4;
  EXPECT_TRUE(loss_of(*model, *adapter, other) != loss_of(*model, *adapter, opt));
}

TEST(model_adamw_lowers_the_loss_on_nf4_weights) {
  auto backend = make_cpu_backend();
  LoadOptions lo;
  lo.quantize_nf4 = true;
  auto model = LlamaModel::load(backend.get(), qtest::reference("llama-shared"), lo);
  LoraConfig lc;
  lc.rank = 4;
  auto adapter = LoraAdapter::create(backend.get(), model->config(), lc, 1);
  AdamW opt(backend.get(), adapter.get());
  RunOptions ro;
  ro.compute_grads = true;
  const double first = loss_of(*model, *adapter, ro);
  for (int step = 0; step < 8; ++step) {
    adapter->zero_grad();
    model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), ro);
    AdamWOptions ao;
    ao.lr = 1e-2;
    ao.max_grad_norm = 1.0;
    opt.step(ao);
  }
  const double last = loss_of(*model, *adapter, ro);
  EXPECT_TRUE(last < first - 0.1, "loss went from ", first, " to ", last);
  EXPECT_TRUE(backend->memory().current[static_cast<size_t>(MemCategory::Optimizer)] ==
                  2 * 4 * static_cast<int64_t>(adapter->num_parameters()),
              "optimizer state is two fp32 values per parameter");
}

TEST(model_decode_with_kv_cache_matches_full_forward) {
  // Prefill of a prompt, then one token at a time: every position's logits equal the full forward pass's (same
  // kernels, same order), with the adapter, at half its scale, and with scale 0 equal to no adapter at all.
  auto backend = make_cpu_backend();
  auto model = LlamaModel::load(backend.get(), qtest::reference("llama-shared"), {});
  auto adapter = LoraAdapter::load_peft(backend.get(), model->config(), qtest::reference("llama-shared-adapter"));
  const int64_t V = model->config().vocab_size, T = static_cast<int64_t>(kIds.size()), prompt = 5;
  for (double scale : {1.0, 0.5, 0.0}) {
    RunOptions opt;
    opt.want_log_softmax = true;
    opt.lora_scale = scale;
    const RunResult full = model->run(kIds.data(), kIds.data(), 1, T, adapter.get(), opt);
    RunResult base;
    if (scale == 0.0) base = model->run(kIds.data(), kIds.data(), 1, T, nullptr, opt);
    KvCache cache;
    cache.lora_scale = scale;
    std::vector<float> rows = model->decode(kIds.data(), prompt, cache, adapter.get(), true);
    for (int64_t t = prompt; t < T; ++t) {
      const std::vector<float> one = model->decode(kIds.data() + t, 1, cache, adapter.get());
      rows.insert(rows.end(), one.begin(), one.end());
    }
    EXPECT_EQ(cache.length, T);
    for (int64_t t = 0; t < T; ++t) {
      // compare as log-softmax rows (the full pass reports those)
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(rows[t * V + j]));
      for (int64_t j = 0; j < V; ++j) sum += std::exp(rows[t * V + j] - mx);
      for (int64_t j = 0; j < V; ++j) {
        const double ls = rows[t * V + j] - mx - std::log(sum);
        EXPECT_NEAR(ls, full.log_softmax[t * V + j], 1e-4);
        if (scale == 0.0) EXPECT_EQ(full.log_softmax[t * V + j], base.log_softmax[t * V + j]);
      }
    }
  }
  // Truncating the cache and decoding again reproduces the same logits.
  KvCache cache;
  const std::vector<float> first = model->decode(kIds.data(), 8, cache, adapter.get());
  cache.length = 4;
  const std::vector<float> again = model->decode(kIds.data() + 4, 4, cache, adapter.get());
  for (int64_t j = 0; j < V; ++j) EXPECT_NEAR(first[j], again[j], 1e-5);
}

TEST(model_nf4_dequantize_rounds_each_value_as_rounding_after_would) {
  // The backend rounds a block's 16 values once and looks them up: for any length (an odd one: a last half byte),
  // block size and rounding, each value is nf4::dequantize's rounded, with an infinite and a NaN block constant.
  auto backend = make_cpu_backend();
  for (const int blocksize : {2, 64})
    for (const FloatFormat rt : {FloatFormat::BF16, FloatFormat::F16}) {
      const int64_t n = 1001;
      std::vector<uint8_t> packed(static_cast<size_t>((n + 1) / 2));
      std::vector<float> absmax(static_cast<size_t>((n + blocksize - 1) / blocksize)), plain(n), got(n);
      for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>((i * 91 + 7) & 0xff);
      for (size_t i = 0; i < absmax.size(); ++i) absmax[i] = 0.37f * static_cast<float>(i + 1) + 0.013f;
      absmax[1] = INFINITY;
      absmax[2] = std::nanf("");
      nf4::dequantize(packed.data(), absmax.data(), n, blocksize, plain.data());
      backend->nf4_dequantize(packed.data(), absmax.data(), n, blocksize, rt, got.data());
      for (int64_t i = 0; i < n; ++i) {
        const float want = rt == FloatFormat::BF16 ? round_to_bf16(plain[i]) : round_to_f16(plain[i]);
        EXPECT_TRUE(got[i] == want || (std::isnan(got[i]) && std::isnan(want)), "blocksize ", blocksize, " index ", i,
                    ": ", got[i], " vs ", want);
      }
    }
}

TEST(model_nf4_matmul_equals_dequantize_then_gemm_bit_for_bit) {
  // Awkward sizes: rows of 100, 99 (odd: a row starts inside a byte) and 301 weights (more than one chunk of 256),
  // so blocks of 64 straddle rows; 7, 37 and 19 outputs (partial tiles of 16); every rounding the quant state can ask
  // for. Both fast paths are checked against the plain sum in order, which is what they must equal bit for bit.
  auto backend = make_cpu_backend();
  // Rows of whole blocks (192, 640: more than a chunk of 256) take the vector fill; blocks of 32 and of 16 as well
  // (80: two groups of 32 weights, then a pair at a time), at both vector widths.
  qtest::at_both_vector_widths([&](bool narrow) {
    // The last cases have edge block constants, their products rounded as nf4_dequantize rounds them: 1, an infinite
    // and a NaN one (bitsandbytes' absmax of a weight that overflowed); 2, tiny ones (fp16 subnormal products); 3,
    // about fp16's largest value: 65504 to 65519 (products of the codes +-1 that round to +-65504), and 65520 (a tie
    // that goes to infinity) for row 0's three blocks and 65536 for row 1's; 4, 1 + 2^-11 and 1 + 3 * 2^-11, whose products
    // with the codes +-1 are ties at fp16's precision (nearest even: down, then up).
    for (const auto& [out, in, blocksize, edges] :
         {std::tuple<int64_t, int64_t, int64_t, int>{7, 100, 64, 0}, {37, 99, 64, 0}, {19, 301, 64, 0},
          {37, 192, 64, 0}, {19, 640, 64, 0}, {5, 96, 32, 0}, {21, 80, 16, 0}, {23, 192, 64, 1}, {23, 192, 64, 2},
          {23, 192, 64, 3}, {23, 192, 64, 4}}) {
      const int64_t n = out * in;
      std::vector<uint8_t> packed(static_cast<size_t>((n + 1) / 2));
      std::vector<float> absmax(static_cast<size_t>((n + blocksize - 1) / blocksize)), x(kNf4MatmulMaxRows * in);
      for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>((i * 37 + 11) & 0xff);
      for (size_t i = 0; i < absmax.size(); ++i) absmax[i] = 0.013f * static_cast<float>(i + 1) + 0.0071f;
      if (edges == 1) {
        absmax[4] = INFINITY;
        absmax[9] = std::nanf("");
      }
      for (size_t i = 0; i < absmax.size(); ++i) {
        if (edges == 2) absmax[i] = std::ldexp(1.0f + 0.37f * static_cast<float>(i % 7), -17 - static_cast<int>(i % 9));
        if (edges == 3) absmax[i] = i < 3 ? 65520.0f : i < 6 ? 65536.0f : 65504.0f + static_cast<float>(i % 16);
        if (edges == 4) absmax[i] = i % 2 ? 1.0f + std::ldexp(1.0f, -11) : 1.0f + 3.0f * std::ldexp(1.0f, -11);
      }
      // the same bits (a zero's sign included), or both NaN
      const auto same = [](float a, float b) {
        uint32_t ua, ub;
        std::memcpy(&ua, &a, 4);
        std::memcpy(&ub, &b, 4);
        return ua == ub || (std::isnan(a) && std::isnan(b));
      };
      for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * 1.7f;
      for (FloatFormat rt : {FloatFormat::F32, FloatFormat::BF16, FloatFormat::F16}) {
        std::vector<float> w(static_cast<size_t>(n));
        backend->nf4_dequantize(packed.data(), absmax.data(), n, blocksize, rt, w.data());
        for (int64_t rows = 0; rows <= kNf4MatmulMaxRows; ++rows) {  // none (nothing written) to the most
          std::vector<float> plain(rows * out), via_gemm(rows * out), fused(std::max<int64_t>(rows, 1) * out, 7.0f);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t o = 0; o < out; ++o) {
              float acc = 0.0f;
              for (int64_t k = 0; k < in; ++k) acc += x[r * in + k] * w[o * in + k];
              plain[r * out + o] = acc;
            }
          backend->gemm(false, true, rows, out, in, 1.0f, x.data(), w.data(), 0.0f, via_gemm.data());
          Nf4Weight wv;
          wv.packed = packed.data();
          wv.absmax = absmax.data();
          wv.blocksize = static_cast<int>(blocksize);
          wv.out = out;
          wv.in = in;
          backend->nf4_matmul_nt(x.data(), rows, wv, rt, FewRowsAddends{}, fused.data());
          if (rows == 0)
            for (const float v : fused) EXPECT_TRUE(v == 7.0f, "nf4_matmul_nt of no rows wrote ", v);
          for (int64_t i = 0; i < rows * out; ++i) {
            EXPECT_TRUE(same(via_gemm[i], plain[i]), "gemm, ", out, "x", in, " index ", i, ": ", via_gemm[i], " vs ",
                        plain[i]);
            EXPECT_TRUE(same(fused[i], plain[i]), "nf4_matmul_nt, narrow ", narrow, ", ", out, "x", in, " index ", i,
                        ": ", fused[i], " vs ", plain[i]);
          }
        }
      }
    }
  });
}

TEST(model_reads_dense_weights_in_place_on_the_cpu_and_copies_misaligned_ones) {
  // The reference model (bf16) as it is: its dense weights are read where the file's mapping holds them. The same
  // tensors after a one-byte tensor (odd offsets, which safetensors allows and 16-bit reads cannot take): copied out
  // of the mapping. The same log-probs of every next token, to the bit, and the same memory counted.
  const qtest::TempDir root("in-place");
  const std::filesystem::path misaligned = root.path / "misaligned";
  std::filesystem::create_directories(misaligned);
  std::filesystem::copy_file(std::filesystem::path(qtest::reference("llama-shared")) / "config.json", misaligned / "config.json");
  {
    const auto store = TensorStore::open_dir(qtest::reference("llama-shared"));
    SafetensorsWriter w;
    const uint8_t pad = 0;
    w.add("padding", DType::U8, {1}, &pad, 1);
    for (const std::string& t : store->names()) w.add(t, store->info(t).dtype, store->info(t).shape, store->data(t), store->info(t).nbytes);
    w.write((misaligned / "model.safetensors").string());
  }
  struct Outcome {
    bool in_place;
    std::vector<float> log_softmax;
    int64_t weights;
  };
  const auto run = [](const std::string& dir) {
    auto backend = make_cpu_backend();
    auto model = LlamaModel::load(backend.get(), dir, LoadOptions{});
    RunOptions o;
    o.want_log_softmax = true;
    RunResult r = model->run(kIds.data(), kIds.data(), 2, 6, nullptr, o);
    return Outcome{model->reads_weights_in_place(), std::move(r.log_softmax),
                   backend->memory().current[static_cast<size_t>(MemCategory::Weights)]};
  };
  const Outcome mapped = run(qtest::reference("llama-shared"));
  const Outcome copied = run(misaligned.string());
  EXPECT_TRUE(mapped.in_place, "the aligned bf16 weights were copied");
  EXPECT_TRUE(!copied.in_place, "weights at odd offsets were read in place");
  EXPECT_EQ(mapped.weights, copied.weights);
  EXPECT_TRUE(!mapped.log_softmax.empty() && mapped.log_softmax.size() == copied.log_softmax.size());
  EXPECT_TRUE(std::memcmp(mapped.log_softmax.data(), copied.log_softmax.data(), mapped.log_softmax.size() * sizeof(float)) == 0,
              "in place and copied weights gave different log-probs");
}
