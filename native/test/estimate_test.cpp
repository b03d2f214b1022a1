// The memory estimate against the CPU backend's own accounting: load the model, attach LoRA, take two training
// steps (run with gradients, AdamW update) and compare every category's peak and the total peak, byte for byte.
#include <vector>

#include "backend/backend.h"
#include "harness.h"
#include "io/model_config.h"
#include "model/bench_shapes.h"
#include "model/estimate.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optimizer.h"

using namespace qlora;

namespace {

struct Case {
  std::string model;  // a reference fixture, or "shape:<name>" for a synthetic benchmark shape
  bool quantize;
  bool checkpointing;
  int64_t batch, seq, rank;
  std::vector<Module> targets;
  int64_t offload = 0;  // block inputs offloaded
  double dropout = 0.1;  // LoRA dropout (a drop(x) workspace)
};

void check_case(const Case& c) {
  auto backend = make_cpu_backend();
  LoadOptions lo;
  lo.quantize_nf4 = c.quantize;
  auto model = c.model.rfind("shape:", 0) == 0 ? LlamaModel::synthetic(backend.get(), bench_shape(c.model.substr(6)), 1)
                                               : LlamaModel::load(backend.get(), qtest::reference(c.model), lo);
  LoraConfig lc;
  lc.rank = c.rank;
  lc.dropout = c.dropout;
  lc.targets = c.targets;
  auto adapter = LoraAdapter::create(backend.get(), model->config(), lc, 7);
  std::vector<int32_t> ids(static_cast<size_t>(c.batch * c.seq));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 37 + 5) % 200);
  RunOptions ro;
  ro.compute_grads = true;
  ro.training = true;
  ro.gradient_checkpointing = c.checkpointing;
  ro.offload_block_inputs = c.offload;
  // As the trainer does it: the optimizer comes into being at the first update, so the second step is the one
  // that holds everything at once.
  std::unique_ptr<AdamW> optimizer;
  for (uint32_t step = 0; step < 2; ++step) {
    ro.step = step;
    adapter->zero_grad();
    model->run(ids.data(), ids.data(), c.batch, c.seq, adapter.get(), ro);
    if (!optimizer) optimizer = std::make_unique<AdamW>(backend.get(), adapter.get());
    optimizer->step(AdamWOptions{});
  }

  EstimateOptions eo;
  eo.batch = c.batch;
  eo.seq = c.seq;
  eo.rank = c.rank;
  eo.targets = c.targets;
  eo.quantize_nf4 = c.quantize;
  eo.stored_4bit = model->stored_4bit();
  eo.gradient_checkpointing = c.checkpointing;
  eo.offload_block_inputs = c.offload;
  eo.lora_dropout = c.dropout;
  const MemoryEstimate e = estimate_memory(model->config(), eo);
  const MemoryStats& s = backend->memory();
  for (size_t i = 0; i < static_cast<size_t>(MemCategory::Count); ++i) {
    if (e.bytes[i] != s.peak[i])
      qtest::fail_test(__FILE__, __LINE__, c.model, " quantize=", c.quantize, " checkpointing=", c.checkpointing,
                       " offload=", c.offload, ": ",
                       mem_category_name(static_cast<MemCategory>(i)), " estimated ", e.bytes[i], ", measured ",
                       s.peak[i]);
  }
  EXPECT_EQ(e.peak_total, s.total_peak);
  EXPECT_EQ(e.lora_parameters, adapter->num_parameters());
}

const std::vector<Module> kAll = {Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down};

}  // namespace

TEST(estimate_matches_measured_peaks_on_llama) {
  for (bool quantize : {true, false})
    for (bool checkpointing : {true, false}) check_case({"llama-shared", quantize, checkpointing, 2, 6, 8, kAll});
}

TEST(estimate_matches_measured_peaks_on_a_bnb4_checkpoint) {
  for (bool checkpointing : {true, false})
    check_case({"llama-shared-bnb4-dq", false, checkpointing, 1, 9, 8, kAll});
}

TEST(estimate_matches_measured_peaks_with_biases_tied_embeddings_and_some_targets) {
  // qwen2: q/k/v biases, tied embeddings, 5:1 GQA, no head_dim key; rank 4 on three modules only.
  for (bool checkpointing : {true, false})
    check_case({"qwen2-shared", true, checkpointing, 3, 5, 4, {Module::Q, Module::V, Module::Down}});
}

TEST(estimate_rejects_bad_options) {
  const ModelConfig config = load_model_config(qtest::reference("llama-shared"));
  EstimateOptions eo;
  eo.seq = 0;
  EXPECT_THROWS_WITH(estimate_memory(config, eo), "must be positive");
  eo.seq = 16;
  eo.rank = 0;
  EXPECT_THROWS_WITH(estimate_memory(config, eo), "rank must be positive");
  eo.rank = 8;
  eo.targets.clear();
  EXPECT_THROWS_WITH(estimate_memory(config, eo), "at least one target");
}

