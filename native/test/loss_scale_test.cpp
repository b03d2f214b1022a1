// Loss scaling (fp16 compute's), on the CPU backend where its arithmetic is the same: gradients of a scaled loss
// give the same update once the optimizer divides the scale out, and gradients that overflow skip the update (when
// asked to) without touching the parameters or the optimizer's step count.
#include <cmath>
#include <vector>

#include "backend/backend.h"
#include "harness.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optimizer.h"

using namespace qlora;

namespace {

const std::vector<int32_t>& kIds = qtest::reference_ids();

struct Trained {
  std::vector<std::vector<float>> params;
  std::vector<StepReport> reports;
};

// Three AdamW steps of the reference model with loss_scale on the run and the optimizer.
Trained train(double loss_scale, bool skip_non_finite) {
  auto backend = make_cpu_backend();
  auto model = LlamaModel::load(backend.get(), qtest::reference("llama-shared"), {});
  LoraConfig lc;
  lc.rank = 4;
  auto adapter = LoraAdapter::create(backend.get(), model->config(), lc, 3);
  AdamW opt(backend.get(), adapter.get());
  Trained t;
  for (int step = 0; step < 3; ++step) {
    adapter->zero_grad();
    RunOptions ro;
    ro.compute_grads = true;
    ro.loss_scale = loss_scale;
    model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), ro);
    AdamWOptions ao;
    ao.lr = 1e-2;
    ao.max_grad_norm = 0.5;
    ao.loss_scale = loss_scale;
    ao.skip_non_finite = skip_non_finite;
    t.reports.push_back(opt.step(ao));
  }
  for (auto& [p, g] : adapter->parameters_and_grads()) t.params.push_back(p->download());
  return t;
}

}  // namespace

TEST(loss_scale_divided_out_gives_the_unscaled_update) {
  const Trained plain = train(1.0, false), scaled = train(1024.0, true);  // a power of two: exact in fp32
  for (size_t s = 0; s < 3; ++s) {
    EXPECT_NEAR(scaled.reports[s].grad_norm, plain.reports[s].grad_norm, 1e-6 * plain.reports[s].grad_norm);
    EXPECT_EQ(scaled.reports[s].clipped, plain.reports[s].clipped);
    EXPECT_TRUE(!scaled.reports[s].skipped);
  }
  for (size_t i = 0; i < plain.params.size(); ++i)
    for (size_t j = 0; j < plain.params[i].size(); ++j) EXPECT_NEAR(scaled.params[i][j], plain.params[i][j], 1e-6);
}

TEST(loss_scale_overflow_skips_the_update_or_fails_when_not_asked_to_skip) {
  // 1e40 times the loss's gradients overflows fp32 itself (the logits' gradient): every step is skipped and nothing moves
  const Trained overflow = train(1e40, true), untouched = train(1.0, false);
  for (const StepReport& r : overflow.reports) {
    EXPECT_TRUE(r.skipped);
    EXPECT_EQ(r.step, int64_t{0});
  }
  auto backend = make_cpu_backend();
  auto model = LlamaModel::load(backend.get(), qtest::reference("llama-shared"), {});
  LoraConfig lc;
  lc.rank = 4;
  auto adapter = LoraAdapter::create(backend.get(), model->config(), lc, 3);
  const auto fresh = adapter->parameters_and_grads();
  for (size_t i = 0; i < fresh.size(); ++i) EXPECT_TRUE(overflow.params[i] == fresh[i].first->download(), "parameter ", i, " moved");
  EXPECT_TRUE(untouched.params[0] != fresh[0].first->download(), "the unscaled run did train");
  AdamW opt(backend.get(), adapter.get());
  RunOptions ro;
  ro.compute_grads = true;
  ro.loss_scale = 1e40;
  model->run(kIds.data(), kIds.data(), 2, 6, adapter.get(), ro);
  AdamWOptions ao;
  ao.loss_scale = 1e40;
  EXPECT_THROWS_WITH(opt.step(ao), "not finite");
}
