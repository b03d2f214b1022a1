// The NF4 code book and bitsandbytes' decision tree, once, for the CPU reference and the CUDA kernels alike
// (compiled as __host__ __device__ by nvcc), so that the two cannot drift apart by a bit.
#pragma once
#include <cstdint>

#include "util/host_device.h"

namespace qlora::nf4 {

// The value of each 4-bit code (bitsandbytes' NF4 table).
QLORA_HOST_DEVICE constexpr float code_value(int code) {
  switch (code & 15) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// bitsandbytes' dQuantizeNF4: the thresholds are its hard-coded midpoints (as float literals, not computed from the
// code values), compared with strict `>` so a value exactly on a midpoint takes the lower code. NaN falls through
// every comparison to code 0, as on the GPU.
QLORA_HOST_DEVICE constexpr uint8_t quantize_normalized(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

// The tree's 15 midpoints in ascending order. The tree is a binary search over them with strict >, so its code is
// the number of midpoints x exceeds (NaN exceeds none): the CPU's vector quantizer counts them (the static_asserts
// below, and a test at and beside each midpoint, check that both give the same code).
inline constexpr float kMidpoints[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f, -0.23460740596055984f,
    -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f, 0.2035212516784668f,
    0.2920137718319893f,  0.3893125355243683f,  0.5016634166240692f,  0.6427869200706482f,  0.8614784181118011f};

constexpr bool midpoints_match_tree() {
  for (int k = 0; k < 15; ++k) {
    if (quantize_normalized(kMidpoints[k]) != k) return false;  // on a midpoint: the lower code
    if (k > 0 && !(kMidpoints[k - 1] < kMidpoints[k])) return false;
  }
  return quantize_normalized(1.0f) == 15;
}
static_assert(midpoints_match_tree(), "kMidpoints must be the decision tree's thresholds in ascending order");

}  // namespace qlora::nf4
