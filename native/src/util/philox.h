// One counter-based generator for every random number the engine draws (LoRA init, dropout masks), Philox4x32-10
// keyed by the run's seed, with the counter built from (element index, stream id, step). Any element can be drawn
// independently, so the CPU and GPU paths produce the same numbers and a resumed run continues the same sequence:
// the seed and step are the whole generator state.
#pragma once
#include <array>
#include <cstdint>

#include "util/philox_core.h"

namespace qlora {

// Stream ids: one per use, so two uses with the same seed and step never share numbers.
enum class RngStream : uint32_t {
  LoraInit = 1,
  Dropout = 2,
  Shuffle = 3,
  TinyModelInit = 4,
  Sampling = 5,  // token draws in generation (drawn in TypeScript)
  BenchWeights = 6,  // the random weights of `bench --shape`
};

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

class Philox {
 public:
  Philox(uint64_t seed, RngStream stream, uint32_t step = 0)
      : key_{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
        stream_(static_cast<uint32_t>(stream)),
        step_(step) {}

  // Four 32-bit words for block `block` (elements 4*block .. 4*block+3).
  std::array<uint32_t, 4> block(uint64_t block_index) const {
    return philox4x32({static_cast<uint32_t>(block_index), static_cast<uint32_t>(block_index >> 32), stream_, step_},
                      key_);
  }
  uint32_t bits(uint64_t index) const { return block(index >> 2)[index & 3]; }
  // Uniform in [0, 1) with 24 bits, identical on every device.
  float uniform(uint64_t index) const { return philox_uniform(bits(index)); }
  // Standard normal from two uniforms (Box-Muller); element i uses words 2i and 2i+1.
  float normal(uint64_t index) const;

  // What block() feeds philox4x32: the key, and the counter's last two words (its first two are the block index),
  // for code that computes many blocks at once.
  std::array<uint32_t, 2> key() const { return key_; }
  uint32_t stream_word() const { return stream_; }
  uint32_t step_word() const { return step_; }

 private:
  std::array<uint32_t, 2> key_;
  uint32_t stream_;
  uint32_t step_;
};

}  // namespace qlora