TEST(memory_tracker_high_water_mark_by_category) {
  MemoryTracker t;
  t.on_alloc(MemCategory::Weights, 100);
  t.on_alloc(MemCategory::Optimizer, 20);
  t.begin_interval();
  // A step: activations rise to 50 while a 30-byte workspace comes and goes, then everything of the step is freed.
  t.on_alloc(MemCategory::Activations, 40);
  t.on_alloc(MemCategory::Workspace, 30);
  t.on_free(MemCategory::Workspace, 30);
  t.on_alloc(MemCategory::Activations, 10);
  t.on_free(MemCategory::Activations, 50);
  const MemoryStats& s = t.stats();
  EXPECT_EQ(s.total_current, int64_t{120});
  EXPECT_EQ(s.interval_peak_total, int64_t{190});
  EXPECT_EQ(s.at_interval_peak[static_cast<size_t>(MemCategory::Weights)], int64_t{100});
  EXPECT_EQ(s.at_interval_peak[static_cast<size_t>(MemCategory::Optimizer)], int64_t{20});
  EXPECT_EQ(s.at_interval_peak[static_cast<size_t>(MemCategory::Activations)], int64_t{40});
  EXPECT_EQ(s.at_interval_peak[static_cast<size_t>(MemCategory::Workspace)], int64_t{30});
  // A new interval starts from what is held now; the lifetime peak stays.
  t.begin_interval();
  EXPECT_EQ(t.stats().interval_peak_total, int64_t{120});
  EXPECT_EQ(t.stats().at_interval_peak[static_cast<size_t>(MemCategory::Activations)], int64_t{0});
  EXPECT_EQ(t.stats().total_peak, int64_t{190});
}

TEST(estimate_matches_measured_peaks_on_a_synthetic_bench_shape) {
  check_case({"shape:tiny", true, true, 2, 24, 16, kAll});
  check_case({"shape:tiny", true, true, 2, 24, 16, kAll, 0, 0.0});  // without LoRA dropout: no drop(x) workspace
}

TEST(estimate_matches_measured_peaks_with_offloaded_activations) {
  // four layers: blocks 0 and 1's inputs move out (backward then holds two block inputs, not four), or block 0's
  // alone, or as many as can help when more are asked for
  for (int64_t offload : {2, 1, 5}) check_case({"shape:tiny", true, true, 2, 24, 16, kAll, offload});
  // two layers: backward starts on both, so nothing can help; without checkpointing every block keeps its input in
  // its saved activations
  check_case({"llama-shared", true, true, 2, 6, 8, kAll, 1});
  check_case({"llama-shared", true, false, 2, 6, 8, kAll, 1});
}

TEST(estimate_offloadable_activations_are_what_offloading_saves) {
  const ModelConfig c = bench_shape("8b");
  EstimateOptions eo;
  eo.batch = 1;
  eo.seq = 2048;
  eo.rank = 16;
  eo.cuda = true;
  eo.compute = GpuCompute::BF16;
  const MemoryEstimate kept = estimate_memory(c, eo);
  eo.offload_block_inputs = 30;
  const MemoryEstimate offloaded = estimate_memory(c, eo);
  // bf16 block inputs of 2048 x 4096: 30 of the 32 can move out
  EXPECT_EQ(kept.activation_page_bytes, int64_t{2048 * 4096 * 2});
  EXPECT_EQ(kept.offloadable_activation_bytes, 30 * kept.activation_page_bytes);
  EXPECT_EQ(offloaded.peak_total, kept.peak_total - kept.offloadable_activation_bytes);
  eo.gradient_checkpointing = false;
  EXPECT_EQ(estimate_memory(c, eo).offloadable_activation_bytes, int64_t{0});
}

// Parameter counts as the model cards give them: the shapes are the real models' shapes.
TEST(bench_shapes_have_the_parameter_counts_of_the_real_models) {
  auto parameters = [](const ModelConfig& c) {
    int64_t n = c.vocab_size * c.hidden_size * (c.tie_word_embeddings ? 1 : 2) + c.hidden_size;
    for (int mi = 0; mi < kNumModules; ++mi) {
      const auto s = module_shape(c, static_cast<Module>(mi));
      n += c.num_layers * s[0] * s[1];
    }
    return n + c.num_layers * 2 * c.hidden_size;
  };
  EXPECT_EQ(parameters(bench_shape("1b")), int64_t{1235814400});
  EXPECT_EQ(parameters(bench_shape("8b")), int64_t{8030261248});
  EXPECT_EQ(parameters(bench_shape("70b")), int64_t{70553706496});
  EXPECT_EQ(bench_shape("8b").rope_scaling.factor, 8.0);
  EXPECT_THROWS_WITH(bench_shape("13b"), "unknown benchmark shape '13b' (known: tiny, 1b, 8b, 70b)");
}

TEST(loss_chunks_are_whole_gemm_tiles_of_about_16m_logits) {
  EXPECT_EQ(loss_chunk_rows(8192, 128256), int64_t{128});   // Llama 3: 130 rows fit, 128 run in whole tiles
  EXPECT_EQ(loss_chunk_rows(100000, 8192), int64_t{2048});  // 16M logits exactly
  EXPECT_EQ(loss_chunk_rows(8192, 151936), int64_t{110});   // Qwen2: fewer than a tile fit, so all that fit
  EXPECT_EQ(loss_chunk_rows(12, 256), int64_t{12});         // every row at once
  EXPECT_EQ(loss_chunk_rows(5, int64_t{1} << 25), int64_t{1});
}
