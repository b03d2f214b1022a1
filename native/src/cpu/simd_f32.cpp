// The CPU's hottest fp32 loops (the GEMM's panels and whole transposes, generation's few-row products and their
// NF4 tiles, attention's dot products and backward pass, dropout), built for AVX-512, AVX2 and the baseline, the
// best chosen when the addon loads (GCC/Clang function multi-versioning on x86-64 Linux with glibc, whose ifunc
// chooses; one version elsewhere). Contraction stays off (no FMA) and no reduction is reordered, so every version
// rounds each multiply and add as the baseline does: the results are bit for bit the same on every CPU.
#include "cpu/kernels.h"
#include "io/dtype.h"
#include "quant/nf4.h"
#include "util/philox.h"
#include "util/simd_clones.h"

#include <atomic>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 warns of the intrinsics' own _mm512_undefined_*() placeholders (GCC bug 105593) wherever they are inlined:
// the two warnings are off for the header's lines alone, and stay on for this file's.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
#include <cmath>
#include <cstring>
#include <string>

// The vector code below uses GCC's __builtin_shuffle, which Clang lacks (it has __builtin_shufflevector): Clang and
// MSVC build the element-at-a-time fills instead.
#if defined(__GNUC__) && !defined(__clang__)
#define QLORA_GCC_SHUFFLES 1
#else
#define QLORA_GCC_SHUFFLES 0
#endif

