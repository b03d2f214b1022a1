#include "io/model_config.h"

#include <filesystem>
#include <system_error>

#include "io/folder_hints.h"
#include "io/safetensors.h"
#include "util/error.h"
#include "util/json.h"

namespace qlora {

namespace {

constexpr const char* kSupported = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";
// Upper bounds of a config's sizes, far past every published model (Reader::size).
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxWidth = int64_t{1} << 17;
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxHeads = 4096;
constexpr int64_t kMaxHeadDim = 4096;

// Typed access to config keys; a JSON null counts as absent, as transformers treats it. Errors name the file and
// key ("<source>: hidden_size: expected a number, got a string"); `prefix` names the enclosing object for keys of
// nested objects ("rope_scaling.").
struct Reader {
  const json::Value& root;
  const std::string& source;

  std::string where(const std::string& key) const { return source + ": " + key; }
  const json::Value* get(const json::Value& obj, const std::string& key) const {
    const json::Value* v = obj.find(key);
    return v && !v->is_null() ? v : nullptr;
  }
  int64_t required_int(const std::string& key) const {
    const json::Value* v = get(root, key);
    if (!v) fail(source, ": missing '", key, "'");
    return v->as_int(where(key));
  }
  int64_t positive_int(const std::string& key) const {
    const int64_t v = required_int(key);
    if (v <= 0) fail(source, ": ", key, " must be positive, got ", v);
    return v;
  }
  // A size no model comes near (the largest have 126 layers, 128 heads, vocabularies of 262,144), refused before
  // anything is sized from it: a config.json saying 20 million layers would otherwise exhaust memory building them.
  int64_t size(const std::string& key, int64_t limit) const {
    const int64_t v = positive_int(key);
    if (v > limit) fail(source, ": ", key, " is ", v, ", more than any model this engine loads has (at most ", limit, ")");
    return v;
  }
  std::optional<double> number(const json::Value& obj, const std::string& key, const std::string& prefix = "") const {
    const json::Value* v = get(obj, key);
    return v ? std::optional<double>(v->as_number(where(prefix + key))) : std::nullopt;
  }
  std::optional<int64_t> integer(const json::Value& obj, const std::string& key, const std::string& prefix = "") const {
    const json::Value* v = get(obj, key);
    return v ? std::optional<int64_t>(v->as_int(where(prefix + key))) : std::nullopt;
  }
  std::optional<bool> boolean(const json::Value& obj, const std::string& key, const std::string& prefix = "") const {
    const json::Value* v = get(obj, key);
    return v ? std::optional<bool>(v->as_bool(where(prefix + key))) : std::nullopt;
  }
  std::optional<std::string> string(const json::Value& obj, const std::string& key,
                                    const std::string& prefix = "") const {
    const json::Value* v = get(obj, key);
    return v ? std::optional<std::string>(v->as_string(where(prefix + key))) : std::nullopt;
  }
};

// Reads the scaling part of rope_parameters (transformers 5) or rope_scaling (older configs, where the kind is
// `rope_type` or, older still, `type`). Only the kinds the engine computes exactly are accepted; the others (yarn,
// dynamic, longrope, ...) change attention in ways a silent fallback would get wrong.
void read_rope_scaling(const Reader& r, const json::Value& obj, const std::string& what, ModelConfig& c) {
  const std::string prefix = what + ".";
  const std::string type =
      r.string(obj, "rope_type", prefix).value_or(r.string(obj, "type", prefix).value_or("default"));
  RopeScaling& s = c.rope_scaling;
  if (type == "default") {
    s.kind = RopeScaling::Kind::None;
    return;
  }
  auto required = [&](const char* key) {
    const auto v = r.number(obj, key, prefix);
    if (!v) fail(r.source, ": ", what, ".", key, " is required for rope type '", type, "'");
    return *v;
  };
  if (type == "linear") {
    s.kind = RopeScaling::Kind::Linear;
    s.factor = required("factor");
  } else if (type == "llama3") {
    s.kind = RopeScaling::Kind::Llama3;
    s.factor = required("factor");
    s.low_freq_factor = required("low_freq_factor");
    s.high_freq_factor = required("high_freq_factor");
    const auto original = r.integer(obj, "original_max_position_embeddings", prefix);
    if (!original || *original <= 0)
      fail(r.source, ": ", what, ".original_max_position_embeddings must be a positive integer for rope type 'llama3'");
    s.original_max_position_embeddings = *original;
    // The llama3 formula divides by high_freq_factor - low_freq_factor.
    if (s.high_freq_factor <= s.low_freq_factor)
      fail(r.source, ": ", what, ".high_freq_factor must exceed low_freq_factor");
  } else {
    fail(r.source, ": rope scaling type '", type, "' is not supported (supported: default, linear, llama3)");
  }
  if (!(s.factor > 0)) fail(r.source, ": ", what, ".factor must be positive");
}

}  // namespace

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  const json::Value root = json::Value::parse(json_text, source);
  if (!root.is_object()) fail(source, ": is not a JSON object");
  const Reader r{root, source};
  ModelConfig c;
  c.model_type = r.string(root, "model_type").value_or("");
  // architectures[0] names the class transformers instantiates; configs written by hand may only give model_type.
  const json::Value* archs = r.get(root, "architectures");
  const std::vector<json::Value>* arch_list = archs ? &archs->as_array(r.where("architectures")) : nullptr;
  if (arch_list && !arch_list->empty()) {
    c.architecture = (*arch_list)[0].as_string(r.where("architectures[0]"));
  } else if (c.model_type == "llama") {
    c.architecture = "LlamaForCausalLM";
  } else if (c.model_type == "mistral") {
    c.architecture = "MistralForCausalLM";
  } else if (c.model_type == "qwen2") {
    c.architecture = "Qwen2ForCausalLM";
  } else if (c.model_type.empty()) {
    fail(source, ": has neither architectures nor model_type (supported: ", kSupported, ")");
  } else {
    fail(source, ": model_type '", c.model_type, "' is not supported and no architectures are given (supported: ",
         kSupported, ")");
  }
  const bool llama_like = c.architecture == "LlamaForCausalLM" || c.architecture == "MistralForCausalLM";
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  if (!llama_like && !qwen2)
    fail(source, ": architecture '", c.architecture, "' is not supported (supported: ", kSupported, ")");
  if (c.model_type.empty())
    c.model_type = qwen2 ? "qwen2" : c.architecture == "MistralForCausalLM" ? "mistral" : "llama";

