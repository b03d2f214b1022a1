// bnb-4bit checkpoints that are not quantized throughout, as transformers writes and reads them: linears left in 16
// bits (llm_int8_skip_modules; unsloth's dynamic 4-bit models) stay dense when the model is loaded for QLoRA, and an
// LM head stored in 4 bits computes what its dequantized values compute.
#include <cmath>
#include <filesystem>
#include <functional>

#include "backend/backend.h"
#include "harness.h"
#include "io/dtype.h"
#include "io/safetensors.h"
#include "model/estimate.h"
#include "model/llama.h"
#include "quant/bnb4.h"

using namespace qlora;
namespace fs = std::filesystem;

namespace {

// A copy of the model in `from` with its config.json and every tensor for which `keep` is true, plus what `add` writes,
// in a folder under `root`.
fs::path copy_model(const qtest::TempDir& root, const std::string& from, const std::string& name,
                    const std::function<bool(const std::string&)>& keep, const std::function<void(SafetensorsWriter&)>& add) {
  const fs::path dir = root.path / name;
  fs::create_directories(dir);
  fs::copy_file(fs::path(from) / "config.json", dir / "config.json");
  const auto store = TensorStore::open_dir(from);
  SafetensorsWriter w;
  for (const std::string& t : store->names()) {
    if (!keep(t)) continue;
    const TensorInfo& info = store->info(t);
    w.add(t, info.dtype, info.shape, store->data(t), info.nbytes);
  }
  add(w);
  w.write((dir / "model.safetensors").string());
  return dir;
}

bool starts_with(const std::string& s, const std::string& head) { return s.compare(0, head.size(), head) == 0; }

double loss_of(const fs::path& dir, bool quantize_nf4) {
  auto backend = make_cpu_backend();
  LoadOptions lo;
  lo.quantize_nf4 = quantize_nf4;
  auto model = LlamaModel::load(backend.get(), dir.string(), lo);
  const std::vector<int32_t>& ids = qtest::reference_ids();
  const RunResult r = model->run(ids.data(), ids.data(), 2, 6, nullptr, RunOptions{});
  return r.loss_sum / static_cast<double>(r.labelled);
}

const char* kSkippedMlp = "model.layers.1.mlp.";

}  // namespace

TEST(prequantized_linears_left_dense_stay_dense_when_loading_for_qlora) {
  // layer 1's MLP as unsloth's dynamic models keep their worst-quantizing layers: dense, no quant state
  const qtest::TempDir root("prequantized-dynamic");
  const auto dense = TensorStore::open_dir(qtest::reference("llama-shared"));
  const fs::path dir = copy_model(
      root, qtest::reference("llama-shared-bnb4"), "dynamic", [](const std::string& t) { return !starts_with(t, kSkippedMlp); },
      [&](SafetensorsWriter& w) {
        for (const std::string& t : dense->names())
          if (starts_with(t, kSkippedMlp)) w.add(t, dense->info(t).dtype, dense->info(t).shape, dense->data(t), dense->info(t).nbytes);
      });
  const double as_stored = loss_of(dir, false);
  const double for_qlora = loss_of(dir, true);
  EXPECT_TRUE(std::isfinite(as_stored));
  EXPECT_TRUE(as_stored == for_qlora, "quantizing on load changed the loss: ", as_stored, " vs ", for_qlora);

  // the estimate counts those three linears dense, like the loader
  EstimateOptions o;
  o.stored_4bit = true;
  const ModelConfig c = load_model_config(dir.string());
  const int64_t nf4_weights = estimate_memory(c, o).bytes[static_cast<size_t>(MemCategory::Weights)];
  for (Module m : {Module::Gate, Module::Up, Module::Down}) o.stored_dense_linears.insert({1, m});
  const int64_t with_dense = estimate_memory(c, o).bytes[static_cast<size_t>(MemCategory::Weights)];
  const int64_t mlp = 3 * c.hidden_size * c.intermediate_size;
  // dense fp32 (the config's dtype) in place of NF4 codes (half a byte) and one fp32 constant per block of 64
  EXPECT_EQ(with_dense - nf4_weights, mlp * 4 - (mlp / 2 + mlp / 64 * 4));
}

