// The memory budget and the paged optimizer, on the CPU backend (the logic is the backend's and the pager's, not
// the device's): pages move out when an allocation would go over the budget and back in for the update, every move
// is recorded, the numbers are the same as without a budget, and what cannot fit is an error that says so.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "harness.h"
#include "model/bench_shapes.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optimizer.h"
#include "model/optimizer_pages.h"
#include "util/error.h"

using namespace qlora;

namespace {

const std::vector<int32_t>& kIds = qtest::reference_ids();

struct Trained {
  std::vector<std::vector<float>> params;
  std::vector<PageMove> moves;
  MemoryStats memory;
  std::vector<double> losses;
};

// The fixture with NF4 weights, a rank-4 adapter and its optimizer, under `budget` bytes (0: none).
struct Nf4Training {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<LoraAdapter> adapter;
  std::unique_ptr<AdamW> optimizer;
};
Nf4Training nf4_training_under(int64_t budget) {
  Nf4Training t;
  t.backend = make_cpu_backend();
  LoadOptions lo;
  lo.quantize_nf4 = true;
  t.model = LlamaModel::load(t.backend.get(), qtest::reference("llama-shared"), lo);
  LoraConfig lc;
  lc.rank = 4;
  t.adapter = LoraAdapter::create(t.backend.get(), t.model->config(), lc, 7);
  t.backend->set_memory_budget(budget);
  t.optimizer = std::make_unique<AdamW>(t.backend.get(), t.adapter.get());
  return t;
}

// Five AdamW steps on the fixture with NF4 weights, under `budget` bytes (0: none).
Trained train_under(int64_t budget, const std::string& save_optimizer_to = "") {
  Nf4Training setup = nf4_training_under(budget);
  Backend* backend = setup.backend.get();
  LlamaModel* model = setup.model.get();
  LoraAdapter* adapter = setup.adapter.get();
  AdamW& opt = *setup.optimizer;
  Trained t;
  RunOptions ro;
  ro.compute_grads = true;
  for (int step = 0; step < 5; ++step) {
    adapter->zero_grad();
    const RunResult r = model->run(kIds.data(), kIds.data(), 2, 6, adapter, ro);
    t.losses.push_back(r.loss_sum / static_cast<double>(r.labelled));
    AdamWOptions ao;
    ao.lr = 1e-2;
    opt.step(ao);
  }
  if (!save_optimizer_to.empty()) opt.save(save_optimizer_to);
  for (auto& [p, g] : adapter->parameters_and_grads()) t.params.push_back(p->download());
  t.moves = backend->take_page_moves();
  t.memory = backend->memory();
  return t;
}

int64_t optimizer_bytes(const MemoryStats& s) { return s.peak[static_cast<size_t>(MemCategory::Optimizer)]; }

}  // namespace

