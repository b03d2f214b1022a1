// GGUF block formats (see ggml_quants.h for the layouts). The decoders are the formats' definitions; the encoders
// are ours:
//
// Q8_0  d = max|x| / 127 rounded to fp16 first, then q = round(x / d) with that stored d (so a block that is
//       already on a grid with max |q| = 127 comes back exactly).
// Q4_K  per sub-block of 32, an affine fit x ~ s * q - m (s >= 0, m >= 0, q in 0..15) minimizing the squared error
//       weighted by w = rms(sub-block) + |x|: codes from a grid of candidate step sizes around (max - min) / 15,
//       each refit by weighted least squares for (s, m) (m clamped at 0 when the fit wants a positive offset), the
//       best kept and polished by re-rounding and refitting. Then the super-block constants d = max s / 63 and
//       dmin = max m / 63 are rounded to fp16, and each sub-block tries the 3 x 3 6-bit (sc, m) pairs around
//       (s / d, m / dmin), re-rounding its codes against the decoded (d * sc, dmin * m) and keeping the pair with the
//       least weighted error as the decoder will compute it.
// Q6_K  per sub-block of 16, a scale s with q in -32..31 minimizing the error weighted by x^2: candidate steps
//       around max|x| / 32 with the largest value on the -32 side, each refit by least squares, then polished. The
//       fp16 d = -(s of largest magnitude) / 128 and each sub-block's int8 scale is chosen among the 3 around s / d
//       by the decoded error, as for Q4_K.
#include "quant/ggml_quants.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#if !defined(QLORA_GGML_SCALAR) && (defined(__SSE2__) || defined(_M_X64))
#include <emmintrin.h>
#endif

#include "io/dtype.h"
#include "util/error.h"

