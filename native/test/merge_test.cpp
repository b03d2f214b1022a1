// Merging a PEFT adapter into its base: PEFT's own merge reproduced within 1e-6 per element, shards plus an index
// that the engine reads back identically, a bnb-4bit base dequantized before the update, and refusals that happen
// before anything is written.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "backend/backend.h"
#include "harness.h"
#include "io/dtype.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "model/merge.h"
#include "quant/bnb4.h"
#include "util/json.h"

#ifndef _WIN32
#include <unistd.h>
#endif

using namespace qlora;
namespace fs = std::filesystem;

namespace {

// A fresh, absent path under the system temp folder.
fs::path temp_path(const std::string& name) {
#ifdef _WIN32
  const std::string pid = "0";
#else
  const std::string pid = std::to_string(getpid());
#endif
  const fs::path p = fs::temp_directory_path() / ("qlora-merge-test-" + pid) / name;
  fs::remove_all(p);
  fs::create_directories(p.parent_path());
  return p;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// W + scale * B @ A computed independently of the engine (double throughout).
std::vector<float> expected_merge(const std::vector<float>& w, const std::vector<float>& a,
                                  const std::vector<float>& b, int64_t out, int64_t in, int64_t r, double scale) {
  std::vector<float> y(w.size());
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      double s = 0;
      for (int64_t k = 0; k < r; ++k) s += static_cast<double>(b[o * r + k]) * a[k * in + i];
      y[o * in + i] = static_cast<float>(w[o * in + i] + scale * s);
    }
  return y;
}

}  // namespace

TEST(merge_f32_reproduces_peft_merge) {
  const fs::path out = temp_path("f32");
  const MergeReport r = merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), out.string(), "float32");
  EXPECT_EQ(r.shards, 1);
  EXPECT_EQ(r.files.size(), size_t{1});
  EXPECT_TRUE(fs::exists(out / "model.safetensors"));
  EXPECT_TRUE(!fs::exists(out / "model.safetensors.index.json"));
  const auto ours = TensorStore::open_dir(out.string());
  const auto peft = TensorStore::open_dir(qtest::reference("llama-shared-merged-f32"));
  EXPECT_TRUE(ours->names() == peft->names(), "same tensor names as PEFT's merged model");
  EXPECT_EQ(r.tensors, static_cast<int64_t>(peft->names().size()));
  int64_t bytes = 0;
  for (const std::string& name : peft->names()) {
    EXPECT_TRUE(ours->info(name).dtype == DType::F32, name);
    EXPECT_TRUE(ours->info(name).shape == peft->info(name).shape, name);
    const double d = max_abs_diff(ours->read_f32(name), peft->read_f32(name));
    EXPECT_TRUE(d <= 1e-6, name, " differs from PEFT's merge by ", d);
    bytes += static_cast<int64_t>(ours->info(name).nbytes);
  }
  EXPECT_EQ(r.bytes, bytes);
  fs::remove_all(out);
}

TEST(merge_shards_and_index_read_back_identically) {
  const fs::path single = temp_path("single"), sharded = temp_path("sharded");
  merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), single.string(), "bfloat16");
  // 40 KB shards: the bf16 linears (16-64 KB) and embeddings (64 KB) overflow it, so some tensors get their own.
  const int64_t limit = 40000;
  const MergeReport r = merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), sharded.string(), "bfloat16", limit);
  EXPECT_TRUE(r.shards > 2, "shards ", r.shards);
  EXPECT_TRUE(!fs::exists(sharded / "model.safetensors"));
  const std::string index_path = (sharded / "model.safetensors.index.json").string();
  const json::Value index = json::Value::parse(read_text_file(index_path), index_path);
  EXPECT_EQ(index.find("metadata")->find("total_size")->as_int("total_size"), r.bytes);
  // Shard names, the limit, and the index agreeing with each file's contents.
  char last[64];
  std::snprintf(last, sizeof(last), "model-%05lld-of-%05lld.safetensors", static_cast<long long>(r.shards),
                static_cast<long long>(r.shards));
  EXPECT_TRUE(fs::exists(sharded / last), last);
  int64_t files = 0;
  for (const auto& entry : fs::directory_iterator(sharded)) {
    const std::string name = entry.path().filename().string();
    if (name == "model.safetensors.index.json") continue;
    EXPECT_TRUE(name.rfind("model-", 0) == 0, name);
    ++files;
    const auto file = SafetensorsFile::open(entry.path().string());
    int64_t bytes = 0;
    for (const TensorInfo& t : file->tensors()) {
      bytes += static_cast<int64_t>(t.nbytes);
      EXPECT_EQ(index.find("weight_map")->find(t.name)->as_string(t.name), name);
    }
    EXPECT_TRUE(bytes <= limit || file->tensors().size() == 1, name, " holds ", bytes, " bytes");
  }
  EXPECT_EQ(files, r.shards);
  EXPECT_EQ(static_cast<int64_t>(r.files.size()), r.shards + 1);
  const auto a = TensorStore::open_dir(single.string()), b = TensorStore::open_dir(sharded.string());
  EXPECT_TRUE(a->names() == b->names());
  for (const std::string& name : a->names()) {
    const TensorInfo &ta = a->info(name), &tb = b->info(name);
    EXPECT_TRUE(ta.dtype == DType::BF16 && tb.dtype == DType::BF16 && ta.shape == tb.shape, name);
    EXPECT_TRUE(std::memcmp(a->data(name), b->data(name), ta.nbytes) == 0, name, " differs between single and sharded");
  }
  fs::remove_all(single);
  fs::remove_all(sharded);
}

