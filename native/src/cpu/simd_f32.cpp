// The CPU's hottest fp32 loops (the GEMM's panels, generation's few-row products, attention's backward pass), built for AVX-512, AVX2 and the
// baseline, the best chosen when the addon loads (GCC/Clang function multi-versioning on x86-64 Linux with glibc,
// whose ifunc chooses; one version elsewhere). Contraction stays off (no FMA) and no reduction is reordered, so every version rounds each multiply and
// add as the baseline does: the results are bit for bit the same on every CPU.
#include "cpu/kernels.h"
#include "io/dtype.h"
#include "quant/nf4_codebook.h"

#include <cstring>

#include <cstdlib>  // through glibc's features.h: __GLIBC__, which target_clones (ifunc) needs
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define QLORA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QLORA_SIMD_CLONES
#endif

namespace qlora::cpu {

QLORA_SIMD_CLONES
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const float* b, bool trans_b, float beta, float* C, float* acc, float* pack) {
  gemm_panel<float, float>(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
}

QLORA_SIMD_CLONES
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const Bf16Bits* b, bool trans_b, float beta, float* C, float* acc, float* pack) {
  gemm_panel<float, Bf16Bits>(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
}

QLORA_SIMD_CLONES
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const F16Bits* b, bool trans_b, float beta, float* C, float* acc, float* pack) {
  gemm_panel<float, F16Bits>(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
}

QLORA_SIMD_CLONES
void attention_backward_group_f32(const float* dout, const float* q, const float* k, const float* v,
                                  const float* out, const float* lse, int64_t b, int64_t kvh, int64_t seq,
                                  int64_t heads, int64_t kv_heads, int64_t head_dim, float* dq, float* dk, float* dv,
                                  float* p, float* ds) {
  attention_backward_group<float>(dout, q, k, v, out, lse, b, kvh, seq, heads, kv_heads, head_dim, dq, dk, dv, p, ds);
}

QLORA_SIMD_CLONES
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const float* B, float beta, float* C) {
  gemm_nt_tile<float, float>(n0, cols, M, N, K, alpha, A, B, beta, C);
}

QLORA_SIMD_CLONES
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const Bf16Bits* B, float beta, float* C) {
  gemm_nt_tile<float, Bf16Bits>(n0, cols, M, N, K, alpha, A, B, beta, C);
}

QLORA_SIMD_CLONES
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const F16Bits* B, float beta, float* C) {
  gemm_nt_tile<float, F16Bits>(n0, cols, M, N, K, alpha, A, B, beta, C);
}

#if defined(__GNUC__) || defined(__clang__)
namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

// round_to_bf16 lane by lane, in place (round to nearest even; a NaN stays a NaN with its quiet bit set, as
// f32_to_bf16 does). By reference: a 64-byte vector passed by value changes the ABI between the instruction sets.
QLORA_ALWAYS_INLINE void round_bf16_lanes(v16f& v) {
  v16u bits;
  std::memcpy(&bits, &v, sizeof bits);
  const v16u rounded = (bits + (0x7fffu + ((bits >> 16) & 1u))) & 0xffff0000u;
  const v16u nan = ((bits >> 16) | 0x40u) << 16;
  const v16u out = (bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
  std::memcpy(&v, &out, sizeof v);
}

// The tile of nf4_matmul_tile_f32 for one chunk, 16 outputs across the lanes of a vector: for each pair of k (one
// byte of every output row) the 16 codes index the code book, times each row's block constant, rounded. The same
// products and roundings as the scalar fill, so the same bits. Needs rows that start on a byte (`in` even) and
// blocks that start and end with the rows (`in` a multiple of the block size), so all 16 rows change block
// constants at the same k; fp32 or bf16 rounding.
QLORA_ALWAYS_INLINE void nf4_fill_tile_lanes(const uint8_t* packed, const float* absmax, int64_t o0, int64_t cols,
                                             int64_t in, int blocksize, bool bf16, int64_t k0, int64_t kc,
                                             float (*tile)[kNtTile]) {
  v16f codebook;
  for (int c = 0; c < 16; ++c) codebook[c] = nf4::code_value(c);
  const uint8_t* row[kNtTile];
  int64_t first_block[kNtTile];
  for (int64_t j = 0; j < kNtTile; ++j) {
    const int64_t o = o0 + std::min(j, cols - 1);  // lanes past cols repeat the last output, unused
    row[j] = packed + o * in / 2;
    first_block[j] = o * in / blocksize;
  }
  v16f scale = {};
  for (int64_t k = 0; k < kc; k += 2) {
    const int64_t kk = k0 + k;
    if (k == 0 || kk % blocksize == 0)
      for (int64_t j = 0; j < kNtTile; ++j) scale[j] = absmax[first_block[j] + kk / blocksize];
    v16b bytes;
    for (int64_t j = 0; j < kNtTile; ++j) bytes[j] = row[j][kk >> 1];
    const v16i codes = __builtin_convertvector(bytes, v16i);
    v16f w0 = __builtin_shuffle(codebook, codes >> 4) * scale;  // the first weight of a byte: its high nibble
    v16f w1 = __builtin_shuffle(codebook, codes & 15) * scale;
    if (bf16) {
      round_bf16_lanes(w0);
      round_bf16_lanes(w1);
    }
    std::memcpy(tile[k], &w0, sizeof w0);
    std::memcpy(tile[k + 1], &w1, sizeof w1);
  }
}

}  // namespace
#endif

QLORA_SIMD_CLONES
void nf4_matmul_tile_f32(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, int64_t o0,
                         int64_t cols, int64_t out, int64_t in, int blocksize, int round_to, float* y) {
  const auto rounded = [round_to](float v) {
    return round_to == 0 ? v : round_to == 1 ? round_to_bf16(v) : round_to_f16(v);
  };
  alignas(64) float acc[kFewRows][kNtTile] = {};
  alignas(64) float tile[kNtChunk][kNtTile];
#if defined(__GNUC__) || defined(__clang__)
  const bool lanes = in % 2 == 0 && blocksize % 2 == 0 && in % blocksize == 0 && round_to != 2;
#else
  const bool lanes = false;
#endif
  for (int64_t k0 = 0; k0 < in; k0 += kNtChunk) {
    const int64_t kc = std::min(kNtChunk, in - k0);
#if defined(__GNUC__) || defined(__clang__)
    if (lanes) {
      nf4_fill_tile_lanes(packed, absmax, o0, cols, in, blocksize, round_to == 1, k0, kc, tile);
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t r = 0; r < rows; ++r) axpy16(acc[r], x[r * in + k0 + k], tile[k]);
      continue;
    }
#endif
    for (int64_t j = 0; j < kNtTile; ++j) {
      // the weights of output row o, dequantized as nf4_dequantize computes and rounds them, a block's 16 values
      // built once (a block of `blocksize` consecutive weights may start inside a row and end in the next)
      const int64_t o = o0 + std::min(j, cols - 1);  // lanes past cols repeat the last output, unused
      float table[16];
      int64_t i = o * in + k0, k = 0;
      const int64_t end = i + kc;
      while (i < end) {
        const int64_t block = i / blocksize;
        const int64_t stop = std::min(end, (block + 1) * blocksize);
        for (int c = 0; c < 16; ++c) table[c] = rounded(nf4::code_value(c) * absmax[block]);
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
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t r = 0; r < rows; ++r) axpy16(acc[r], x[r * in + k0 + k], tile[k]);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) y[r * out + o0 + j] = 1.0f * acc[r][j];
}

}  // namespace qlora::cpu