namespace qlora::cpu {

QLORA_SIMD_CLONES
void attention_backward_group_f32(const float* dout, const float* q, const float* k, const float* v,
                                  const float* out, const float* lse, int64_t b, int64_t kvh, int64_t seq,
                                  int64_t heads, int64_t kv_heads, int64_t head_dim, float* dq, float* dk, float* dv,
                                  float* tiles, float* row_dots) {
  attention_backward_group<float>(dout, q, k, v, out, lse, b, kvh, seq, heads, kv_heads, head_dim, dq, dk, dv, tiles,
                                  row_dots);
}

QLORA_SIMD_CLONES
float attend_row_f32(const float* qi, const float* k, const float* v, int64_t kv_stride, int64_t last,
                     int64_t head_dim, float scale, float* p, float* oi) {
  return attend_row<float>(qi, k, v, kv_stride, last, head_dim, scale, p, oi);
}

QLORA_SIMD_CLONES
void attend_rows_f32(const float* q, int64_t q_stride, const float* k, const float* v, int64_t kv_stride, int64_t i0,
                     int64_t m, int64_t head_dim, float scale, float* xs, float* p, float* out, float* lse) {
  attend_rows<float>(q, q_stride, k, v, kv_stride, i0, m, head_dim, scale, xs, p, out, lse);
}

namespace {

// The vector code below (the panels' sums in registers and B^T's packing, the few-row products' tiles) works on
// vectors of L lanes: 16 (one register) where the CPU has AVX-512, 8 elsewhere. Both are compiled into every
// instruction set's clone and chosen when they run: GCC turns the shuffles and conversions of 16-lane vectors into
// code a value at a time for AVX2, and keeps 16-lane sums in memory there.
std::atomic<bool> narrow_vectors_forced{false};
bool has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes && !narrow_vectors_forced.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

}  // namespace

void force_narrow_vectors(bool narrow) { narrow_vectors_forced.store(narrow, std::memory_order_relaxed); }

std::string vector_code() {
  const std::string fills = !QLORA_GCC_SHUFFLES ? ", tiles filled a value at a time (built without GCC's shuffles)"
                            : has_avx512()      ? ", 16-lane vectors"
                                                : ", 8-lane vectors";
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
  // the version target_clones' resolver picks, in its order
  if (__builtin_cpu_supports("avx512f")) return "AVX-512" + fills;
  if (__builtin_cpu_supports("avx2")) return "AVX2" + fills;
  return "x86-64 baseline (no AVX2)" + fills;
#else
  return "one version for every CPU" + fills;
#endif
}

#if QLORA_GCC_SHUFFLES
namespace {

// Vectors of L lanes (16 or 8) of each element type the fills use.
template <int L>
struct Lanes {
  typedef float F __attribute__((vector_size(L * 4)));
  typedef int32_t I __attribute__((vector_size(L * 4)));
  typedef uint32_t U __attribute__((vector_size(L * 4)));
  typedef uint16_t H __attribute__((vector_size(L * 2)));
};
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef uint16_t v16h __attribute__((vector_size(32)));

// Vectors go by reference throughout: passed by value, their ABI differs between the instruction sets.

// round_to_bf16 lane by lane, in place (round to nearest even; a NaN stays a NaN with its quiet bit set, as
// f32_to_bf16 does).
// no_nan: the caller knows that no lane is a NaN, which spares the check.
template <int L>
QLORA_ALWAYS_INLINE void round_bf16_lanes(typename Lanes<L>::F& v, bool no_nan = false) {
  typedef typename Lanes<L>::U U;
  U bits;
  std::memcpy(&bits, &v, sizeof bits);
  const U rounded = (bits + (0x7fffu + ((bits >> 16) & 1u))) & 0xffff0000u;
  if (no_nan) {
    std::memcpy(&v, &rounded, sizeof v);
    return;
  }
  const U nan = ((bits >> 16) | 0x40u) << 16;
  const U out = (bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
  std::memcpy(&v, &out, sizeof v);
}

// round_to_f16 lane by lane, in place: round to nearest even at fp16's precision, as f16_to_f32(f32_to_f16(v)) does.
// Normal results keep 10 mantissa bits; below 2^-14, multiples of 2^-24 (0.5 + |v| rounds there, nearest even, and
// 0.5 comes off exactly); from 65520 on, infinity; a NaN stays a quiet NaN with its top 10 payload bits.
template <int L>
QLORA_ALWAYS_INLINE void round_f16_lanes(typename Lanes<L>::F& v) {
  typedef typename Lanes<L>::U U;
  typedef typename Lanes<L>::F F;
  U bits;
  std::memcpy(&bits, &v, sizeof bits);
  const U magnitude_bits = bits & 0x7fffffffu;
  const U normal = (magnitude_bits + (0xfffu + ((magnitude_bits >> 13) & 1u))) & ~0x1fffu;
  F magnitude;
  std::memcpy(&magnitude, &magnitude_bits, sizeof magnitude);
  const F subnormal_value = (magnitude + 0.5f) - 0.5f;
  U subnormal;
  std::memcpy(&subnormal, &subnormal_value, sizeof subnormal);
  const U nan = 0x7fc00000u | (magnitude_bits & 0x007fe000u);
  const U out = (bits & 0x80000000u) |
                (magnitude_bits > 0x7f800000u    ? nan
                 : magnitude_bits >= 0x477ff000u ? U{} + 0x7f800000u
                 : magnitude_bits < 0x38800000u  ? subnormal
                                                 : normal);
  std::memcpy(&v, &out, sizeof v);
}

// The n x n transpose of r (n = the lanes of V) in place: r[i][l] becomes the former r[l][i]. At each step d (n / 2
// down to 1), each row i without bit d and row i + d swap the d-wide blocks off their diagonal, which exchanges bit d
// of the row index with bit d of the lane index; the steps together exchange the two indices. Mask: integers of V's
// element width.
template <int n, int d, typename V, typename Mask>
QLORA_ALWAYS_INLINE void swap_off_diagonal_blocks(V* r) {
  Mask low, high;
  for (int l = 0; l < n; ++l) {
    low[l] = (l & d) ? n + l - d : l;   // row i: its own lanes without bit d, and there row i + d's lanes without it
    high[l] = (l & d) ? n + l : l + d;  // row i + d: row i's lanes with bit d, and there its own lanes with it
  }
  for (int i = 0; i < n; ++i) {
    if (i & d) continue;
    const V a = r[i], b = r[i + d];
    r[i] = __builtin_shuffle(a, b, low);
    r[i + d] = __builtin_shuffle(a, b, high);
  }
  if constexpr (d > 1) swap_off_diagonal_blocks<n, d / 2, V, Mask>(r);
}
template <int n, typename V, typename Mask>
QLORA_ALWAYS_INLINE void transpose(V* r) {
  swap_off_diagonal_blocks<n, n / 2, V, Mask>(r);
}

// L consecutive values widened to fp32, the same bits as widen<float> gives each.
template <int L>
QLORA_ALWAYS_INLINE void load_widened(const float* p, typename Lanes<L>::F& out) {
  std::memcpy(&out, p, sizeof out);
}
template <int L>
QLORA_ALWAYS_INLINE void load_widened(const Bf16Bits* p, typename Lanes<L>::F& out) {
  typename Lanes<L>::H h;
  std::memcpy(&h, p, sizeof h);
  const typename Lanes<L>::U bits = __builtin_convertvector(h, typename Lanes<L>::U) << 16;
  std::memcpy(&out, &bits, sizeof out);
}
template <int L>
QLORA_ALWAYS_INLINE void load_widened(const F16Bits* p, typename Lanes<L>::F& out) {
  typedef typename Lanes<L>::U U;
  typename Lanes<L>::H h;
  std::memcpy(&h, p, sizeof h);
  const U u = __builtin_convertvector(h, U);
  const U magnitude = u & 0x7fffu;
  const U normal = (magnitude << 13) + ((127u - 15u) << 23);  // the exponent rebiased, the mantissa widened
  // a subnormal is its mantissa times 2^-24: exact in fp32, and normal there
  const typename Lanes<L>::F subnormal_value =
      __builtin_convertvector(reinterpret_cast<const typename Lanes<L>::I&>(magnitude), typename Lanes<L>::F) *
      0x1p-24f;
  U subnormal;
  std::memcpy(&subnormal, &subnormal_value, sizeof subnormal);
  const U inf_or_nan = (magnitude << 13) | 0x7f800000u;  // NaN keeps its payload
  const U bits = ((u & 0x8000u) << 16) | (magnitude < 0x400u ? subnormal : magnitude >= 0x7c00u ? inf_or_nan : normal);
  std::memcpy(&out, &bits, sizeof out);
}

// out[k * ld + j] = row[j][k] widened, for 16 rows j and k < kc: L values of each of L rows at a time, L loads of
// consecutive values, a transpose in registers and L stores, instead of L * L loads and stores of one value each.
// The same values, so the same sums.
template <int L, typename TB>
QLORA_ALWAYS_INLINE void transpose_16_rows(const TB* const* row, int64_t kc, float* out, int64_t ld) {
  typedef typename Lanes<L>::F F;
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16)
    for (int j0 = 0; j0 < 16; j0 += L)
      for (int i0 = 0; i0 < 16; i0 += L) {
        F r[L];
        for (int j = 0; j < L; ++j) load_widened<L>(row[j0 + j] + k + i0, r[j]);
        transpose<L, F, typename Lanes<L>::I>(r);
        for (int i = 0; i < L; ++i) std::memcpy(out + (k + i0 + i) * ld + j0, &r[i], sizeof r[i]);
      }
  for (; k < kc; ++k)
    for (int64_t j = 0; j < 16; ++j) out[k * ld + j] = widen<float>(row[j][k]);
}

// WidenedTile's fill through transpose_16_rows.
template <typename TB, int L>
struct WidenedTileLanes {
  const TB* B;
  int64_t n0, cols, ld;  // ld: B's rows are ld values apart