namespace qlora::ggml {

namespace {

inline void store_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v & 0xFFu);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// A block constant as fp16, clamped to the largest finite half so an extreme block cannot store inf.
inline uint16_t f16_finite(float v) {
  if (v > 65504.0f) v = 65504.0f;
  if (v < -65504.0f) v = -65504.0f;
  return f32_to_f16(v);
}

// v clamped to [lo, hi] and rounded to the nearest integer, ties to even, as a float: adding and removing
// 1.5 * 2^23 rounds in the fp32 addition (|v| < 2^22 after the clamp). NaN becomes lo.
inline float round_clamped(float v, float lo, float hi) {
  v = v > lo ? v : lo;
  v = v < hi ? v : hi;
  return (v + 12582912.0f) - 12582912.0f;
}

// Eight floats at a time for the searches' inner loops. Every operation is the same IEEE fp32 operation lane by
// lane in both versions (SSE2 where the target has it, plain loops elsewhere), and sums across lanes are taken in
// one fixed order, so the bytes written do not depend on the build. Compilers do not vectorize the clamps of the
// plain version themselves (NaN semantics), hence the SSE2 one.
#if !defined(QLORA_GGML_SCALAR) && (defined(__SSE2__) || defined(_M_X64))
struct F8 {
  __m128 lo, hi;
};
inline F8 load8(const float* p) { return {_mm_loadu_ps(p), _mm_loadu_ps(p + 4)}; }
inline void store8(float* p, F8 v) {
  _mm_storeu_ps(p, v.lo);
  _mm_storeu_ps(p + 4, v.hi);
}
inline F8 splat8(float v) { return {_mm_set1_ps(v), _mm_set1_ps(v)}; }
inline F8 operator+(F8 a, F8 b) { return {_mm_add_ps(a.lo, b.lo), _mm_add_ps(a.hi, b.hi)}; }
inline F8 operator-(F8 a, F8 b) { return {_mm_sub_ps(a.lo, b.lo), _mm_sub_ps(a.hi, b.hi)}; }
inline F8 operator*(F8 a, F8 b) { return {_mm_mul_ps(a.lo, b.lo), _mm_mul_ps(a.hi, b.hi)}; }
// maxps(a, b) is a > b ? a : b and minps(a, b) is a < b ? a : b, NaN in a giving b: round_clamped's semantics.
inline F8 round_clamped8(F8 v, F8 lo, F8 hi) {
  const __m128 magic = _mm_set1_ps(12582912.0f);
  const __m128 a = _mm_min_ps(_mm_max_ps(v.lo, lo.lo), hi.lo), b = _mm_min_ps(_mm_max_ps(v.hi, lo.hi), hi.hi);
  return {_mm_sub_ps(_mm_add_ps(a, magic), magic), _mm_sub_ps(_mm_add_ps(b, magic), magic)};
}
#else
struct F8 {
  float v[8];
};
inline F8 load8(const float* p) {
  F8 r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void store8(float* p, F8 v) { std::memcpy(p, v.v, sizeof(v.v)); }
inline F8 splat8(float x) {
  F8 r;
  for (float& e : r.v) e = x;
  return r;
}
inline F8 operator+(F8 a, F8 b) {
  for (int k = 0; k < 8; ++k) a.v[k] = a.v[k] + b.v[k];
  return a;
}
inline F8 operator-(F8 a, F8 b) {
  for (int k = 0; k < 8; ++k) a.v[k] = a.v[k] - b.v[k];
  return a;
}
inline F8 operator*(F8 a, F8 b) {
  for (int k = 0; k < 8; ++k) a.v[k] = a.v[k] * b.v[k];
  return a;
}
inline F8 round_clamped8(F8 v, F8 lo, F8 hi) {
  for (int k = 0; k < 8; ++k) v.v[k] = round_clamped(v.v[k], lo.v[k], hi.v[k]);
  return v;
}
#endif

inline float sum8(F8 v) {
  float a[8];
  store8(a, v);
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

void check_multiple(const char* type, int64_t k, int64_t block) {
  if (k < 0 || k % block != 0) fail(type, ": ", k, " values is not a multiple of the block size ", block);
}

// ---------------------------------------------------------------------------------------------- Q8_0

void q8_0_block(const float* x, uint8_t* y) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) {
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;  // NaN skipped
  }
  const uint16_t dh = f16_finite(amax / 127.0f);
  const float d = f16_to_f32(dh);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(y, dh);
  for (int i = 0; i < 32; ++i)
    y[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(static_cast<int>(round_clamped(x[i] * id, -127.0f, 127.0f))));
}

void q8_0_block_decode(const uint8_t* b, float* y) {
  const float d = f16_to_f32(load_u16(b));
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
}

// ---------------------------------------------------------------------------------------------- Q5_0

// d = m / -16 where m is the value of largest magnitude (with its sign), rounded to fp16 first as for Q8_0; then
// q = round(x / d) + 16 cut to [0, 31], so m itself lands on code 0 exactly and the other end keeps 15 steps.
void q5_0_block(const float* x, uint8_t* y) {
  float amax = 0.0f, m = 0.0f;
  for (int i = 0; i < 32; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) {  // NaN skipped
      amax = a;
      m = x[i];
    }
  }
  const uint16_t dh = f16_finite(m / -16.0f);
  const float d = f16_to_f32(dh);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(y, dh);
  uint32_t qh = 0;
  uint8_t* qs = y + 6;
  for (int j = 0; j < 16; ++j) {
    const int q0 = static_cast<int>(round_clamped(x[j] * id, -16.0f, 15.0f)) + 16;
    const int q1 = static_cast<int>(round_clamped(x[j + 16] * id, -16.0f, 15.0f)) + 16;
    qs[j] = static_cast<uint8_t>((q0 & 15) | ((q1 & 15) << 4));
    qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j;
    qh |= static_cast<uint32_t>((q1 >> 4) & 1) << (j + 16);
  }
  for (int b = 0; b < 4; ++b) y[2 + b] = static_cast<uint8_t>(qh >> (8 * b));
}