TEST(paging_pages_move_out_under_pressure_and_back_for_the_update) {
  auto backend = make_cpu_backend();
  // three "layers" of two parameters each: pages of exp_avg and exp_avg_sq, 4 bytes a value
  const std::vector<int64_t> sizes = {60, 40, 30, 20, 20, 10};
  OptimizerPages pages(backend.get(), sizes, {0, 0, 1, 1, 2, 2});
  EXPECT_EQ(pages.num_pages(), size_t{3});
  EXPECT_EQ(pages.page_bytes(0), int64_t{800});
  EXPECT_EQ(pages.resident_bytes(), int64_t{800 + 400 + 240});
  // state written to each page survives moving out and back in
  for (size_t p = 0; p < sizes.size(); ++p)
    pages.write(p, 1, std::vector<float>(static_cast<size_t>(sizes[p]), static_cast<float>(p) + 0.5f));
  pages.acquire(0);
  pages.release(0);
  pages.acquire(2);
  pages.release(2);
  pages.acquire(1);
  pages.release(1);
  // the most recently used page goes first: page 1 (400 bytes), then page 2 (240) until 500 bytes are free
  EXPECT_EQ(pages.evict(500), int64_t{640});
  EXPECT_EQ(pages.paged_out_bytes(), int64_t{640});
  EXPECT_EQ(backend->memory().current[static_cast<size_t>(MemCategory::Optimizer)], int64_t{800});
  // a held page is never moved out
  pages.acquire(0);
  EXPECT_EQ(pages.evict(10000), int64_t{0});
  pages.release(0);
  EXPECT_EQ(pages.read(2, 1)[29], 2.5f);  // read from host memory
  EXPECT_EQ(pages.read(0, 1)[0], 0.5f);   // and from device memory
  pages.acquire(1);
  EXPECT_EQ(pages.read(3, 1)[0], 3.5f);  // back in device memory
  pages.release(1);
  const std::vector<PageMove> moves = backend->take_page_moves();
  EXPECT_EQ(moves.size(), size_t{3});
  EXPECT_TRUE(moves[0].dir == PageDir::Out && moves[0].tensor == "model.layers.1.optimizer" && moves[0].bytes == 400);
  EXPECT_TRUE(moves[1].dir == PageDir::Out && moves[1].tensor == "model.layers.2.optimizer" && moves[1].bytes == 240);
  EXPECT_TRUE(moves[2].dir == PageDir::In && moves[2].tensor == "model.layers.1.optimizer");
  EXPECT_TRUE(backend->take_page_moves().empty(), "moves are handed out once");
  // a prefetch still in flight while another page moves out (two copies outstanding at once) finishes intact
  pages.prefetch(2);
  EXPECT_EQ(pages.evict(1), int64_t{400});
  pages.acquire(2);
  EXPECT_EQ(pages.read(4, 1)[19], 4.5f);
  pages.release(2);
}

// The update visits the pages in order every step. With room for all pages but one, a step should move one page
// out and one in, not all of them (which is what evicting the least recently used page would do).
TEST(paging_one_page_short_moves_two_pages_a_step_not_all) {
  auto backend = make_cpu_backend();
  const std::vector<int64_t> sizes(8, 100);  // 8 layers of one parameter: pages of 800 bytes
  std::vector<int64_t> layers(8);
  for (int64_t i = 0; i < 8; ++i) layers[static_cast<size_t>(i)] = i;
  backend->set_memory_budget(7 * 800 + 100);
  OptimizerPages pages(backend.get(), sizes, layers);
  EXPECT_EQ(pages.paged_out_bytes(), int64_t{800});  // the eighth page starts in host memory
  for (int step = 0; step < 5; ++step) {
    for (size_t p = 0; p < pages.num_pages(); ++p) {
      pages.acquire(p);
      if (p + 1 < pages.num_pages()) pages.prefetch(p + 1);
      pages.release(p);
    }
    EXPECT_EQ(backend->take_page_moves().size(), size_t{2});
    EXPECT_TRUE(backend->memory().total_peak <= 7 * 800 + 100);
  }
}

TEST(paging_a_skipped_update_moves_no_page) {
  // Under the budget below, the run moves a page out; an update whose gradients overflowed (skipped, as fp16's loss
  // scaling asks) is known as such before any page moves back in, and leaves the pages where they are.
  const Trained free_run = train_under(0);
  Nf4Training t = nf4_training_under(free_run.memory.total_peak - optimizer_bytes(free_run.memory) / 2);
  RunOptions ro;
  ro.compute_grads = true;
  ro.loss_scale = 1e40;  // overflows fp32 in the logits' gradient
  t.model->run(kIds.data(), kIds.data(), 2, 6, t.adapter.get(), ro);
  EXPECT_TRUE(!t.backend->take_page_moves().empty(), "the run moved a page out");
  AdamWOptions ao;
  ao.loss_scale = 1e40;
  ao.skip_non_finite = true;
  EXPECT_TRUE(t.optimizer->step(ao).skipped);
  EXPECT_TRUE(t.backend->take_page_moves().empty(), "a skipped update moved pages");
}