  QLORA_SIMD_CLONES __attribute__((noinline)) void operator()(int64_t k0, int64_t kc, float (*tile)[kNtTile]) const {
    const TB* row[kNtTile];
    for (int64_t j = 0; j < kNtTile; ++j) row[j] = B + (n0 + std::min(j, cols - 1)) * ld + k0;
    transpose_16_rows<L>(row, kc, tile[0], kNtTile);
  }
};

// PackTransposed through transpose_16_rows (a pack's rows are kGemmColTile values wide, so 16 columns past j1 are
// still inside it; they are written and never read).
template <int L>
struct PackTransposedLanes {
  template <typename TB>
  QLORA_ALWAYS_INLINE void operator()(const TB* b, int64_t j0, int64_t j1, int64_t K, int64_t k0, int64_t kc,
                                      float* pack) const {
    const TB* row[16];
    for (int64_t j = 0; j < 16; ++j) row[j] = b + std::min(j0 + j, j1 - 1) * K + k0;
    transpose_16_rows<L>(row, kc, pack + j0, kGemmColTile);
  }
};

// Nf4Tile's fill for rows that start on a byte (`in` even) and blocks that start and end with the rows (`in` a
// multiple of the block size), so all 16 rows change block constants at the same k; any rounding. For each
// pair of k (a byte of every row) the 16 codes index the code book, times each row's block constant, rounded: the
// same products and roundings as Nf4Tile, so the same bits. The bytes come 16 of a row at a time, transposed in
// registers, so that each pair's 16 bytes are one vector.
template <int L>
struct Nf4TileLanes {
  const uint8_t* packed;
  const float* absmax;
  int64_t o0, cols, in;
  int blocksize, round_to;  // 0 fp32, 1 bf16, 2 fp16

  QLORA_SIMD_CLONES __attribute__((noinline)) void operator()(int64_t k0, int64_t kc, float (*tile)[kNtTile]) const {
    // one loop per rounding, so that none tests it (or rebuilds its constants) at every value
    if (round_to == 1)
      fill<1>(k0, kc, tile);
    else if (round_to == 2)
      fill<2>(k0, kc, tile);
    else
      fill<0>(k0, kc, tile);
  }

