#include "model/merge.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <set>

#include "backend/backend.h"
#include "io/dtype.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "quant/bnb4.h"
#include "util/error.h"
#include "util/json.h"
#include "util/per_thread.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

const char* const kQuantStateInfix = ".quant_state.";
const char* const kNf4State = ".quant_state.bitsandbytes__nf4";
const char* const kFp4State = ".quant_state.bitsandbytes__fp4";

DType parse_output_dtype(const std::string& dtype) {
  if (dtype == "float32") return DType::F32;
  if (dtype == "bfloat16") return DType::BF16;
  if (dtype == "float16") return DType::F16;
  fail("merge: dtype '", dtype, "' is not supported (bfloat16, float16, float32)");
}

// Names in "natural" order (model.layers.2 before model.layers.10), so that shards hold whole layers in sequence.
bool natural_less(const std::string& a, const std::string& b) {
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (digit(a[i]) && digit(b[j])) {
      size_t ie = i, je = j;
      while (ie < a.size() && digit(a[ie])) ++ie;
      while (je < b.size() && digit(b[je])) ++je;
      size_t is = i, js = j;
      while (is + 1 < ie && a[is] == '0') ++is;
      while (js + 1 < je && b[js] == '0') ++js;
      if (ie - is != je - js) return ie - is < je - js;
      const int c = a.compare(is, ie - is, b, js, je - js);
      if (c != 0) return c < 0;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  if (a.size() - i != b.size() - j) return a.size() - i < b.size() - j;
  return a < b;
}

// x rounded to fp32 "to odd" (truncated, with the last mantissa bit set when inexact). Rounding that to bf16 or
// f16 (8 and 11 significant bits, well under fp32's 24 - 2) gives the correctly rounded double -> half result, so
// a merged weight is rounded once, never twice.
float round_to_odd_f32(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) == x || !std::isfinite(f)) return f;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 1u) == 0) {
    const float inf = std::numeric_limits<float>::infinity();
    f = std::nextafter(f, x > static_cast<double>(f) ? inf : -inf);
  }
  return f;
}

// The [out, in] shape recorded in a bnb-4bit weight's quant state (the packed tensor is [out*in/2, 1]).
std::vector<int64_t> quant_state_shape(const TensorStore& store, const std::string& name) {
  const std::string state = name + kNf4State;
  const TensorInfo& info = store.info(state);
  const std::string ctx = store.file_of(state) + ": tensor '" + state + "'";
  const json::Value v =
      json::Value::parse(std::string_view(reinterpret_cast<const char*>(store.data(state)), info.nbytes), ctx);
  const json::Value* shape = v.find("shape");
  if (!shape) fail(ctx, ": quant state lacks 'shape'");
  std::vector<int64_t> out;
  for (const json::Value& d : shape->as_array(ctx + ": shape")) out.push_back(d.as_int(ctx + ": shape"));
  return out;
}

std::string shard_name(int64_t i, int64_t n) {
  if (n == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05lld-of-%05lld.safetensors", static_cast<long long>(i + 1),
                static_cast<long long>(n));
  return buf;
}

// Where a merged tensor's values are computed, reused from tensor to tensor: a fresh buffer for each would be zeroed and
// faulted in again (a quarter of a 1B merge's time went to that).
class MergeBuffers {
 public:
  float* values(size_t n) {
    if (n > capacity_) {
      values_.reset();
      values_.reset(new float[n]);  // not value-initialized: merged_values_into writes every value
      capacity_ = n;
    }
    return values_.get();
  }

 private:
  std::unique_ptr<float[]> values_;
  size_t capacity_ = 0;
};

// One output tensor, computed when the writer reaches it: a shard's file holds one merged tensor in memory at a time,
// and a tensor written as stored goes from the base's mapping straight to the file.
void add_merged(SafetensorsWriter& writer, const MergePlan& plan, const MergePlan::Tensor& t, MergeBuffers& buffers) {
  writer.add_deferred(t.name, t.dtype, t.shape, [&plan, &t, &buffers](const SafetensorsWriter::ByteSink& sink) {
    if (plan.copied_as_stored(t)) {
      sink(plan.store().data(t.name), plan.store().info(t.name).nbytes);
      return;
    }
    const size_t n = static_cast<size_t>(numel_of(t.shape));
    float* values = buffers.values(n);
    plan.merged_values_into(t, values);
    sink_f32_as(sink, t.dtype, values, n);
  });
}

}  // namespace