TEST(prequantized_lm_head_in_4_bits_computes_as_its_dequantized_values) {
  const qtest::TempDir root("prequantized-head");
  const auto base = TensorStore::open_dir(qtest::reference("llama-shared"));
  const TensorInfo& head = base->info("lm_head.weight");
  const std::vector<float> values = base->read_f32("lm_head.weight");
  for (const char* dtype : {"float32", "bfloat16"}) {
    // the head quantized, and beside it the same model with the head's dequantized values stored dense
    const fs::path quantized = copy_model(
        root, qtest::reference("llama-shared-bnb4"), std::string("head-4bit-") + dtype,
        [](const std::string& t) { return t != "lm_head.weight"; },
        [&](SafetensorsWriter& w) { bnb4::add_quantized_weight(w, "lm_head.weight", head.shape, values, true, dtype); });
    const auto q = TensorStore::open_dir(quantized.string());
    const std::vector<float> dequantized = bnb4::dequantize_weight(bnb4::read_weight(*q, "lm_head.weight"));
    const fs::path dense = copy_model(
        root, qtest::reference("llama-shared-bnb4"), std::string("head-dense-") + dtype,
        [](const std::string& t) { return t != "lm_head.weight"; },
        [&](SafetensorsWriter& w) { w.add_f32("lm_head.weight", head.shape, dequantized); });
    const double a = loss_of(quantized, true), b = loss_of(dense, true);
    EXPECT_TRUE(std::isfinite(a));
    EXPECT_NEAR(a, b, 1e-6 * std::fabs(b));
    if (std::string(dtype) == "float32") EXPECT_TRUE(a == b, "an fp32 head: bit for bit, got ", a, " vs ", b);
  }
}

TEST(prequantized_quantizing_on_load_matches_the_written_checkpoint) {
  // The loader quantizes each dense linear straight from its stored bytes, converted a block at a time; quantize
  // writes a checkpoint from each whole weight read as fp32. The same codes, constants and rounding: the same loss to
  // the bit, with the weights stored in bf16 (the reference model), f16 and f32.
  const qtest::TempDir root("prequantized-on-load");
  const auto dense = TensorStore::open_dir(qtest::reference("llama-shared"));
  for (const DType stored : {DType::BF16, DType::F16, DType::F32}) {
    const std::string tag = dtype_name(stored);
    const fs::path model = copy_model(
        root, qtest::reference("llama-shared"), "model-" + tag, [](const std::string& t) { return !bnb4::is_quantizable_linear(t); },
        [&](SafetensorsWriter& w) {
          for (const std::string& t : dense->names()) {
            if (!bnb4::is_quantizable_linear(t)) continue;
            const std::vector<float> values = dense->read_f32(t);
            if (stored == DType::F32) {
              w.add_f32(t, dense->info(t).shape, values);
              continue;
            }
            std::vector<uint16_t> half(values.size());
            for (size_t i = 0; i < values.size(); ++i)
              half[i] = stored == DType::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
            w.add(t, stored, dense->info(t).shape, half.data(), half.size() * 2);
          }
        });
    const fs::path written = root.path / ("written-" + tag);
    fs::create_directories(written);
    fs::copy_file(model / "config.json", written / "config.json");
    bnb4::quantize_model(model.string(), (written / "model.safetensors").string(), true);
    const double on_load = loss_of(model, true);
    const double from_checkpoint = loss_of(written, false);
    EXPECT_TRUE(std::isfinite(on_load), tag);
    EXPECT_TRUE(on_load == from_checkpoint, tag, ": quantized on load ", on_load, ", from the checkpoint ", from_checkpoint);
    EXPECT_TRUE(on_load != loss_of(model, false), tag, ": NF4 computes what the dense weights compute");
  }
}