  template <int RoundTo>
  QLORA_ALWAYS_INLINE void fill(int64_t k0, int64_t kc, float (*tile)[kNtTile]) const {
    typedef typename Lanes<L>::F F;
    typedef typename Lanes<L>::I I;
    constexpr int kGroups = kNtTile / L;  // vectors across a tile's row
    F codebook[16 / L];                   // the code book in one vector, or two of 8
    for (int c = 0; c < 16; ++c) codebook[c / L][c % L] = nf4::code_value(c);
    const uint8_t* row[kNtTile];
    int64_t first_block[kNtTile];
    for (int64_t j = 0; j < kNtTile; ++j) {
      const int64_t o = o0 + std::min(j, cols - 1);  // lanes past cols repeat the last output, unused
      row[j] = packed + o * in / 2;
      first_block[j] = o * in / blocksize;
    }
    F scale[kGroups] = {};
    int64_t next_block = k0;  // where the block constants change next
    bool finite_scales = true;  // then every product is finite too (codes are within [-1, 1])
    const auto update_scales = [&](int64_t kk) __attribute__((always_inline)) {
      if (kk != next_block) return;
      finite_scales = true;
      for (int64_t j = 0; j < kNtTile; ++j) {
        scale[j / L][j % L] = absmax[first_block[j] + kk / blocksize];
        finite_scales = finite_scales && std::isfinite(scale[j / L][j % L]);
      }
      next_block = (kk / blocksize + 1) * blocksize;
    };
    // tile[k] and tile[k + 1] of group g's lanes from the codes of their values (the code book lookup takes an
    // index modulo 16: bits above a code's four need not be cleared)
    const auto store_pair = [&](int64_t k, int g, const I& first, const I& second) __attribute__((always_inline)) {
      F w0, w1;
      if constexpr (L == 16) {
        w0 = __builtin_shuffle(codebook[0], first);
        w1 = __builtin_shuffle(codebook[0], second);
      } else {
        w0 = __builtin_shuffle(codebook[0], codebook[1], first);
        w1 = __builtin_shuffle(codebook[0], codebook[1], second);
      }
      w0 *= scale[g];
      w1 *= scale[g];
      if constexpr (RoundTo == 1) {
        round_bf16_lanes<L>(w0, finite_scales);
        round_bf16_lanes<L>(w1, finite_scales);
      } else if constexpr (RoundTo == 2) {
        round_f16_lanes<L>(w0);
        round_f16_lanes<L>(w1);
      }
      std::memcpy(&tile[k][g * L], &w0, sizeof w0);
      std::memcpy(&tile[k + 1][g * L], &w1, sizeof w1);
    };
    // k and k + 1 of each row from `bytes`, the byte of each row that holds them (k0 is even: chunks are)
    const auto fill_pair = [&](int64_t k, const v16b& bytes) __attribute__((always_inline)) {
      // through 16 bits: GCC converts bytes to 32 bits directly a value at a time in the target clones
      const v16h wide = __builtin_convertvector(bytes, v16h);
      for (int g = 0; g < kGroups; ++g) {
        typename Lanes<L>::H half;
        std::memcpy(&half, reinterpret_cast<const uint16_t*>(&wide) + g * L, sizeof half);
        const I codes = __builtin_convertvector(half, I);
        store_pair(k, g, codes >> 4, codes & 15);  // the first weight of a byte is its high nibble
      }
    };
    // 32 values of every row at a time; where blocks are whole groups of 32 (and chunks start on a group: they are
    // kNtChunk long), the constants can change only at a group's first pair
    const bool groups_in_blocks = blocksize % 32 == 0 && k0 % 32 == 0;
    // the next chunk's bytes of the 16 rows (16 streams, more than the hardware prefetchers follow), asked for now so
    // that they arrive while this chunk is dequantized and multiplied
    const int64_t next_bytes = std::min(kNtChunk, in - (k0 + kc)) / 2;  // within each row
    for (int64_t j = 0; j < kNtTile; ++j)
      for (int64_t line = 0; line < next_bytes; line += 64) __builtin_prefetch(row[j] + ((k0 + kc) >> 1) + line);
    int64_t k = 0;
    if constexpr (L == 16 && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__) {
      // With 16 lanes, 128 values of every row at a time: a row's 64 bytes as 16 words, transposed so that word q of
      // every row is one vector. Byte b of a word holds values 8q + 2b (high nibble) and 8q + 2b + 1; the word shifted
      // to a nibble is its code's index as it is, with no bytes widened to lanes.
      typedef typename Lanes<16>::U U;
      for (; groups_in_blocks && k + 128 <= kc; k += 128) {
        U words[kNtTile];
        for (int64_t j = 0; j < kNtTile; ++j) std::memcpy(&words[j], row[j] + ((k0 + k) >> 1), sizeof words[j]);
        transpose<16, U, U>(words);
        for (int q = 0; q < 16; ++q) {
          if (q % 4 == 0) update_scales(k0 + k + 8 * q);  // blocks are whole groups of 32 values
          for (int b = 0; b < 4; ++b) {
            const U high = words[q] >> (8 * b + 4), low = words[q] >> (8 * b);
            store_pair(k + 8 * q + 2 * b, 0, reinterpret_cast<const I&>(high), reinterpret_cast<const I&>(low));
          }
        }
      }
    }
    for (; k + 32 <= kc; k += 32) {
      v16b bytes[kNtTile];
      for (int64_t j = 0; j < kNtTile; ++j) std::memcpy(&bytes[j], row[j] + ((k0 + k) >> 1), sizeof bytes[j]);
      transpose<16, v16b, v16b>(bytes);
      if (groups_in_blocks) {
        update_scales(k0 + k);
        for (int64_t p = 0; p < 16; ++p) fill_pair(k + 2 * p, bytes[p]);
      } else {
        for (int64_t p = 0; p < 16; ++p) {
          update_scales(k0 + k + 2 * p);
          fill_pair(k + 2 * p, bytes[p]);
        }
      }
    }
    for (; k < kc; k += 2) {
      v16b bytes;
      for (int64_t j = 0; j < kNtTile; ++j) bytes[j] = row[j][(k0 + k) >> 1];
      update_scales(k0 + k);
      fill_pair(k, bytes);
    }
  }
};

}  // namespace
#endif

namespace {

// The fill for an NF4 W [out, in]: tile[k][j] = W[o0 + j, k0 + k] dequantized and rounded as nf4_dequantize computes
// and rounds it, a value at a time; any `in` and block size.
struct Nf4Tile {
  const uint8_t* packed;
  const float* absmax;
  int64_t o0, cols, in;
  int blocksize;
  nf4::Rounding round;