TEST(merge_bf16_is_the_f32_merge_rounded_once) {
  const fs::path f32 = temp_path("r32"), bf16 = temp_path("r16");
  merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), f32.string(), "float32");
  merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), bf16.string(), "bfloat16");
  const auto a = TensorStore::open_dir(f32.string()), b = TensorStore::open_dir(bf16.string());
  for (const std::string& name : a->names()) {
    const std::vector<float> x = a->read_f32(name), y = b->read_f32(name);
    for (size_t i = 0; i < x.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &x[i], 4);
      // Where the fp32 result sits exactly halfway between two bf16 values, only the exact sum decides.
      if ((bits & 0xffffu) == 0x8000u) {
        EXPECT_TRUE(std::fabs(y[i] - x[i]) <= std::fabs(x[i]) * (1.0 / 256), name);
        continue;
      }
      EXPECT_TRUE(y[i] == round_to_bf16(x[i]), name, "[", i, "]: ", y[i], " vs ", round_to_bf16(x[i]));
    }
  }
  fs::remove_all(f32);
  fs::remove_all(bf16);
}

TEST(merge_bnb4_base_is_dequantized_then_updated) {
  const fs::path out = temp_path("bnb4");
  const std::string base = qtest::reference("llama-shared-bnb4-dq");
  merge_weights(base, qtest::reference("llama-shared-adapter"), out.string(), "float32");
  const auto merged = TensorStore::open_dir(out.string());
  const auto plain = TensorStore::open_dir(qtest::reference("llama-shared"));
  // The plain model's tensor names exactly: no .absmax, .quant_map, .nested_* or .quant_state.* left.
  EXPECT_TRUE(merged->names() == plain->names());
  const auto store = TensorStore::open_dir(base);
  const ModelConfig config = load_model_config(base);
  auto backend = make_cpu_backend();
  const auto adapter = LoraAdapter::load_peft(backend.get(), config, qtest::reference("llama-shared-adapter"));
  const LoraConfig& lc = adapter->config();
  for (int64_t layer = 0; layer < config.num_layers; ++layer)
    for (Module m : lc.targets) {
      const std::string name =
          "model.layers." + std::to_string(layer) + "." + module_parent(m) + "." + module_name(m) + ".weight";
      const LoraParam* p = adapter->param(layer, m);
      const std::vector<float> w = bnb4::dequantize_weight(bnb4::read_weight(*store, name));
      const std::vector<float> want = expected_merge(w, p->a.download(), p->b.download(), p->out, p->in, lc.rank, lc.scale());
      EXPECT_TRUE(merged->info(name).shape == (std::vector<int64_t>{p->out, p->in}), name);
      const double d = max_abs_diff(merged->read_f32(name), want);
      EXPECT_TRUE(d <= 1e-6, name, " off by ", d);
    }
  const double d = max_abs_diff(merged->read_f32("lm_head.weight"), store->read_f32("lm_head.weight"));
  EXPECT_TRUE(d == 0.0, "unadapted tensors are copied exactly");
  fs::remove_all(out);
}

TEST(merge_rejects_an_adapter_that_does_not_fit_naming_the_tensor) {
  const fs::path out = temp_path("misfit");
  // llama3-shared's adapter has hidden 96 / intermediate 150; llama-shared has 128 / 256.
  EXPECT_THROWS_WITH(merge_weights(qtest::reference("llama-shared"), qtest::reference("llama3-shared-adapter"), out.string(), "float32"),
                     "lora_A.weight' has shape");
  EXPECT_TRUE(!fs::exists(out), "nothing written");
  EXPECT_THROWS_WITH(merge_weights(qtest::reference("llama-shared"), qtest::reference("no-such-adapter"), out.string(), "float32"),
                     "no adapter_config.json");
  EXPECT_THROWS_WITH(merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), out.string(), "int8"),
                     "dtype 'int8' is not supported");
  EXPECT_TRUE(!fs::exists(out), "nothing written");
}

TEST(merge_refuses_a_non_empty_folder_before_any_work) {
  const fs::path out = temp_path("nonempty");
  fs::create_directories(out);
  { std::ofstream(out / "keep.txt") << "mine"; }
  EXPECT_THROWS_WITH(merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), out.string(), "float32"),
                     "is not empty");
  EXPECT_EQ(read_text_file((out / "keep.txt").string()), std::string("mine"));
  EXPECT_TRUE(!fs::exists(out / "model.safetensors"));
  // An empty existing folder is fine.
  fs::remove(out / "keep.txt");
  EXPECT_EQ(merge_weights(qtest::reference("llama-shared"), qtest::reference("llama-shared-adapter"), out.string(), "float32").shards, 1);
  fs::remove_all(out);
}
