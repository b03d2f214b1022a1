#include "util/philox.h"

#include <cmath>

namespace qlora {

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  const PhiloxWords r = philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
  return {r.w[0], r.w[1], r.w[2], r.w[3]};
}

float Philox::normal(uint64_t index) const {
  // u1 in (0, 1] so that log(u1) is finite.
  float u1 = 1.0f - uniform(2 * index);
  float u2 = uniform(2 * index + 1);
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853071795864769f * u2);
}

}  // namespace qlora