  QLORA_ALWAYS_INLINE void operator()(int64_t k0, int64_t kc, float (*tile)[kNtTile]) const {
    for (int64_t j = 0; j < kNtTile; ++j) {
      // a block's 16 values are built once (a block of `blocksize` consecutive weights may start inside a row and
      // end in the next)
      const int64_t o = o0 + std::min(j, cols - 1);  // lanes past cols repeat the last output, unused
      float table[16];
      int64_t i = o * in + k0, k = 0;
      const int64_t end = i + kc;
      while (i < end) {
        const int64_t block = i / blocksize;
        const int64_t stop = std::min(end, (block + 1) * blocksize);
        nf4::block_values(absmax[block], round, table);
        if (i & 1) {  // a segment starting on a byte's second weight
          tile[k++][j] = table[packed[i >> 1] & 0x0f];
          ++i;
        }
        for (; i + 1 < stop; i += 2, k += 2) {  // two weights a byte, the first in the high nibble
          const uint8_t byte = packed[i >> 1];
          tile[k][j] = table[byte >> 4];
          tile[k + 1][j] = table[byte & 0x0f];
        }
        if (i < stop) {
          tile[k++][j] = table[packed[i >> 1] >> 4];
          ++i;
        }
      }
    }
  }
};

#if QLORA_GCC_SHUFFLES
template <typename TB, int L>
using FastWidenedTile = WidenedTileLanes<TB, L>;
template <int L>
using FastPackTransposed = PackTransposedLanes<L>;
#else
template <typename TB, int L>
using FastWidenedTile = WidenedTile<float, TB>;
template <int L>
using FastPackTransposed = PackTransposed;
#endif

}  // namespace

// gemm_panel with its sums in registers of 16 lanes or 8 (has_avx512), B^T's chunks transposed in registers.
template <typename TB>
QLORA_ALWAYS_INLINE void gemm_panel_lanes(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K,
                                          float alpha, const float* a, const TB* b, bool trans_b, float beta, float* C,
                                          float* acc, float* pack) {
  if (has_avx512())
    gemm_panel<float, TB, 16>(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack,
                              FastPackTransposed<16>{});
  else
    gemm_panel<float, TB, 8>(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack,
                             FastPackTransposed<8>{});
}

QLORA_SIMD_CLONES
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const float* b, bool trans_b, float beta, float* C, float* acc, float* pack) {
  gemm_panel_lanes(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
}

QLORA_SIMD_CLONES
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const Bf16Bits* b, bool trans_b, float beta, float* C, float* acc, float* pack) {
  gemm_panel_lanes(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
}

QLORA_SIMD_CLONES
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const F16Bits* b, bool trans_b, float beta, float* C, float* acc, float* pack) {
  gemm_panel_lanes(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
}



// gemm_nt_tile with 16 rows of B at a time transposed in registers, in vectors of 16 lanes or 8 (has_avx512).
template <typename TB>
QLORA_ALWAYS_INLINE void gemm_nt_tile_lanes(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha,
                                            const float* A, const TB* B, float beta, float* C) {
  const int64_t first = nt_first_chunk(B + n0 * K, static_cast<int64_t>(sizeof(TB)), K);
  if (has_avx512())
    nt_tile_product<16>(n0, cols, M, N, K, alpha, A, beta, C, FastWidenedTile<TB, 16>{B, n0, cols, K}, first);
  else
    nt_tile_product<8>(n0, cols, M, N, K, alpha, A, beta, C, FastWidenedTile<TB, 8>{B, n0, cols, K}, first);
}

QLORA_SIMD_CLONES
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const float* B, float beta, float* C) {
  gemm_nt_tile_lanes(n0, cols, M, N, K, alpha, A, B, beta, C);
}

QLORA_SIMD_CLONES
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const Bf16Bits* B, float beta, float* C) {
  gemm_nt_tile_lanes(n0, cols, M, N, K, alpha, A, B, beta, C);
}

QLORA_SIMD_CLONES
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const F16Bits* B, float beta, float* C) {
  gemm_nt_tile_lanes(n0, cols, M, N, K, alpha, A, B, beta, C);
}

// transpose_16_rows with 16 or 8 lanes (has_avx512), for transpose_16_rows_f32.
template <typename TB>
QLORA_ALWAYS_INLINE void transpose_16_rows_lanes(const TB* src, int64_t ld_src, int64_t cols, float* dst,
                                                 int64_t ld_dst) {
  const TB* row[16];
  for (int64_t j = 0; j < 16; ++j) row[j] = src + j * ld_src;
#if QLORA_GCC_SHUFFLES
  if (has_avx512())
    transpose_16_rows<16>(row, cols, dst, ld_dst);
  else
    transpose_16_rows<8>(row, cols, dst, ld_dst);
#else
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t j = 0; j < 16; ++j) dst[c * ld_dst + j] = widen<float>(row[j][c]);
#endif
}

QLORA_SIMD_CLONES
void transpose_16_rows_f32(const float* src, int64_t ld_src, int64_t cols, float* dst, int64_t ld_dst) {
  transpose_16_rows_lanes(src, ld_src, cols, dst, ld_dst);
}

QLORA_SIMD_CLONES
void transpose_16_rows_f32(const Bf16Bits* src, int64_t ld_src, int64_t cols, float* dst, int64_t ld_dst) {
  transpose_16_rows_lanes(src, ld_src, cols, dst, ld_dst);
}

