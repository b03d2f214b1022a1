// LoRA adapters on the linear layers of the decoder blocks, kept in fp32 as PEFT keeps them, with PEFT's file
// format in and out (adapter_config.json + adapter_model.safetensors, tensors named
// base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight; A [r, in], B [out, r]).
#pragma once
#include <array>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/model_config.h"

namespace qlora {

enum class Module { Q = 0, K, V, O, Gate, Up, Down };
constexpr int kNumModules = 7;
// The linears whose forward a checkpointed block's recomputation runs: all but down, whose output (the block's)
// backward does not need.
constexpr std::array<Module, 6> kRecomputedModules = {Module::Q, Module::K,    Module::V,
                                                      Module::O, Module::Gate, Module::Up};
const char* module_name(Module m);    // "q_proj"
const char* module_parent(Module m);  // "self_attn" or "mlp"
// The base model's name of a linear, without ".weight"/".bias": "model.layers.3.self_attn.q_proj".
std::string module_path(int64_t layer, Module m);
std::optional<Module> module_from_name(const std::string& name);
// [out, in] of a module's base weight.
std::array<int64_t, 2> module_shape(const ModelConfig& config, Module m);
// The widest input of any linear (hidden, q heads or intermediate size).
int64_t max_linear_in(const ModelConfig& config);
// The largest linear [out, in], with room for `extra` more columns (LoRA's B beside W in the forward GEMM) or rows
// (its A under W in backward's).
int64_t max_linear_size(const ModelConfig& config, int64_t extra = 0);
// Whether the base layer has a bias: q/k/v with qkv_bias (Qwen2), o with o_bias, the MLP with mlp_bias.
bool module_has_bias(const ModelConfig& config, Module m);

struct LoraConfig {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;
  std::vector<Module> targets = {Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down};
  // alpha / r, or alpha / sqrt(r) with rsLoRA.
  double scale() const;
};

struct LoraParam {
  int64_t in = 0, out = 0;
  DeviceArray<float> a, b;            // A [r, in], B [out, r]
  DeviceArray<float> grad_a, grad_b;  // same shapes, accumulated across micro-batches
};

class LoraAdapter {
 public:
  // New adapter: A Kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) from the counter-based generator
  // keyed by `seed`, B zero, as PEFT initializes.
  static std::unique_ptr<LoraAdapter> create(Backend* backend, const ModelConfig& model, const LoraConfig& config,
                                             uint64_t seed);
  // Reads a PEFT adapter folder; every tensor's shape is checked against the model, and unknown or missing tensors
  // are errors naming the file and tensor.
  static std::unique_ptr<LoraAdapter> load_peft(Backend* backend, const ModelConfig& model, const std::string& dir);

  // Writes adapter_config.json and adapter_model.safetensors (each atomically) in PEFT's layout.
  void save_peft(const std::string& dir, const std::string& base_model_name) const;
  // Writes d loss / d A, B under PEFT's names as a safetensors file.
  void save_gradients(const std::string& path) const;

  const LoraConfig& config() const { return config_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  LoraParam* param(int64_t layer, Module m) const { return layers_[layer][static_cast<int>(m)].get(); }
  int64_t num_parameters() const;
  void zero_grad();
  // Every parameter and its gradient, in a fixed order (layer, module, A then B), for the optimizer.
  std::vector<std::pair<DeviceArray<float>*, DeviceArray<float>*>> parameters_and_grads();
  // PEFT names of the parameters, in the order of parameters_and_grads().
  std::vector<std::string> parameter_names() const;

  static std::string peft_tensor_name(int64_t layer, Module m, char which);  // which = 'A' or 'B'

 private:
  LoraAdapter(Backend* backend, const ModelConfig& model, LoraConfig config);
  Backend* backend_;
  LoraConfig config_;
  std::vector<std::array<std::unique_ptr<LoraParam>, kNumModules>> layers_;
};

}  // namespace qlora