TEST(paging_budget_moves_optimizer_pages_and_keeps_the_numbers) {
  const Trained free_run = train_under(0);
  EXPECT_TRUE(free_run.moves.empty(), "no budget, no paging");
  const int64_t peak = free_run.memory.total_peak, optimizer = optimizer_bytes(free_run.memory);
  EXPECT_TRUE(optimizer > 0);
  // Half the optimizer state does not fit beside the run's peak: a page moves out during each forward/backward
  // and back in for the update.
  const int64_t budget = peak - optimizer / 2;
  const Trained paged = train_under(budget);
  EXPECT_TRUE(paged.memory.total_peak <= budget, "peak ", paged.memory.total_peak, " over the budget ", budget);
  int outs = 0, ins = 0;
  for (const PageMove& m : paged.moves) {
    (m.dir == PageDir::Out ? outs : ins) += 1;
    EXPECT_TRUE(m.bytes == optimizer / 2 && m.ms >= 0.0 && m.tensor.rfind("model.layers.", 0) == 0);
  }
  EXPECT_TRUE(outs >= 4 && ins >= 4, outs, " moves out and ", ins, " in over 5 steps");
  EXPECT_EQ(paged.losses.size(), free_run.losses.size());
  for (size_t i = 0; i < paged.losses.size(); ++i) EXPECT_EQ(paged.losses[i], free_run.losses[i]);
  for (size_t i = 0; i < paged.params.size(); ++i)
    EXPECT_TRUE(std::memcmp(paged.params[i].data(), free_run.params[i].data(), paged.params[i].size() * 4) == 0,
                "parameter ", i, " differs with paging");
}

TEST(paging_optimizer_state_saved_while_paged_out_equals_the_resident_one) {
  const qtest::TempDir dir("paging");
  const std::string a = dir.file("free.safetensors"), b = dir.file("paged.safetensors");
  const Trained free_run = train_under(0, a);
  train_under(free_run.memory.total_peak - optimizer_bytes(free_run.memory) / 2, b);
  EXPECT_TRUE(qtest::read_bytes(a) == qtest::read_bytes(b), "optimizer files differ");
}

TEST(paging_over_budget_is_an_error_naming_the_category_and_the_budget) {
  auto backend = make_cpu_backend();
  backend->set_memory_budget(1000);
  DeviceArray<float> small(backend.get(), 200, MemCategory::Weights);
  bool threw = false;
  try {
    DeviceArray<float> big(backend.get(), 100, MemCategory::Activations);
  } catch (const EngineError& e) {
    threw = true;
    const std::string m = e.what();
    EXPECT_TRUE(m.find("over the memory budget") != std::string::npos && m.find("activations") != std::string::npos &&
                    m.find("1000 B budget") != std::string::npos && m.find("weights 800 B") != std::string::npos,
                m);
  }
  EXPECT_TRUE(threw);
  EXPECT_EQ(backend->memory().total_current, int64_t{800});
}

namespace {

struct OffloadRun {
  std::vector<double> losses;
  std::vector<std::vector<float>> grads, params;
  std::vector<std::vector<PageMove>> moves;  // per step
  int64_t activations_peak = 0;
};

// Three AdamW steps of the 4-layer synthetic shape with checkpointing, the inputs of its lowest `offload` blocks
// offloaded.
OffloadRun train_tiny(int64_t offload) {
  auto backend = make_cpu_backend();
  auto model = LlamaModel::synthetic(backend.get(), bench_shape("tiny"), 3);
  LoraConfig lc;
  lc.rank = 4;
  lc.dropout = 0.1;
  auto adapter = LoraAdapter::create(backend.get(), model->config(), lc, 7);
  std::vector<int32_t> ids(2 * 24);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 131 + 17) % 8192);
  AdamW opt(backend.get(), adapter.get());
  RunOptions ro;
  ro.compute_grads = true;
  ro.training = true;
  ro.offload_block_inputs = offload;
  OffloadRun out;
  for (uint32_t step = 0; step < 3; ++step) {
    ro.step = step;
    adapter->zero_grad();
    const RunResult r = model->run(ids.data(), ids.data(), 2, 24, adapter.get(), ro);
    out.losses.push_back(r.loss_sum);
    out.moves.push_back(backend->take_page_moves());
    if (step == 2)
      for (auto& [p, g] : adapter->parameters_and_grads()) out.grads.push_back(g->download());
    AdamWOptions ao;
    ao.lr = 1e-2;
    opt.step(ao);
  }
  for (auto& [p, g] : adapter->parameters_and_grads()) out.params.push_back(p->download());
  out.activations_peak = backend->memory().peak[static_cast<size_t>(MemCategory::Activations)];
  return out;
}

}  // namespace