  c.vocab_size = r.size("vocab_size", kMaxVocab);
  c.hidden_size = r.size("hidden_size", kMaxWidth);
  c.intermediate_size = r.size("intermediate_size", kMaxWidth * 8);
  c.num_layers = r.size("num_hidden_layers", kMaxLayers);
  c.num_heads = r.size("num_attention_heads", kMaxHeads);
  c.num_kv_heads = r.get(root, "num_key_value_heads") ? r.size("num_key_value_heads", kMaxHeads) : c.num_heads;
  if (c.num_heads % c.num_kv_heads != 0)
    fail(source, ": num_key_value_heads (", c.num_kv_heads, ") does not divide num_attention_heads (", c.num_heads,
         ")");
  if (r.get(root, "head_dim")) {
    c.head_dim = r.size("head_dim", kMaxHeadDim);
  } else {
    if (c.hidden_size % c.num_heads != 0)
      fail(source, ": num_attention_heads (", c.num_heads, ") does not divide hidden_size (", c.hidden_size,
           ") and head_dim is not given");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) fail(source, ": head_dim (", c.head_dim, ") must be even for rotary embeddings");
  if (const auto act = r.string(root, "hidden_act"); act && *act != "silu")
    fail(source, ": hidden_act '", *act, "' is not supported (only silu)");
  c.rms_norm_eps = r.number(root, "rms_norm_eps").value_or(1e-6);
  if (!(c.rms_norm_eps > 0)) fail(source, ": rms_norm_eps must be positive, got ", json::format_double(c.rms_norm_eps));
  c.max_position_embeddings = r.get(root, "max_position_embeddings") ? r.positive_int("max_position_embeddings") : 0;
  // transformers defaults to untied for all three (Qwen2 configs usually state it).
  c.tie_word_embeddings = r.boolean(root, "tie_word_embeddings").value_or(false);
  // Qwen2 has a sliding_window key that only counts with use_sliding_window; Mistral's counts whenever it is set.
  // A window that covers every position the model supports is no window at all.
  // Without the key, MistralConfig's default is a window of 4096 (the configs transformers saves always state it,
  // null where there is none).
  const bool uses_window = qwen2 ? r.boolean(root, "use_sliding_window").value_or(false) : true;
  const bool mistral = c.architecture == "MistralForCausalLM";
  if (uses_window && r.get(root, "sliding_window")) {
    c.sliding_window = r.positive_int("sliding_window");
  } else if (mistral && root.find("sliding_window") == nullptr) {
    c.sliding_window = 4096;
  }
  if (c.max_position_embeddings > 0 && c.sliding_window >= c.max_position_embeddings) c.sliding_window = 0;
  // Qwen2 always has q/k/v biases and never an o_proj bias; Llama and Mistral have either all four or none.
  if (qwen2) {
    c.qkv_bias = true;
  } else {
    const bool attention_bias = r.boolean(root, "attention_bias").value_or(false);
    c.qkv_bias = c.o_bias = attention_bias;
    c.mlp_bias = r.boolean(root, "mlp_bias").value_or(false);
  }

