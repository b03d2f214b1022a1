#include "model/bench_shapes.h"

#include "util/error.h"

namespace qlora {

namespace {

ModelConfig llama3(int64_t hidden, int64_t intermediate, int64_t layers, int64_t heads, bool tied) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.vocab_size = 128256;
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = 8;
  c.head_dim = hidden / heads;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.tie_word_embeddings = tied;
  c.max_position_embeddings = 131072;
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001};
  c.dtype = "bfloat16";
  return c;
}

RopeScaling llama3_rope(double factor) {
  RopeScaling r;
  r.kind = RopeScaling::Kind::Llama3;
  r.factor = factor;
  r.low_freq_factor = 1.0;
  r.high_freq_factor = 4.0;
  r.original_max_position_embeddings = 8192;
  return r;
}

}  // namespace

std::vector<std::string> bench_shape_names() { return {"tiny", "1b", "8b", "70b"}; }

ModelConfig bench_shape(const std::string& name) {
  if (name == "1b") {  // meta-llama/Llama-3.2-1B
    ModelConfig c = llama3(2048, 8192, 16, 32, true);
    c.rope_scaling = llama3_rope(32.0);
    return c;
  }
  if (name == "8b") {  // meta-llama/Llama-3.1-8B
    ModelConfig c = llama3(4096, 14336, 32, 32, false);
    c.rope_scaling = llama3_rope(8.0);
    return c;
  }
  if (name == "70b") {  // meta-llama/Meta-Llama-3-70B (no RoPE scaling, 8192 positions)
    ModelConfig c = llama3(8192, 28672, 80, 64, false);
    c.max_position_embeddings = 8192;
    return c;
  }
  if (name == "tiny") {  // Llama 3 proportions at a width a CPU trains in seconds
    ModelConfig c = llama3(256, 704, 4, 8, true);
    c.vocab_size = 8192;
    c.num_kv_heads = 2;
    c.max_position_embeddings = 8192;
    return c;
  }
  fail("unknown benchmark shape '", name, "' (known: tiny, 1b, 8b, 70b)");
}

}  // namespace qlora