void q5_0_block_decode(const uint8_t* b, float* y) {
  const float d = f16_to_f32(load_u16(b));
  uint32_t qh = 0;
  for (int i = 0; i < 4; ++i) qh |= static_cast<uint32_t>(b[2 + i]) << (8 * i);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int q0 = (qs[j] & 15) | static_cast<int>(((qh >> j) & 1) << 4);
    const int q1 = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1) << 4);
    y[j] = static_cast<float>(q0 - 16) * d;
    y[j + 16] = static_cast<float>(q1 - 16) * d;
  }
}

// ---------------------------------------------------------------------------------------------- Q4_K

constexpr int kQ4Sub = 32;

struct AffineFit {
  float s = 0.0f;  // step, > 0
  float o = 0.0f;  // offset, <= 0 (the stored min is -o)
  double err = INFINITY;
};

// Codes L = round(a * (x - b)) in 0..15 for one sub-block, then the weighted least-squares (s, o) of x ~ s * L + o
// for those codes with o <= 0. Returns false (fit untouched) when the codes do not determine a fit with s > 0.
bool fit_codes(const float* x, const float* w, float a, float b, float sw, float swx, float swx2, AffineFit& fit) {
  const F8 va = splat8(a), vb = splat8(b), zero = splat8(0.0f), top = splat8(15.0f);
  F8 acc_l = zero, acc_l2 = zero, acc_xl = zero;
  for (int i0 = 0; i0 < kQ4Sub; i0 += 8) {
    const F8 xv = load8(x + i0);
    const F8 l = round_clamped8(va * (xv - vb), zero, top);
    const F8 wl = load8(w + i0) * l;
    acc_l = acc_l + wl;
    acc_l2 = acc_l2 + wl * l;
    acc_xl = acc_xl + wl * xv;
  }
  const double sl = sum8(acc_l), sl2 = sum8(acc_l2), sxl = sum8(acc_xl);
  const double D = sw * sl2 - sl * sl;
  if (!(D > 0.0)) return false;
  double s = (sw * sxl - swx * sl) / D;
  double o = (sl2 * swx - sl * sxl) / D;
  if (o > 0.0) {
    o = 0.0;
    s = sxl / sl2;
  }
  if (!(s > 0.0)) return false;
  // sum w (s L + o - x)^2, expanded over the sums
  fit.err = s * s * sl2 + 2.0 * s * o * sl + o * o * sw - 2.0 * s * sxl - 2.0 * o * swx + swx2;
  fit.s = static_cast<float>(s);
  fit.o = static_cast<float>(o);
  return true;
}

// Affine fit of one sub-block of 32: x ~ s * q + o with s >= 0, o <= 0, q in 0..15.
AffineFit q4_sub_fit(const float* x, const float* w) {
  float xmin = x[0], xmax = x[0];
  for (int i = 1; i < kQ4Sub; ++i) {
    xmin = x[i] < xmin ? x[i] : xmin;
    xmax = x[i] > xmax ? x[i] : xmax;
  }
  F8 acc_w = splat8(0.0f), acc_wx = acc_w, acc_wx2 = acc_w;
  for (int i0 = 0; i0 < kQ4Sub; i0 += 8) {
    const F8 xv = load8(x + i0), wv = load8(w + i0);
    acc_w = acc_w + wv;
    acc_wx = acc_wx + wv * xv;
    acc_wx2 = acc_wx2 + wv * xv * xv;
  }
  const float sw = sum8(acc_w), swx = sum8(acc_wx), swx2 = sum8(acc_wx2);
  if (xmin > 0.0f) xmin = 0.0f;
  AffineFit best;
  if (!(xmax > xmin)) {  // constant sub-block (or NaN): x = o exactly
    best.s = 0.0f;
    best.o = std::isfinite(xmin) ? xmin : 0.0f;
    return best;
  }
  const float range = xmax - xmin;
  // Baseline: the plain min..max grid.
  {
    const float a = 15.0f / range, s = range / 15.0f;
    const F8 va = splat8(a), vs = splat8(s), vmin = splat8(xmin), zero = splat8(0.0f), top = splat8(15.0f);
    F8 acc = zero;
    for (int i0 = 0; i0 < kQ4Sub; i0 += 8) {
      const F8 xv = load8(x + i0);
      const F8 diff = vs * round_clamped8(va * (xv - vmin), zero, top) + vmin - xv;
      acc = acc + load8(w + i0) * diff * diff;
    }
    best.s = s;
    best.o = xmin;
    best.err = sum8(acc);
  }
  // Candidate steps range / (15 + t), t = -1.0, -0.9, ..., +1.0, each refit.
  for (int is = 0; is <= 20; ++is) {
    AffineFit f;
    if (fit_codes(x, w, (14.0f + 0.1f * static_cast<float>(is)) / range, xmin, sw, swx, swx2, f) && f.err < best.err)
      best = f;
  }
  // Polish: re-round against the fitted grid and refit while that helps.
  for (int iter = 0; iter < 2; ++iter) {
    AffineFit f;
    if (!fit_codes(x, w, 1.0f / best.s, best.o, sw, swx, swx2, f) || !(f.err < best.err)) break;
    best = f;
  }
  return best;
}