MergePlan::MergePlan(const std::string& model_dir, const std::string& adapter_dir, const std::string& dtype) {
  const DType out_dtype = parse_output_dtype(dtype);
  const ModelConfig config = load_model_config(model_dir);
  store_ = TensorStore::open_dir(model_dir);
  const TensorStore* store = store_.get();
  // The adapter is small next to the model: read it whole, with LoraAdapter's checks of every name and shape
  // against the model's config.
  backend_ = make_cpu_backend();
  adapter_ = LoraAdapter::load_peft(backend_.get(), config, adapter_dir);
  const LoraConfig& lc = adapter_->config();
  scale_ = lc.scale();
  rank_ = lc.rank;

  // bnb-4bit weights of the base, and their auxiliary tensors, which are not written.
  std::set<std::string> quantized, auxiliary;
  for (const std::string& name : store->names()) {
    const size_t pos = name.find(kQuantStateInfix);
    if (pos == std::string::npos) continue;
    const std::string base = name.substr(0, pos);
    if (store->has(base + kFp4State))
      fail(store->file_of(name), ": tensor '", base, "' uses fp4, which is not supported (only nf4)");
    quantized.insert(base);
  }
  for (const std::string& name : store->names()) {
    if (name.find(kQuantStateInfix) != std::string::npos) {
      auxiliary.insert(name);
      continue;
    }
    const size_t dot = name.rfind('.');
    if (dot == std::string::npos || !quantized.count(name.substr(0, dot))) continue;
    const std::string rest = name.substr(dot + 1);
    if (rest == "absmax" || rest == "quant_map" || rest.rfind("nested_", 0) == 0) auxiliary.insert(name);
  }

  // Every adapted linear must exist in the base with the shape the adapter was checked against.
  struct Adapted {
    const LoraParam* param;
    std::string lora_a;  // its PEFT name, for messages
  };
  std::map<std::string, Adapted> adapted;
  for (int64_t layer = 0; layer < config.num_layers; ++layer)
    for (Module m : lc.targets) {
      const std::string name = module_path(layer, m) + ".weight";
      if (!store->has(name))
        fail(model_dir, ": the adapter has '", LoraAdapter::peft_tensor_name(layer, m, 'A'),
             "' but the base model has no tensor '", name, "'");
      adapted[name] = Adapted{adapter_->param(layer, m), LoraAdapter::peft_tensor_name(layer, m, 'A')};
    }

  std::vector<std::string> names;
  for (const std::string& name : store->names())
    if (!auxiliary.count(name)) names.push_back(name);
  std::sort(names.begin(), names.end(), natural_less);

  for (const std::string& name : names) {
    const TensorInfo& info = store->info(name);
    Tensor t;
    t.name = name;
    t.quantized = quantized.count(name) > 0;
    t.shape = t.quantized ? quant_state_shape(*store, name) : info.shape;
    t.dtype = t.quantized || is_floating(info.dtype) ? out_dtype : info.dtype;
    t.nbytes = numel_of(t.shape) * static_cast<int64_t>(dtype_size(t.dtype));
    if (const auto it = adapted.find(name); it != adapted.end()) {
      t.lora = it->second.param;
      const std::vector<int64_t> expected = {t.lora->out, t.lora->in};
      if (t.shape != expected)
        fail(store->file_of(name), ": tensor '", name, "' has shape ", shape_to_string(t.shape), " but the adapter's '",
             it->second.lora_a, "' and its lora_B make a ", shape_to_string(expected), " update");
      if (!t.quantized && !is_floating(info.dtype))
        fail(store->file_of(name), ": tensor '", name, "' has dtype ", dtype_name(info.dtype),
             ", expected a floating or bnb-4bit weight to merge into");
    }
    tensors_.push_back(std::move(t));
  }
}

MergePlan::~MergePlan() = default;

