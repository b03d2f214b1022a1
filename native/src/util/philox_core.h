// Philox4x32-10 itself, for the CPU (util/philox.h, and cpu/simd_f32.cpp's dropout on vectors of counters) and the
// GPU kernels (cuda/kernels.cuh) alike.
#pragma once
#include <cstdint>

#include "util/host_device.h"

namespace qlora {

struct PhiloxWords {
  uint32_t w[4];
};

// The ten rounds on counter words (c0, c1, c2, c3, of type W) under key (k0, k1), in place; mul_hi_lo(m, a, hi, lo)
// splits the 64-bit product m * a. A macro, so that the one definition expands inside functions built for an
// instruction set of their own (cpu/simd_f32.cpp's dropout on AVX-512 and AVX2) with their multiplies inlined: GCC
// does not inline a target's function into a template compiled for the baseline.
#define QLORA_PHILOX4X32_10_ROUNDS(W, c0, c1, c2, c3, k0, k1, mul_hi_lo) \
  for (int philox_round_ = 0; philox_round_ < 10; ++philox_round_) {   \
    W hi0_, lo0_, hi1_, lo1_;                                           \
    mul_hi_lo(0xD2511F53u, c0, hi0_, lo0_);                             \
    mul_hi_lo(0xCD9E8D57u, c2, hi1_, lo1_);                             \
    const W n0_ = hi1_ ^ c1 ^ k0, n2_ = hi0_ ^ c3 ^ k1;                 \
    c0 = n0_;                                                           \
    c1 = lo1_;                                                          \
    c2 = n2_;                                                           \
    c3 = lo0_;                                                          \
    k0 += 0x9E3779B9u;                                                  \
    k1 += 0xBB67AE85u;                                                  \
  }

// The rounds for W = uint32_t, or a vector of them (the CPU's dropout computes several counters at once).
template <typename W, typename MulHiLo>
QLORA_HOST_DEVICE inline void philox4x32_10_rounds(W& c0, W& c1, W& c2, W& c3, uint32_t k0, uint32_t k1,
                                                   const MulHiLo& mul_hi_lo) {
  QLORA_PHILOX4X32_10_ROUNDS(W, c0, c1, c2, c3, k0, k1, mul_hi_lo);
}

struct PhiloxMulHiLo {
  QLORA_HOST_DEVICE void operator()(uint32_t m, uint32_t a, uint32_t& hi, uint32_t& lo) const {
    const uint64_t product = static_cast<uint64_t>(m) * a;
    hi = static_cast<uint32_t>(product >> 32);
    lo = static_cast<uint32_t>(product);
  }
};

// The four words of counter (c0, c1, c2, c3) under key (k0, k1), ten rounds.
QLORA_HOST_DEVICE inline PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                   uint32_t k1) {
  philox4x32_10_rounds(c0, c1, c2, c3, k0, k1, PhiloxMulHiLo{});
  return PhiloxWords{{c0, c1, c2, c3}};
}

// A uniform in [0, 1) with 24 bits from one word, identical on every device.
QLORA_HOST_DEVICE inline float philox_uniform(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

}  // namespace qlora