TEST(paging_offloaded_block_inputs_move_out_and_back_and_keep_the_numbers) {
  const OffloadRun kept = train_tiny(0);
  for (const auto& step : kept.moves) EXPECT_TRUE(step.empty(), "nothing moves unless asked");
  // Every step: the inputs of blocks 0 and 1 (2 x 24 rows of 256 fp32 values) move out as forward writes them and
  // back in as backward reaches them (block 1's prefetched while block 2 computes); blocks 2 and 3's stay, as
  // backward starts on them at once. Asked for more, the same two move; asked for one, block 0's.
  const int64_t page = 2 * 24 * 256 * 4;
  for (int64_t asked : {2, 3, 1}) {
    const OffloadRun offloaded = train_tiny(asked);
    const int64_t moved = std::min<int64_t>(asked, 2);
    std::vector<std::pair<PageDir, std::string>> expected;
    for (int64_t l = 0; l < moved; ++l) expected.push_back({PageDir::Out, "model.layers." + std::to_string(l) + ".input"});
    for (int64_t l = moved - 1; l >= 0; --l) expected.push_back({PageDir::In, "model.layers." + std::to_string(l) + ".input"});
    for (const auto& step : offloaded.moves) {
      EXPECT_EQ(step.size(), expected.size());
      for (size_t i = 0; i < step.size() && i < expected.size(); ++i)
        EXPECT_TRUE(step[i].dir == expected[i].first && step[i].tensor == expected[i].second &&
                        step[i].bytes == page && step[i].ms >= 0.0,
                    "move ", i, ": ", step[i].tensor, " ", step[i].bytes, " B");
    }
    // backward holds 4 - moved block inputs instead of four
    EXPECT_EQ(offloaded.activations_peak, kept.activations_peak - moved * page);
    // the same numbers, bit for bit
    for (size_t i = 0; i < kept.losses.size(); ++i) EXPECT_EQ(offloaded.losses[i], kept.losses[i]);
    for (size_t i = 0; i < kept.grads.size(); ++i)
      EXPECT_TRUE(std::memcmp(kept.grads[i].data(), offloaded.grads[i].data(), kept.grads[i].size() * 4) == 0,
                  "gradient ", i, " differs with offloading");
    for (size_t i = 0; i < kept.params.size(); ++i)
      EXPECT_TRUE(std::memcmp(kept.params[i].data(), offloaded.params[i].data(), kept.params[i].size() * 4) == 0,
                  "parameter ", i, " differs with offloading");
  }
}

TEST(paging_offloading_block_inputs_fits_a_budget_keeping_them_does_not) {
  auto backend = make_cpu_backend();
  auto model = LlamaModel::synthetic(backend.get(), bench_shape("tiny"), 3);
  LoraConfig lc;
  lc.rank = 4;
  auto adapter = LoraAdapter::create(backend.get(), model->config(), lc, 7);
  std::vector<int32_t> ids(2 * 24);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 131 + 17) % 8192);
  RunOptions ro;
  ro.compute_grads = true;
  ro.offload_block_inputs = 2;
  const double loss = model->run(ids.data(), ids.data(), 2, 24, adapter.get(), ro).loss_sum;
  // the offloaded run's own peak as the budget: it runs again within it; keeping every input does not fit
  backend->set_memory_budget(backend->memory().total_peak);
  adapter->zero_grad();
  EXPECT_EQ(model->run(ids.data(), ids.data(), 2, 24, adapter.get(), ro).loss_sum, loss);
  ro.offload_block_inputs = 0;
  EXPECT_THROWS_WITH(model->run(ids.data(), ids.data(), 2, 24, adapter.get(), ro), "over the memory budget");
  // a failed run leaves nothing held: the offloaded one still fits
  ro.offload_block_inputs = 2;
  adapter->zero_grad();
  EXPECT_EQ(model->run(ids.data(), ids.data(), 2, 24, adapter.get(), ro).loss_sum, loss);
}