  // Rotary embeddings: transformers 5 writes rope_parameters; Hub configs carry rope_theta and rope_scaling.
  if (const json::Value* params = r.get(root, "rope_parameters")) {
    if (!params->is_object()) fail(source, ": rope_parameters is not an object");
    c.rope_theta =
        r.number(*params, "rope_theta", "rope_parameters.").value_or(r.number(root, "rope_theta").value_or(10000.0));
    read_rope_scaling(r, *params, "rope_parameters", c);
  } else {
    c.rope_theta = r.number(root, "rope_theta").value_or(10000.0);
    if (const json::Value* scaling = r.get(root, "rope_scaling")) {
      if (!scaling->is_object()) fail(source, ": rope_scaling is not an object");
      read_rope_scaling(r, *scaling, "rope_scaling", c);
    }
  }
  if (!(c.rope_theta > 0)) fail(source, ": rope_theta must be positive");

  if (const json::Value* bos = r.get(root, "bos_token_id")) c.bos_token_id = bos->as_int(r.where("bos_token_id"));
  if (const json::Value* eos = r.get(root, "eos_token_id")) {
    if (eos->is_array()) {
      for (const json::Value& e : eos->as_array(r.where("eos_token_id")))
        c.eos_token_ids.push_back(e.as_int(r.where("eos_token_id")));
    } else {
      c.eos_token_ids.push_back(eos->as_int(r.where("eos_token_id")));
    }
  }
  c.dtype = r.string(root, "dtype").value_or(r.string(root, "torch_dtype").value_or(""));

  // Only pre-quantized bitsandbytes 4-bit checkpoints can be read; other methods store weights in layouts the
  // engine does not decode.
  if (const json::Value* q = r.get(root, "quantization_config")) {
    if (!q->is_object()) fail(source, ": quantization_config is not an object");
    const std::string qp = "quantization_config.";
    const auto method_value = r.string(*q, "quant_method", qp);
    if (!method_value) fail(source, ": quantization_config has no quant_method");
    const std::string& method = *method_value;
    if (method != "bitsandbytes")
      fail(source, ": quantization method '", method, "' is not supported (only bitsandbytes 4-bit)");
    if (r.boolean(*q, "load_in_8bit", qp).value_or(r.boolean(*q, "_load_in_8bit", qp).value_or(false)))
      fail(source, ": 8-bit bitsandbytes checkpoints are not supported (only 4-bit NF4)");
    QuantizationConfig qc;
    qc.load_in_4bit = r.boolean(*q, "load_in_4bit", qp).value_or(r.boolean(*q, "_load_in_4bit", qp).value_or(false));
    // fp4 is BitsAndBytesConfig's default when the key is absent.
    qc.quant_type = r.string(*q, "bnb_4bit_quant_type", qp).value_or("fp4");
    if (qc.load_in_4bit && qc.quant_type != "nf4")
      fail(source, ": bnb_4bit_quant_type '", qc.quant_type, "' is not supported (only nf4)");
    qc.double_quant = r.boolean(*q, "bnb_4bit_use_double_quant", qp).value_or(false);
    qc.compute_dtype = r.string(*q, "bnb_4bit_compute_dtype", qp).value_or("float32");
    c.quantization = qc;
  }
  return c;
}

ModelConfig load_model_config(const std::string& model_dir) {
  const std::filesystem::path path = std::filesystem::path(model_dir) / "config.json";
  std::error_code ec;
  if (std::filesystem::is_regular_file(model_dir, ec)) {
    if (std::filesystem::path(model_dir).extension() == ".gguf")
      fail(model_dir, " is a llama.cpp file; training needs the model's Hugging Face release (a folder with "
                      "config.json, safetensors and tokenizer.json)");
    fail(model_dir, " is a file; name the model's folder (the one that holds config.json and the safetensors)");
  }
  if (!std::filesystem::is_regular_file(path, ec)) {
    const std::string hint = config_hint(model_dir);
    if (!hint.empty()) fail(model_dir, ": no config.json", hint);
    fail(model_dir, ": no config.json (is this a Hugging Face model folder?)");
  }
  return parse_model_config(read_text_file(path.string()), path.string());
}

}  // namespace qlora