QLORA_SIMD_CLONES
void transpose_16_rows_f32(const F16Bits* src, int64_t ld_src, int64_t cols, float* dst, int64_t ld_dst) {
  transpose_16_rows_lanes(src, ld_src, cols, dst, ld_dst);
}

namespace {

nf4::Rounding rounding_of(int round_to) {
  return round_to == 1 ? round_to_bf16 : round_to == 2 ? round_to_f16 : nullptr;
}

#if QLORA_GCC_SHUFFLES
// 32 values from 16 bytes (two codes a byte, the first in the high nibble): each code's value from `table`, the
// block's 16 values, in vectors of L lanes.
template <int L>
QLORA_ALWAYS_INLINE void dequantize_32(const uint8_t* bytes, const float* table, float* out) {
  typedef typename Lanes<L>::F F;
  typedef typename Lanes<L>::I I;
  F values[16 / L];
  std::memcpy(values, table, sizeof values);
  for (int g = 0; g < 16 / L; ++g) {  // L bytes: 2L values
    I codes;
    for (int j = 0; j < L; ++j) codes[j] = bytes[g * L + j];
    F high, low;
    if constexpr (L == 16) {
      high = __builtin_shuffle(values[0], codes >> 4);
      low = __builtin_shuffle(values[0], codes & 15);
    } else {
      high = __builtin_shuffle(values[0], values[1], codes >> 4);
      low = __builtin_shuffle(values[0], values[1], codes & 15);
    }
    // interleaved: high[0] low[0] high[1] low[1] ...
    I first, second;
    for (int j = 0; j < L; ++j) {
      first[j] = (j % 2 == 0 ? 0 : L) + j / 2;
      second[j] = (j % 2 == 0 ? 0 : L) + L / 2 + j / 2;
    }
    const F a = __builtin_shuffle(high, low, first), b = __builtin_shuffle(high, low, second);
    std::memcpy(out + g * 2 * L, &a, sizeof a);
    std::memcpy(out + g * 2 * L + L, &b, sizeof b);
  }
}
#endif

}  // namespace

QLORA_SIMD_CLONES
void nf4_dequantize_f32(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, int round_to,
                        float* out) {
  nf4::check_blocksize(blocksize, "nf4_dequantize_f32");
  const nf4::Rounding round = rounding_of(round_to);
  int64_t done = 0;  // values the vector code wrote: whole blocks
#if QLORA_GCC_SHUFFLES
  if (blocksize % 32 == 0) {
    const bool wide = has_avx512();
    const int64_t full_blocks = n / blocksize;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < full_blocks; ++b) {
      alignas(64) float table[16];
      nf4::block_values(absmax[b], round, table);
      for (int64_t i = b * blocksize; i < (b + 1) * blocksize; i += 32) {
        if (wide)
          dequantize_32<16>(packed + i / 2, table, out + i);
        else
          dequantize_32<8>(packed + i / 2, table, out + i);
      }
    }
    done = full_blocks * blocksize;
  }
#endif
  // the rest (a last partial block, or every block of a size the vectors do not take) as nf4::dequantize does it
  if (done < n) nf4::dequantize(packed + done / 2, absmax + done / blocksize, n - done, blocksize, out + done, round);
}

QLORA_SIMD_CLONES
void dot_rows_few_f32(const float* xs, int64_t m, const float* rows, int64_t ld, int64_t count, int64_t dim,
                      float* out) {
  for (int64_t n0 = 0; n0 < count; n0 += kNtTile) {
    const int64_t cols = std::min(kNtTile, count - n0);
    if (has_avx512())
      nt_tile_product<16>(n0, cols, m, count, dim, 1.0f, xs, 0.0f, out, FastWidenedTile<float, 16>{rows, n0, cols, ld});
    else
      nt_tile_product<8>(n0, cols, m, count, dim, 1.0f, xs, 0.0f, out, FastWidenedTile<float, 8>{rows, n0, cols, ld});
  }
}

void dot_rows_f32(const float* x, const float* rows, int64_t ld, int64_t count, int64_t dim, float* out) {
  dot_rows_few_f32(x, 1, rows, ld, count, dim, out);
}

