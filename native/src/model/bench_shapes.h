// The shapes `bench --shape` trains on without any files: Llama-3.2-1B, Llama-3.1-8B and Llama-3-70B exactly as
// their config.json describe them (vocabulary, widths, layers, heads, GQA, RoPE), and a tiny one for quick runs.
#pragma once
#include <string>
#include <vector>

#include "io/model_config.h"

namespace qlora {

// "tiny", "1b", "8b" or "70b"; an EngineError naming the known shapes otherwise.
ModelConfig bench_shape(const std::string& name);
std::vector<std::string> bench_shape_names();

}  // namespace qlora
