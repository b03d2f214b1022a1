// Rotary position tables as transformers builds them: inv_freq[i] = theta^(-2i/d) in fp32, adjusted by the
// config's rope scaling (linear: divided by factor; llama3: low frequencies divided by factor, high ones kept, a
// smooth blend between), angle = position * inv_freq in fp32, then cos and sin.
#pragma once
#include <cstdint>
#include <vector>

#include "io/model_config.h"

namespace qlora {

std::vector<float> rope_inv_freq(const ModelConfig& config);

struct RopeTables {
  std::vector<float> cos, sin;  // [seq, head_dim / 2]
};

RopeTables build_rope_tables(const ModelConfig& config, int64_t seq);

}  // namespace qlora