#if QLORA_GCC_SHUFFLES
namespace {
typedef uint32_t U8 __attribute__((vector_size(32)));

// philox4x32_10_rounds on eight counters at a time in GCC's vectors, whose 64-bit lanes GCC multiplies with three
// 32-bit multiplies each, not knowing their high halves are zero.
struct Philox8Rounds {
  QLORA_ALWAYS_INLINE void operator()(U8& c0, U8& c1, U8& c2, U8& c3, uint32_t k0, uint32_t k1) const {
    philox4x32_10_rounds(c0, c1, c2, c3, k0, k1, [](uint32_t m, const U8& a, U8& hi, U8& lo) {
      typedef uint64_t Q8 __attribute__((vector_size(64)));
      const Q8 product = __builtin_convertvector(a, Q8) * uint64_t{m};
      hi = __builtin_convertvector(product >> 32, U8);
      lo = __builtin_convertvector(product, U8);
    });
  }
};

#if defined(__x86_64__)
// The same rounds with two vpmuludq for sixteen lanes (AVX-512) or eight (AVX2), which multiply the low halves of
// 64-bit lanes: the multiplies were most of dropout's time, and dropout a tenth of a CPU step with LoRA dropout.
// dropout_f32 picks them where the CPU has the instructions: its AVX-512 and AVX2 versions inline them, the
// baseline's calls them.
__attribute__((target("avx2"), always_inline)) inline void mul_hi_lo_avx2(uint32_t m, const U8& a, U8& hi, U8& lo) {
  __m256i lanes;
  std::memcpy(&lanes, &a, sizeof lanes);
  const __m256i factor = _mm256_set1_epi64x(m);
  // lanes 0, 2, 4, 6 in the even products' halves, 1, 3, 5, 7 in the odd ones' (their lanes shifted down first)
  const __m256i even = _mm256_mul_epu32(lanes, factor), odd = _mm256_mul_epu32(_mm256_srli_epi64(lanes, 32), factor);
  const __m256i low = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xaa);
  const __m256i high = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xaa);
  std::memcpy(&lo, &low, sizeof lo);
  std::memcpy(&hi, &high, sizeof hi);
}
typedef uint32_t U16 __attribute__((vector_size(64)));
// Sixteen lanes a register: the even lanes' products and the odd lanes' (shifted down first), their halves blended.
__attribute__((target("avx512f"), always_inline)) inline void mul_hi_lo_avx512(uint32_t m, const U16& a, U16& hi,
                                                                              U16& lo) {
  __m512i lanes;
  std::memcpy(&lanes, &a, sizeof lanes);
  const __m512i factor = _mm512_set1_epi64(m);
  const __m512i even = _mm512_mul_epu32(lanes, factor), odd = _mm512_mul_epu32(_mm512_srli_epi64(lanes, 32), factor);
  const __m512i low = _mm512_mask_blend_epi32(0xaaaa, even, _mm512_slli_epi64(odd, 32));
  const __m512i high = _mm512_mask_blend_epi32(0xaaaa, _mm512_srli_epi64(even, 32), odd);
  std::memcpy(&lo, &low, sizeof lo);
  std::memcpy(&hi, &high, sizeof hi);
}
struct Philox16RoundsAvx512 {
  __attribute__((target("avx512f"))) void operator()(U16& c0, U16& c1, U16& c2, U16& c3, uint32_t k0,
                                                     uint32_t k1) const {
    QLORA_PHILOX4X32_10_ROUNDS(U16, c0, c1, c2, c3, k0, k1, mul_hi_lo_avx512);
  }
};
struct Philox8RoundsAvx2 {
  __attribute__((target("avx2"))) void operator()(U8& c0, U8& c1, U8& c2, U8& c3, uint32_t k0, uint32_t k1) const {
    QLORA_PHILOX4X32_10_ROUNDS(U8, c0, c1, c2, c3, k0, k1, mul_hi_lo_avx2);
  }
};
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// Philox's four words of L blocks (a block in each lane of c0 .. c3) in counter order, L at a time: block l's words
// 0..3 are values 4l .. 4l + 3.
QLORA_ALWAYS_INLINE void counter_order(const U8& c0, const U8& c1, const U8& c2, const U8& c3, U8 (&words)[4]) {
  const U8 w01_low = __builtin_shuffle(c0, c1, U8{0, 8, 1, 9, 2, 10, 3, 11});
  const U8 w23_low = __builtin_shuffle(c2, c3, U8{0, 8, 1, 9, 2, 10, 3, 11});
  const U8 w01_high = __builtin_shuffle(c0, c1, U8{4, 12, 5, 13, 6, 14, 7, 15});
  const U8 w23_high = __builtin_shuffle(c2, c3, U8{4, 12, 5, 13, 6, 14, 7, 15});
  words[0] = __builtin_shuffle(w01_low, w23_low, U8{0, 1, 8, 9, 2, 3, 10, 11});
  words[1] = __builtin_shuffle(w01_low, w23_low, U8{4, 5, 12, 13, 6, 7, 14, 15});
  words[2] = __builtin_shuffle(w01_high, w23_high, U8{0, 1, 8, 9, 2, 3, 10, 11});
  words[3] = __builtin_shuffle(w01_high, w23_high, U8{4, 5, 12, 13, 6, 7, 14, 15});
}
#if defined(__x86_64__)
QLORA_ALWAYS_INLINE void counter_order(const U16& c0, const U16& c1, const U16& c2, const U16& c3, U16 (&words)[4]) {
  const U16 w01_low = __builtin_shuffle(c0, c1, U16{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23});
  const U16 w23_low = __builtin_shuffle(c2, c3, U16{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23});
  const U16 w01_high = __builtin_shuffle(c0, c1, U16{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31});
  const U16 w23_high = __builtin_shuffle(c2, c3, U16{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31});
  const U16 first{0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23};
  const U16 second{8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31};
  words[0] = __builtin_shuffle(w01_low, w23_low, first);
  words[1] = __builtin_shuffle(w01_low, w23_low, second);
  words[2] = __builtin_shuffle(w01_high, w23_high, first);
  words[3] = __builtin_shuffle(w01_high, w23_high, second);
}
#endif