inline void unpack_scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

void q4_k_block(const float* x, uint8_t* y) {
  float s[8], m[8], w[256];
  float max_s = 0.0f, max_m = 0.0f;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + kQ4Sub * j;
    float* ws = w + kQ4Sub * j;
    F8 acc = splat8(0.0f);
    for (int i0 = 0; i0 < kQ4Sub; i0 += 8) {
      const F8 xv = load8(xs + i0);
      acc = acc + xv * xv;
    }
    const float av = std::sqrt(sum8(acc) / kQ4Sub);
    for (int i = 0; i < kQ4Sub; ++i) ws[i] = av + std::fabs(xs[i]);
    const AffineFit f = q4_sub_fit(xs, ws);
    s[j] = f.s;
    m[j] = -f.o;
    max_s = s[j] > max_s ? s[j] : max_s;
    max_m = m[j] > max_m ? m[j] : max_m;
  }
  const uint16_t dh = f16_finite(max_s / 63.0f), mh = f16_finite(max_m / 63.0f);
  const float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
  uint8_t sc[8], mn[8], L[256];
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + kQ4Sub * j;
    const float* ws = w + kQ4Sub * j;
    const int ls0 = d > 0.0f ? static_cast<int>(round_clamped(s[j] / d, 0.0f, 63.0f)) : 0;
    const int lm0 = dmin > 0.0f ? static_cast<int>(round_clamped(m[j] / dmin, 0.0f, 63.0f)) : 0;
    float best = INFINITY;
    int best_ls = ls0, best_lm = lm0;
    float Lc[kQ4Sub], Lbest[kQ4Sub] = {};
    // The decoder's own values for each (sc, m) pair around the fit; the codes are the nearest on that grid.
    for (int ls = std::max(0, ls0 - 1); ls <= std::min(63, ls0 + 1); ++ls) {
      for (int lm = std::max(0, lm0 - 1); lm <= std::min(63, lm0 + 1); ++lm) {
        const float D = d * static_cast<float>(ls), M = dmin * static_cast<float>(lm);
        const float inv = D > 0.0f ? 1.0f / D : 0.0f;
        const F8 vD = splat8(D), vM = splat8(M), vinv = splat8(inv), zero = splat8(0.0f), top = splat8(15.0f);
        F8 acc = zero;
        for (int i0 = 0; i0 < kQ4Sub; i0 += 8) {
          const F8 xv = load8(xs + i0);
          const F8 l = round_clamped8((xv + vM) * vinv, zero, top);
          store8(Lc + i0, l);
          const F8 diff = vD * l - vM - xv;
          acc = acc + load8(ws + i0) * diff * diff;
        }
        const float err = sum8(acc);
        if (err < best) {
          best = err;
          best_ls = ls;
          best_lm = lm;
          std::memcpy(Lbest, Lc, sizeof(Lc));
        }
      }
    }
    for (int i = 0; i < kQ4Sub; ++i) L[kQ4Sub * j + i] = static_cast<uint8_t>(Lbest[i]);
    sc[j] = static_cast<uint8_t>(best_ls);
    mn[j] = static_cast<uint8_t>(best_lm);
  }
  store_u16(y, dh);
  store_u16(y + 2, mh);
  pack_q4_k_scales(sc, mn, y + 4);
  uint8_t* q = y + 16;
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l)
      q[32 * c + l] = static_cast<uint8_t>(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
}

