// expf for many values at once, with the results of glibc's expf: attention's softmax called expf once a score (a
// call each, its arguments and sum spilled around it), which was a third of the CPU's attention forward.
//
// The algorithm is the one glibc (2.28 and later) and musl use for expf, from Arm's optimized routines, evaluated
// in double precision: with k = round(x 32/ln 2) and r = x 32/ln 2 - k, exp(x) = 2^(k/32) 2^(r/32), where 2^(k/32)
// is a table entry for k mod 32 with k div 32 added to its exponent and 2^(r/32) a cubic in r; the double result,
// within 2^-33 of exp(x) relatively, is rounded to float once. Its error before that rounding is so small that the
// float is the correctly rounded exp(x) in all but rare cases, and is glibc's (tested on every 61st float of the
// range that matters); glibc's FMA build (the one x86-64 CPUs with FMA run) rounds its polynomial's sums a little
// differently, which moves a float result only where exp(x) lies within about 2^-50 of a rounding boundary.
// Eight values at a time in GCC/Clang vectors; the scalar version (the tail, and other compilers) computes the same.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "util/simd_clones.h"

namespace qlora::cpu {

namespace vector_exp_detail {

constexpr double kInvLn2N = 0x1.71547652b82fep+0 * 32;  // 32 / ln 2
constexpr double kShift = 0x1.8p+52;  // z + kShift rounds z to an integer (ties to even) in the low bits
// 2^(r/32) ~ 1 + C2 r + C1 r^2 + C0 r^3 for |r| <= 1/2: the minimax cubic of the routines above
constexpr double kC0 = 0x1.c6af84b912394p-5 / 32 / 32 / 32;
constexpr double kC1 = 0x1.ebfce50fac4f3p-3 / 32 / 32;
constexpr double kC2 = 0x1.62e42ff0c52d6p-1 / 32;
// The bits of 2^(i/32) rounded to double, less i << 47, so that adding k << 47 for k = 32 q + i gives 2^(k/32)
// (computed here with 60-digit decimals; the test checks them against exp2l).
constexpr uint64_t kTable[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
    0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
    0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540};
// Past these exp overflows to infinity or underflows to 0 (below it the double path would round to 0 or the least
// subnormal wrongly).
constexpr float kOverflow = 0x1.62e42ep6f;
constexpr float kUnderflow = -0x1.9fe368p6f;

// t = the table entry of each k mod 32. (Vectors go by reference: GCC warns of 64-byte ones passed by value.)
inline void table_entries(const uint64_t& k, uint64_t& t) { t = kTable[k % 32]; }
#if defined(__GNUC__) || defined(__clang__)
typedef uint64_t U8 __attribute__((vector_size(64)));
QLORA_ALWAYS_INLINE void table_entries(const U8& k, U8& t) {
  for (int l = 0; l < 8; ++l) t[l] = kTable[k[l] % 32];
}
#endif

// out = exp(x) in double, for x (a float's value) past neither threshold: D is double with U uint64_t, or vectors of
// them.
template <typename D, typename U>
QLORA_ALWAYS_INLINE void exp_of_float_value(const D& x, D& out) {
  const D z = kInvLn2N * x;
  D kd = z + kShift;
  U k;
  std::memcpy(&k, &kd, sizeof k);
  kd -= kShift;
  const D r = z - kd;
  U t;
  table_entries(k, t);
  t += k << 47;
  D s;
  std::memcpy(&s, &t, sizeof s);
  const D p = kC0 * r + kC1;
  const D r2 = r * r;
  D y = kC2 * r + 1.0;
  y = p * r2 + y;
  out = y * s;
}

}  // namespace vector_exp_detail

// exp(x), the same bits as exp_shifted's lanes.
inline float exp_like_glibc(float x) {
  using namespace vector_exp_detail;
  if (std::isnan(x)) return x + x;
  if (x > kOverflow) return INFINITY;
  if (x < kUnderflow) return 0.0f;
  double y;
  exp_of_float_value<double, uint64_t>(static_cast<double>(x), y);
  return static_cast<float>(y);
}

// x[i] = exp(x[i] - shift) for i < n, each difference rounded to float first (as a plain loop computes it).
QLORA_ALWAYS_INLINE void exp_shifted(float* x, int64_t n, float shift) {
  using namespace vector_exp_detail;
  int64_t i = 0;
#if defined(__GNUC__) || defined(__clang__)
  typedef float F8 __attribute__((vector_size(32)));
  typedef int32_t I8 __attribute__((vector_size(32)));
  typedef double D8 __attribute__((vector_size(64)));
  for (; i + 8 <= n; i += 8) {
    F8 xf;
    std::memcpy(&xf, x + i, sizeof xf);
    xf -= shift;
    D8 y;
    exp_of_float_value<D8, U8>(__builtin_convertvector(xf, D8), y);
    const F8 e = __builtin_convertvector(y, F8);
    // the special cases exp_like_glibc takes first; lanes past them computed garbage, replaced here
    I8 bits, nan_bits;
    std::memcpy(&bits, &e, sizeof bits);
    const F8 doubled = xf + xf;  // a NaN's quiet self
    std::memcpy(&nan_bits, &doubled, sizeof nan_bits);
    const I8 overflow = xf > kOverflow, underflow = xf < kUnderflow, nan = xf != xf;
    bits = (bits & ~overflow) | (overflow & 0x7f800000);
    bits &= ~underflow;
    bits = (bits & ~nan) | (nan & nan_bits);
    std::memcpy(x + i, &bits, sizeof bits);
  }
#endif
  for (; i < n; ++i) x[i] = exp_like_glibc(x[i] - shift);
}

}  // namespace qlora::cpu