// The int32 and float vectors as wide as W.
template <typename W>
struct WordLanes;
template <>
struct WordLanes<U8> {
  typedef int32_t I __attribute__((vector_size(32)));
  typedef float F __attribute__((vector_size(32)));
};
#if defined(__x86_64__)
template <>
struct WordLanes<U16> {
  typedef int32_t I __attribute__((vector_size(64)));
  typedef float F __attribute__((vector_size(64)));
};
#endif

// dropout_f32 from `i` (a block's first counter) on, L Philox blocks (4 L values) at a time while whole ones remain,
// W a vector of L words (U8, or U16 for AVX-512's rounds); returns where it stopped.
template <typename W, typename Rounds>
QLORA_ALWAYS_INLINE int64_t dropout_blocks(const float* x, int64_t i, int64_t n, float p, float keep_scale,
                                           const Philox& rng, uint64_t offset, float* out, const Rounds& rounds) {
  constexpr int L = sizeof(W) / sizeof(uint32_t);
  using I = typename WordLanes<W>::I;
  using F = typename WordLanes<W>::F;
  const std::array<uint32_t, 2> key = rng.key();
  for (; i + 4 * L <= n; i += 4 * L) {
    const uint64_t first_block = (offset + static_cast<uint64_t>(i)) >> 2;
    // philox4x32_10 of the L blocks' counters (as Philox::block builds them), a block in each lane
    W c0, c1, c2, c3;
    for (int l = 0; l < L; ++l) {
      c0[l] = static_cast<uint32_t>(first_block + static_cast<uint64_t>(l));
      c1[l] = static_cast<uint32_t>((first_block + static_cast<uint64_t>(l)) >> 32);
      c2[l] = rng.stream_word();
      c3[l] = rng.step_word();
    }
    rounds(c0, c1, c2, c3, key[0], key[1]);
    W words[4];
    counter_order(c0, c1, c2, c3, words);
    for (int v = 0; v < 4; ++v) {
      // philox_uniform: the word's top 24 bits over 2^24
      const W top = words[v] >> 8;
      const F uniform = __builtin_convertvector(reinterpret_cast<const I&>(top), F) * (1.0f / 16777216.0f);
      F xv;
      std::memcpy(&xv, x + i + L * v, sizeof xv);
      const F kept = xv * keep_scale;
      const F dropped = uniform >= p ? kept : F{};
      std::memcpy(out + i + L * v, &dropped, sizeof dropped);
    }
  }
  return i;
}

}  // namespace
#endif

QLORA_SIMD_CLONES
void dropout_f32(const float* x, int64_t n, float p, float keep_scale, const Philox& rng, uint64_t offset,
                 float* out) {
  int64_t i = 0;
  const auto one_at_a_time = [&](int64_t end) {
    for (; i < end; ++i) out[i] = rng.uniform(offset + static_cast<uint64_t>(i)) >= p ? x[i] * keep_scale : 0.0f;
  };
#if QLORA_GCC_SHUFFLES
  // up to the first counter that starts a block, then 16 blocks (64 values) at a time with AVX-512's multiplies, or
  // 8 blocks with AVX2's (narrow vectors forced for tests: AVX2), else with GCC's vectors; 8 blocks at a time after
  // AVX-512's, where fewer than 16 remain
  one_at_a_time(std::min<int64_t>(n, static_cast<int64_t>((4 - offset % 4) % 4)));
#if defined(__x86_64__)
  if (has_avx512())
    i = dropout_blocks<U16>(x, i, n, p, keep_scale, rng, offset, out, Philox16RoundsAvx512{});
  if (has_avx2())
    i = dropout_blocks<U8>(x, i, n, p, keep_scale, rng, offset, out, Philox8RoundsAvx2{});
  else
#endif
    i = dropout_blocks<U8>(x, i, n, p, keep_scale, rng, offset, out, Philox8Rounds{});
#endif
  one_at_a_time(n);
}

QLORA_SIMD_CLONES
void nf4_matmul_tile_f32(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, int64_t o0,
                         int64_t cols, int64_t out, int64_t in, int blocksize, int round_to, float* y) {
#if QLORA_GCC_SHUFFLES
  if (in % 2 == 0 && blocksize % 2 == 0 && in % blocksize == 0) {
    if (has_avx512())
      nt_tile_product<16>(o0, cols, rows, out, in, 1.0f, x, 0.0f, y,
                          Nf4TileLanes<16>{packed, absmax, o0, cols, in, blocksize, round_to});
    else
      nt_tile_product<8>(o0, cols, rows, out, in, 1.0f, x, 0.0f, y,
                         Nf4TileLanes<8>{packed, absmax, o0, cols, in, blocksize, round_to});
    return;
  }
#endif
  const Nf4Tile fill{packed, absmax, o0, cols, in, blocksize, rounding_of(round_to)};
  if (has_avx512())
    nt_tile_product<16>(o0, cols, rows, out, in, 1.0f, x, 0.0f, y, fill);
  else
    nt_tile_product<8>(o0, cols, rows, out, in, 1.0f, x, 0.0f, y, fill);
}

}  // namespace qlora::cpu