void q4_k_block_decode(const uint8_t* b, float* y) {
  const float d = f16_to_f32(load_u16(b)), dmin = f16_to_f32(load_u16(b + 2));
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int c = 0; c < 4; ++c) {
    uint8_t sc, m;
    unpack_scale_min_k4(2 * c, scales, sc, m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    unpack_scale_min_k4(2 * c + 1, scales, sc, m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) y[64 * c + l] = d1 * static_cast<float>(q[32 * c + l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) y[64 * c + 32 + l] = d2 * static_cast<float>(q[32 * c + l] >> 4) - m2;
  }
}

// ---------------------------------------------------------------------------------------------- Q6_K

constexpr int kQ6Sub = 16;

// Scale s of one sub-block of 16 so that x ~ s * q, q in -32..31, minimizing sum w (s q - x)^2.
float q6_sub_fit(const float* x, const float* w) {
  float amax = 0.0f, vmax = 0.0f;
  for (int i = 0; i < kQ6Sub; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) {
      amax = a;
      vmax = x[i];
    }
  }
  if (!(amax >= 1e-15f)) return 0.0f;
  // For fixed codes the least-squares scale is sum w x q / sum w q^2 and its error is sum w x^2 minus
  // (sum w x q)^2 / sum w q^2: the codes with the largest such score win.
  float best_s = 0.0f;
  double best = -1.0;
  auto consider = [&](float iscale) {
    const F8 vi = splat8(iscale), lo = splat8(-32.0f), hi = splat8(31.0f);
    F8 acc_xq = splat8(0.0f), acc_q2 = acc_xq;
    for (int i0 = 0; i0 < kQ6Sub; i0 += 8) {
      const F8 xv = load8(x + i0);
      const F8 q = round_clamped8(vi * xv, lo, hi);
      const F8 wq = load8(w + i0) * q;
      acc_xq = acc_xq + wq * xv;
      acc_q2 = acc_q2 + wq * q;
    }
    const float sxq = sum8(acc_xq), sq2 = sum8(acc_q2);
    if (!(sq2 > 0.0f)) return false;
    const double score = static_cast<double>(sxq) * sxq / sq2;
    if (!(score > best)) return false;
    best = score;
    best_s = sxq / sq2;
    return true;
  };
  // The largest value goes to the -32 side (one more level there): candidate steps |vmax| / (32 + t).
  for (int is = -9; is <= 9; ++is) consider(-(32.0f + 0.1f * static_cast<float>(is)) / vmax);
  for (int iter = 0; iter < 2 && best_s != 0.0f; ++iter)
    if (!consider(1.0f / best_s)) break;
  return best_s;
}

