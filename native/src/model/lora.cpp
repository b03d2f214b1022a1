#include "model/lora.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "io/safetensors.h"
#include "util/error.h"
#include "util/json.h"
#include "util/philox.h"

namespace qlora {

namespace {
constexpr std::array<const char*, kNumModules> kModuleNames = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"};
}

const char* module_name(Module m) { return kModuleNames[static_cast<int>(m)]; }
const char* module_parent(Module m) { return static_cast<int>(m) <= static_cast<int>(Module::O) ? "self_attn" : "mlp"; }

std::string module_path(int64_t layer, Module m) {
  return "model.layers." + std::to_string(layer) + "." + module_parent(m) + "." + module_name(m);
}

std::optional<Module> module_from_name(const std::string& name) {
  for (int i = 0; i < kNumModules; ++i)
    if (name == kModuleNames[i]) return static_cast<Module>(i);
  return std::nullopt;
}

std::array<int64_t, 2> module_shape(const ModelConfig& c, Module m) {
  const int64_t q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  switch (m) {
    case Module::Q: return {q_out, c.hidden_size};
    case Module::K: return {kv_out, c.hidden_size};
    case Module::V: return {kv_out, c.hidden_size};
    case Module::O: return {c.hidden_size, q_out};
    case Module::Gate: return {c.intermediate_size, c.hidden_size};
    case Module::Up: return {c.intermediate_size, c.hidden_size};
    case Module::Down: return {c.hidden_size, c.intermediate_size};
  }
  return {0, 0};
}

int64_t max_linear_in(const ModelConfig& c) {
  return std::max({c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size});
}

int64_t max_linear_size(const ModelConfig& c, int64_t extra) {
  int64_t best = 0;
  for (int m = 0; m < kNumModules; ++m) {
    const auto s = module_shape(c, static_cast<Module>(m));
    best = std::max({best, s[0] * (s[1] + extra), (s[0] + extra) * s[1]});
  }
  return best;
}

bool module_has_bias(const ModelConfig& c, Module m) {
  switch (m) {
    case Module::Q:
    case Module::K:
    case Module::V: return c.qkv_bias;
    case Module::O: return c.o_bias;
    default: return c.mlp_bias;
  }
}

double LoraConfig::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

LoraAdapter::LoraAdapter(Backend* backend, const ModelConfig& model, LoraConfig config)
    : backend_(backend), config_(std::move(config)) {
  if (config_.rank <= 0) fail("LoRA rank must be positive, got ", config_.rank);
  if (config_.dropout < 0.0 || config_.dropout >= 1.0) fail("LoRA dropout must be in [0, 1), got ", config_.dropout);
  if (config_.targets.empty()) fail("LoRA needs at least one target module");
  layers_.resize(static_cast<size_t>(model.num_layers));
  for (auto& layer : layers_)
    for (Module m : config_.targets) {
      auto p = std::make_unique<LoraParam>();
      const auto shape = module_shape(model, m);
      p->out = shape[0];
      p->in = shape[1];
      p->a.reset(backend, config_.rank * p->in, MemCategory::Adapters);
      p->b.reset(backend, p->out * config_.rank, MemCategory::Adapters);
      p->grad_a.reset(backend, config_.rank * p->in, MemCategory::Gradients);
      p->grad_b.reset(backend, p->out * config_.rank, MemCategory::Gradients);
      layer[static_cast<int>(m)] = std::move(p);
    }
  zero_grad();
}

std::unique_ptr<LoraAdapter> LoraAdapter::create(Backend* backend, const ModelConfig& model, const LoraConfig& config,
                                                 uint64_t seed) {
  std::unique_ptr<LoraAdapter> adapter(new LoraAdapter(backend, model, config));
  const Philox rng(seed, RngStream::LoraInit);
  for (size_t layer = 0; layer < adapter->layers_.size(); ++layer)
    for (int m = 0; m < kNumModules; ++m) {
      LoraParam* p = adapter->layers_[layer][m].get();
      if (!p) continue;
      // Each (layer, module) draws from its own range of the stream, so adding a target never shifts the others.
      const uint64_t offset = (static_cast<uint64_t>(layer) * kNumModules + static_cast<uint64_t>(m)) << 32;
      const float bound = 1.0f / std::sqrt(static_cast<float>(p->in));
      std::vector<float> a(static_cast<size_t>(p->a.size()));
      for (size_t i = 0; i < a.size(); ++i) a[i] = (2.0f * rng.uniform(offset + i) - 1.0f) * bound;
      p->a.upload(a);
      backend->fill_zero(p->b.get(), p->b.size());
    }
  return adapter;
}

std::string LoraAdapter::peft_tensor_name(int64_t layer, Module m, char which) {
  return "base_model.model." + module_path(layer, m) + ".lora_" + which + ".weight";
}

std::unique_ptr<LoraAdapter> LoraAdapter::load_peft(Backend* backend, const ModelConfig& model,
                                                    const std::string& dir) {
  const std::string config_path = (std::filesystem::path(dir) / "adapter_config.json").string();
  if (!std::filesystem::exists(config_path)) fail(dir, ": no adapter_config.json (is this a PEFT adapter folder?)");
  const json::Value cfg = json::Value::parse(read_text_file(config_path), config_path);
  auto key = [&](const char* k) { return config_path + ": " + k; };
  if (const json::Value* t = cfg.find("peft_type"); t && t->as_string(key("peft_type")) != "LORA")
    fail(config_path, ": peft_type '", t->as_string(key("peft_type")), "' is not supported (only LORA)");
  LoraConfig lc;
  const json::Value* r = cfg.find("r");
  if (!r) fail(config_path, ": missing 'r'");
  lc.rank = r->as_int(key("r"));
  if (const json::Value* a = cfg.find("lora_alpha")) lc.alpha = a->as_number(key("lora_alpha"));
  if (const json::Value* d = cfg.find("lora_dropout"); d && !d->is_null()) lc.dropout = d->as_number(key("lora_dropout"));
  if (const json::Value* rs = cfg.find("use_rslora"); rs && !rs->is_null()) lc.use_rslora = rs->as_bool(key("use_rslora"));
  if (const json::Value* dora = cfg.find("use_dora"); dora && dora->is_bool() && dora->as_bool(key("use_dora")))
    fail(config_path, ": DoRA adapters (use_dora) are not supported");
  if (const json::Value* bias = cfg.find("bias"); bias && !bias->is_null() && bias->as_string(key("bias")) != "none")
    fail(config_path, ": bias '", bias->as_string(key("bias")), "' is not supported (only 'none')");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (const json::Value* pat = cfg.find(k); pat && pat->is_object() && !pat->as_object(key(k)).empty())
      fail(config_path, ": per-module ", k, " is not supported");

  // target_modules: a list of module names (or a string); the tensors present decide which are loaded.
  const auto store = TensorStore::open_file((std::filesystem::path(dir) / "adapter_model.safetensors").string());
  std::set<int> present;
  for (const std::string& name : store->names()) {
    bool matched = false;
    for (int64_t layer = 0; layer < model.num_layers && !matched; ++layer)
      for (int m = 0; m < kNumModules && !matched; ++m)
        for (char w : {'A', 'B'})
          if (name == peft_tensor_name(layer, static_cast<Module>(m), w)) {
            present.insert(m);
            matched = true;
            break;
          }
    if (!matched)
      fail(store->file_of(name), ": unexpected tensor '", name,
           "' (expected base_model.model.model.layers.N.{self_attn|mlp}.<module>.lora_{A|B}.weight for layers 0..",
           model.num_layers - 1, ")");
  }
  if (present.empty()) fail(store->location(), ": adapter has no LoRA tensors");
  lc.targets.clear();
  for (int m : present) lc.targets.push_back(static_cast<Module>(m));

  std::unique_ptr<LoraAdapter> adapter(new LoraAdapter(backend, model, lc));
  for (int64_t layer = 0; layer < model.num_layers; ++layer)
    for (Module m : lc.targets) {
      LoraParam* p = adapter->param(layer, m);
      p->a.upload(store->read_f32(peft_tensor_name(layer, m, 'A'), {lc.rank, p->in}));
      p->b.upload(store->read_f32(peft_tensor_name(layer, m, 'B'), {p->out, lc.rank}));
    }
  return adapter;
}

void LoraAdapter::save_peft(const std::string& dir, const std::string& base_model_name) const {
  std::filesystem::create_directories(dir);
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  json::Value targets = json::Value::array();
  for (Module m : config_.targets) targets.push_back(json::Value::string(module_name(m)));
  for (int64_t layer = 0; layer < num_layers(); ++layer)
    for (Module m : config_.targets) {
      const LoraParam* p = param(layer, m);
      writer.add_f32(peft_tensor_name(layer, m, 'A'), {config_.rank, p->in}, p->a.download());
      writer.add_f32(peft_tensor_name(layer, m, 'B'), {p->out, config_.rank}, p->b.download());
    }
  writer.write((std::filesystem::path(dir) / "adapter_model.safetensors").string());

  json::Value cfg = json::Value::object();
  cfg.set("peft_type", json::Value::string("LORA"));
  cfg.set("task_type", json::Value::string("CAUSAL_LM"));
  cfg.set("base_model_name_or_path", json::Value::string(base_model_name));
  cfg.set("r", json::Value::number(static_cast<double>(config_.rank)));
  cfg.set("lora_alpha", json::Value::number(config_.alpha));
  cfg.set("lora_dropout", json::Value::number(config_.dropout));
  cfg.set("target_modules", targets);
  cfg.set("bias", json::Value::string("none"));
  cfg.set("use_rslora", json::Value::boolean(config_.use_rslora));
  cfg.set("use_dora", json::Value::boolean(false));
  cfg.set("fan_in_fan_out", json::Value::boolean(false));
  cfg.set("init_lora_weights", json::Value::boolean(true));
  cfg.set("inference_mode", json::Value::boolean(true));
  cfg.set("modules_to_save", json::Value::null());
  write_file_atomic((std::filesystem::path(dir) / "adapter_config.json").string(), cfg.dump(true) + "\n");
}

void LoraAdapter::save_gradients(const std::string& path) const {
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (int64_t layer = 0; layer < num_layers(); ++layer)
    for (Module m : config_.targets) {
      const LoraParam* p = param(layer, m);
      writer.add_f32(peft_tensor_name(layer, m, 'A'), {config_.rank, p->in}, p->grad_a.download());
      writer.add_f32(peft_tensor_name(layer, m, 'B'), {p->out, config_.rank}, p->grad_b.download());
    }
  writer.write(path);
}

int64_t LoraAdapter::num_parameters() const {
  int64_t n = 0;
  for (const auto& layer : layers_)
    for (const auto& p : layer)
      if (p) n += p->a.size() + p->b.size();
  return n;
}

void LoraAdapter::zero_grad() {
  for (auto& layer : layers_)
    for (auto& p : layer)
      if (p) {
        backend_->fill_zero(p->grad_a.get(), p->grad_a.size());
        backend_->fill_zero(p->grad_b.get(), p->grad_b.size());
      }
}

std::vector<std::pair<DeviceArray<float>*, DeviceArray<float>*>> LoraAdapter::parameters_and_grads() {
  std::vector<std::pair<DeviceArray<float>*, DeviceArray<float>*>> out;
  for (auto& layer : layers_)
    for (auto& p : layer)
      if (p) {
        out.emplace_back(&p->a, &p->grad_a);
        out.emplace_back(&p->b, &p->grad_b);
      }
  return out;
}

std::vector<std::string> LoraAdapter::parameter_names() const {
  std::vector<std::string> out;
  for (size_t layer = 0; layer < layers_.size(); ++layer)
    for (int m = 0; m < kNumModules; ++m)
      if (layers_[layer][m]) {
        out.push_back(peft_tensor_name(static_cast<int64_t>(layer), static_cast<Module>(m), 'A'));
        out.push_back(peft_tensor_name(static_cast<int64_t>(layer), static_cast<Module>(m), 'B'));
      }
  return out;
}

}  // namespace qlora