const MergePlan::Tensor* MergePlan::find(const std::string& name) const {
  for (const Tensor& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

bool MergePlan::copied_as_stored(const Tensor& t) const {
  const TensorInfo& src = store_->info(t.name);
  return !t.quantized && !t.lora && (src.dtype == t.dtype || !is_floating(src.dtype));
}

void MergePlan::merged_values_into(const Tensor& t, float* values) const {
  if (t.quantized) {
    bnb4::dequantize_weight_into(bnb4::read_weight(*store_, t.name), values);
  } else {
    store_->read_f32_into(t.name, values);
  }
  if (!t.lora) return;
  // W' = W + scale * (B @ A), B @ A accumulated in double and the sum rounded once (to fp32 nearest, or to odd
  // when a half dtype follows).
  const int64_t out = t.shape[0], in = t.shape[1], rank = rank_;
  const double scale = scale_;
  const std::vector<float> a = t.lora->a.download(), b = t.lora->b.download();
  const bool half = t.dtype != DType::F32;
  PerThreadScratch<double> accumulators(static_cast<size_t>(in));  // a row's sums
#pragma omp parallel num_threads(accumulators.threads())
  {
    double* acc = accumulators.mine();
#pragma omp for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
      std::fill(acc, acc + in, 0.0);
      for (int64_t k = 0; k < rank; ++k) {
        const double bk = b[static_cast<size_t>(o * rank + k)];
        const float* ak = a.data() + k * in;
        for (int64_t i = 0; i < in; ++i) acc[i] += bk * static_cast<double>(ak[i]);
      }
      float* row = values + o * in;
      for (int64_t i = 0; i < in; ++i) {
        const double x = static_cast<double>(row[i]) + scale * acc[i];
        row[i] = half ? round_to_odd_f32(x) : static_cast<float>(x);
      }
    }
  }
}

MergeReport merge_weights(const std::string& model_dir, const std::string& adapter_dir, const std::string& folder,
                          const std::string& dtype, int64_t max_shard_bytes) {
  parse_output_dtype(dtype);  // checked before the folder is
  if (max_shard_bytes <= 0) fail("merge: the maximum shard size must be positive, got ", max_shard_bytes);
  const bool folder_existed = fs::exists(folder);
  if (folder_existed) {
    if (!fs::is_directory(folder)) fail(folder, ": exists and is not a folder");
    if (!fs::is_empty(folder))
      fail(folder, ": already exists and is not empty; merge writes into a new or empty folder (nothing was written)");
  }

  const MergePlan merge(model_dir, adapter_dir, dtype);
  const std::vector<MergePlan::Tensor>& plan = merge.tensors();

  // Shards from the planned sizes: a new shard starts when the next tensor would overflow the current one.
  std::vector<std::vector<size_t>> shards;
  int64_t current = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (shards.empty() || (current > 0 && current + plan[i].nbytes > max_shard_bytes)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(i);
    current += plan[i].nbytes;
  }
  if (shards.empty()) fail(model_dir, ": the model has no tensors to write");

  MergeReport report;
  report.shards = static_cast<int64_t>(shards.size());
  std::vector<fs::path> written;
  MergeBuffers buffers;
  try {
    fs::create_directories(folder);
    for (size_t s = 0; s < shards.size(); ++s) {
      const std::string file = shard_name(static_cast<int64_t>(s), report.shards);
      SafetensorsWriter writer;
      writer.set_metadata("format", "pt");
      for (size_t i : shards[s]) {
        add_merged(writer, merge, plan[i], buffers);
        report.bytes += plan[i].nbytes;
        ++report.tensors;
      }
      const fs::path path = fs::path(folder) / file;
      writer.write(path.string());
      written.push_back(path);
      report.files.push_back(file);
    }
    if (report.shards > 1) {
      std::vector<std::pair<std::string, std::string>> entries;
      for (size_t s = 0; s < shards.size(); ++s)
        for (size_t i : shards[s]) entries.emplace_back(plan[i].name, shard_name(static_cast<int64_t>(s), report.shards));
      std::sort(entries.begin(), entries.end());
      json::Value weight_map = json::Value::object();
      for (const auto& [name, file] : entries) weight_map.set(name, json::Value::string(file));
      json::Value metadata = json::Value::object();
      metadata.set("total_size", json::Value::number(static_cast<double>(report.bytes)));
      json::Value index = json::Value::object();
      index.set("metadata", metadata);
      index.set("weight_map", weight_map);
      const fs::path path = fs::path(folder) / "model.safetensors.index.json";
      write_file_atomic(path.string(), index.dump(true) + "\n");
      written.push_back(path);
      report.files.push_back("model.safetensors.index.json");
    }
  } catch (...) {
    std::error_code ec;
    for (const fs::path& p : written) fs::remove(p, ec);
    if (!folder_existed) fs::remove(folder, ec);  // removes only an empty folder
    throw;
  }
  return report;
}

}  // namespace qlora