void q6_k_block(const float* x, uint8_t* y) {
  float s[16], w[256];
  float max_abs = 0.0f, max_s = 0.0f;
  for (int i = 0; i < 256; ++i) w[i] = x[i] * x[i];
  for (int j = 0; j < 16; ++j) {
    s[j] = q6_sub_fit(x + kQ6Sub * j, w + kQ6Sub * j);
    if (std::fabs(s[j]) > max_abs) {
      max_abs = std::fabs(s[j]);
      max_s = s[j];
    }
  }
  const uint16_t dh = f16_finite(max_s / -128.0f);
  const float d = f16_to_f32(dh);
  if (!(max_abs >= 1e-15f) || d == 0.0f) {
    std::memset(y, 0, kBlockBytesQ6_K);
    return;
  }
  int8_t* scales = reinterpret_cast<int8_t*>(y + 192);
  uint8_t L[256];
  for (int j = 0; j < 16; ++j) {
    const float* xs = x + kQ6Sub * j;
    const float* ws = w + kQ6Sub * j;
    const int sc0 = static_cast<int>(round_clamped(s[j] / d, -128.0f, 127.0f));
    float best = INFINITY;
    int best_sc = sc0;
    float Lc[kQ6Sub], Lbest[kQ6Sub] = {};
    for (int sc = std::max(-128, sc0 - 1); sc <= std::min(127, sc0 + 1); ++sc) {
      const float D = d * static_cast<float>(sc);
      const float inv = D != 0.0f ? 1.0f / D : 0.0f;
      const F8 vD = splat8(D), vinv = splat8(inv), lo = splat8(-32.0f), hi = splat8(31.0f);
      F8 acc = splat8(0.0f);
      for (int i0 = 0; i0 < kQ6Sub; i0 += 8) {
        const F8 xv = load8(xs + i0);
        const F8 q = round_clamped8(xv * vinv, lo, hi);
        store8(Lc + i0, q);
        const F8 diff = vD * q - xv;
        acc = acc + load8(ws + i0) * diff * diff;
      }
      const float err = sum8(acc);
      if (err < best) {
        best = err;
        best_sc = sc;
        std::memcpy(Lbest, Lc, sizeof(Lc));
      }
    }
    for (int i = 0; i < kQ6Sub; ++i) L[kQ6Sub * j + i] = static_cast<uint8_t>(static_cast<int>(Lbest[i]) + 32);
    scales[j] = static_cast<int8_t>(best_sc);
  }
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  for (int h = 0; h < 2; ++h) {
    const uint8_t* Lh = L + 128 * h;
    for (int l = 0; l < 32; ++l) {
      ql[64 * h + l] = static_cast<uint8_t>((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
      ql[64 * h + 32 + l] = static_cast<uint8_t>((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
      qh[32 * h + l] = static_cast<uint8_t>((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                                            ((Lh[l + 96] >> 4) << 6));
    }
  }
  store_u16(y + 208, dh);
}

void q6_k_block_decode(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_to_f32(load_u16(b + 208));
  for (int h = 0; h < 2; ++h) {
    float* yh = y + 128 * h;
    for (int l = 0; l < 32; ++l) {
      const int is = 8 * h + l / 16;
      const int q1 = ((ql[64 * h + l] & 0xF) | (((qh[32 * h + l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[64 * h + 32 + l] & 0xF) | (((qh[32 * h + l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[64 * h + l] >> 4) | (((qh[32 * h + l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[64 * h + 32 + l] >> 4) | (((qh[32 * h + l] >> 6) & 3) << 4)) - 32;
      yh[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      yh[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      yh[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      yh[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

// ---------------------------------------------------------------------------------------------- drivers

using RowQuant = void (*)(const float*, uint8_t*, int64_t);
using RowDequant = void (*)(const uint8_t*, float*, int64_t);

RowQuant row_quantizer(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return quantize_row_f32;
    case GgmlType::F16: return quantize_row_f16;
    case GgmlType::BF16: return quantize_row_bf16;
    case GgmlType::Q8_0: return quantize_row_q8_0;
    case GgmlType::Q5_0: return quantize_row_q5_0;
    case GgmlType::Q4_K: return quantize_row_q4_k;
    case GgmlType::Q6_K: return quantize_row_q6_k;
  }
  fail("unknown ggml type id ", static_cast<uint32_t>(t));
}

RowDequant row_dequantizer(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return dequantize_row_f32;
    case GgmlType::F16: return dequantize_row_f16;
    case GgmlType::BF16: return dequantize_row_bf16;
    case GgmlType::Q8_0: return dequantize_row_q8_0;
    case GgmlType::Q5_0: return dequantize_row_q5_0;
    case GgmlType::Q4_K: return dequantize_row_q4_k;
    case GgmlType::Q6_K: return dequantize_row_q6_k;
  }
  fail("unknown ggml type id ", static_cast<uint32_t>(t));
}

// Splits rows * cols values into chunks of whole blocks (about 16K values each) and runs `body(first_value, count)`
// on them across the OpenMP threads. Blocks never straddle rows (cols is a multiple of the block size), so the
// matrix is one run of blocks.
template <typename Body>
void for_chunks(GgmlType t, int64_t rows, int64_t cols, Body body) {
  (void)row_bytes(t, cols);  // validates cols
  if (rows < 0) fail(type_name(t), ": negative row count ", rows);
  const int64_t bs = block_size(t);
  const int64_t nblocks = rows * (cols / bs);
  const int64_t per_chunk = std::max<int64_t>(1, 16384 / bs);
  const int64_t nchunks = (nblocks + per_chunk - 1) / per_chunk;
#pragma omp parallel for schedule(dynamic, 1) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b0 = c * per_chunk;
    const int64_t nb = std::min(per_chunk, nblocks - b0);
    body(b0 * bs, nb * bs);
  }
}

}  // namespace

std::optional<GgmlType> type_from_name(const std::string& name) {
  std::string s = name;
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (s == "f32") return GgmlType::F32;
  if (s == "f16") return GgmlType::F16;
  if (s == "bf16") return GgmlType::BF16;
  if (s == "q8_0") return GgmlType::Q8_0;
  if (s == "q5_0") return GgmlType::Q5_0;
  if (s == "q4_k") return GgmlType::Q4_K;
  if (s == "q6_k") return GgmlType::Q6_K;
  return std::nullopt;
}

const char* type_name(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return "f32";
    case GgmlType::F16: return "f16";
    case GgmlType::BF16: return "bf16";
    case GgmlType::Q8_0: return "q8_0";
    case GgmlType::Q5_0: return "q5_0";
    case GgmlType::Q4_K: return "q4_k";
    case GgmlType::Q6_K: return "q6_k";
  }
  return "unknown";
}

int64_t block_size(GgmlType t) {
  switch (t) {
    case GgmlType::Q8_0: return kQK8_0;
    case GgmlType::Q5_0: return kQK5_0;
    case GgmlType::Q4_K:
    case GgmlType::Q6_K: return kQK_K;
    default: return 1;
  }
}

size_t block_bytes(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 4;
    case GgmlType::F16:
    case GgmlType::BF16: return 2;
    case GgmlType::Q8_0: return kBlockBytesQ8_0;
    case GgmlType::Q5_0: return kBlockBytesQ5_0;
    case GgmlType::Q4_K: return kBlockBytesQ4_K;
    case GgmlType::Q6_K: return kBlockBytesQ6_K;
  }
  return 0;
}

size_t row_bytes(GgmlType t, int64_t cols) {
  const int64_t bs = block_size(t);
  if (cols < 0) fail(type_name(t), ": negative column count ", cols);
  if (cols % bs != 0)
    fail(type_name(t), ": cols ", cols, " is not a multiple of the block size ", bs, " (", type_name(t),
         " stores rows in blocks of ", bs, " values)");
  return static_cast<size_t>(cols / bs) * block_bytes(t);
}

void pack_q4_k_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t out[12]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    out[j + 4] = static_cast<uint8_t>((m[j] & 63) | ((m[j + 4] >> 4) << 6));
    out[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
  }
}

void unpack_q4_k_scales(const uint8_t in[12], uint8_t sc[8], uint8_t m[8]) {
  for (int j = 0; j < 8; ++j) unpack_scale_min_k4(j, in, sc[j], m[j]);
}

// ---- rows

void quantize_row_f32(const float* x, uint8_t* y, int64_t k) {
  check_multiple("f32", k, 1);
  if (k) std::memcpy(y, x, static_cast<size_t>(k) * sizeof(float));  // little-endian hosts, as the engine assumes
}
void dequantize_row_f32(const uint8_t* x, float* y, int64_t k) {
  check_multiple("f32", k, 1);
  if (k) std::memcpy(y, x, static_cast<size_t>(k) * sizeof(float));
}

void quantize_row_f16(const float* x, uint8_t* y, int64_t k) {
  check_multiple("f16", k, 1);
  for (int64_t i = 0; i < k; ++i) store_u16(y + 2 * i, f32_to_f16(x[i]));
}
void dequantize_row_f16(const uint8_t* x, float* y, int64_t k) {
  check_multiple("f16", k, 1);
  for (int64_t i = 0; i < k; ++i) y[i] = f16_to_f32(load_u16(x + 2 * i));
}

void quantize_row_bf16(const float* x, uint8_t* y, int64_t k) {
  check_multiple("bf16", k, 1);
  for (int64_t i = 0; i < k; ++i) store_u16(y + 2 * i, f32_to_bf16(x[i]));
}
void dequantize_row_bf16(const uint8_t* x, float* y, int64_t k) {
  check_multiple("bf16", k, 1);
  for (int64_t i = 0; i < k; ++i) y[i] = bf16_to_f32(load_u16(x + 2 * i));
}

void quantize_row_q8_0(const float* x, uint8_t* y, int64_t k) {
  check_multiple("q8_0", k, kQK8_0);
  for (int64_t b = 0; b < k / kQK8_0; ++b) q8_0_block(x + b * kQK8_0, y + b * kBlockBytesQ8_0);
}
void dequantize_row_q8_0(const uint8_t* x, float* y, int64_t k) {
  check_multiple("q8_0", k, kQK8_0);
  for (int64_t b = 0; b < k / kQK8_0; ++b) q8_0_block_decode(x + b * kBlockBytesQ8_0, y + b * kQK8_0);
}

void quantize_row_q5_0(const float* x, uint8_t* y, int64_t k) {
  check_multiple("q5_0", k, kQK5_0);
  for (int64_t b = 0; b < k / kQK5_0; ++b) q5_0_block(x + b * kQK5_0, y + b * kBlockBytesQ5_0);
}
void dequantize_row_q5_0(const uint8_t* x, float* y, int64_t k) {
  check_multiple("q5_0", k, kQK5_0);
  for (int64_t b = 0; b < k / kQK5_0; ++b) q5_0_block_decode(x + b * kBlockBytesQ5_0, y + b * kQK5_0);
}

void quantize_row_q4_k(const float* x, uint8_t* y, int64_t k) {
  check_multiple("q4_k", k, kQK_K);
  for (int64_t b = 0; b < k / kQK_K; ++b) q4_k_block(x + b * kQK_K, y + b * kBlockBytesQ4_K);
}
void dequantize_row_q4_k(const uint8_t* x, float* y, int64_t k) {
  check_multiple("q4_k", k, kQK_K);
  for (int64_t b = 0; b < k / kQK_K; ++b) q4_k_block_decode(x + b * kBlockBytesQ4_K, y + b * kQK_K);
}

void quantize_row_q6_k(const float* x, uint8_t* y, int64_t k) {
  check_multiple("q6_k", k, kQK_K);
  for (int64_t b = 0; b < k / kQK_K; ++b) q6_k_block(x + b * kQK_K, y + b * kBlockBytesQ6_K);
}
void dequantize_row_q6_k(const uint8_t* x, float* y, int64_t k) {
  check_multiple("q6_k", k, kQK_K);
  for (int64_t b = 0; b < k / kQK_K; ++b) q6_k_block_decode(x + b * kBlockBytesQ6_K, y + b * kQK_K);
}

// ---- matrices

void quantize(GgmlType t, const float* x, uint8_t* y, int64_t rows, int64_t cols) {
  const RowQuant fn = row_quantizer(t);
  const size_t bytes_per_value_block = block_bytes(t);
  const int64_t bs = block_size(t);
  for_chunks(t, rows, cols, [&](int64_t first, int64_t count) {
    fn(x + first, y + static_cast<size_t>(first / bs) * bytes_per_value_block, count);
  });
}

void dequantize(GgmlType t, const uint8_t* x, float* y, int64_t rows, int64_t cols) {
  const RowDequant fn = row_dequantizer(t);
  const size_t bytes_per_value_block = block_bytes(t);
  const int64_t bs = block_size(t);
  for_chunks(t, rows, cols, [&](int64_t first, int64_t count) {
    fn(x + static_cast<size_t>(first / bs) * bytes_per_value_block, y + first, count);
  });
}

}  // namespace qlora::ggml
