// config.json of a Hugging Face causal LM: the fields the engine needs, for LlamaForCausalLM,
// MistralForCausalLM and Qwen2ForCausalLM. Reads both forms in the wild: transformers 5 (`rope_parameters`,
// `dtype`) and the older Hub form (`rope_theta`, `rope_scaling` with `rope_type` or `type`, `torch_dtype`).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qlora {

struct RopeScaling {
  enum class Kind { None, Linear, Llama3 };
  Kind kind = Kind::None;
  double factor = 1.0;
  double low_freq_factor = 1.0;                   // llama3
  double high_freq_factor = 4.0;                  // llama3
  int64_t original_max_position_embeddings = 0;  // llama3
};

struct QuantizationConfig {  // config.json's quantization_config for bitsandbytes 4-bit checkpoints
  bool load_in_4bit = false;
  std::string quant_type;  // "nf4" (fp4 is rejected when tensors are read)
  bool double_quant = false;
  std::string compute_dtype;
};

struct ModelConfig {
  std::string architecture;  // e.g. "LlamaForCausalLM"
  std::string model_type;    // "llama", "mistral", "qwen2"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_heads when absent
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // Qwen2 always; Llama when attention_bias
  bool o_bias = false;    // Llama when attention_bias
  bool mlp_bias = false;  // Llama when mlp_bias
  int64_t max_position_embeddings = 0;
  // Sliding-window attention (Mistral; Qwen2 with use_sliding_window): 0 when the model has none. Sequences up to
  // the window attend exactly as full causal attention, which is all the engine computes.
  int64_t sliding_window = 0;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // eos_token_id may be an int or a list
  std::string dtype;                   // "float32", "bfloat16", "float16" (from dtype or torch_dtype; "" if absent)
  std::optional<QuantizationConfig> quantization;
};

// Parses config.json text. Errors name `source` (the file path) and the key: "<source>: num_attention_heads (7)
// does not divide hidden_size (128)"; an unknown architecture is "<source>: architecture 'GPT2LMHeadModel' is not
// supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)".
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
ModelConfig load_model_config(const std::string& model_dir);  // reads <model_dir>/config.json

}  // namespace qlora
