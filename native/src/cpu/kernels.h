// The CPU reference kernels, one function per op, templated on the scalar type: the engine runs them in fp32, the
// native tests run them in fp64 against finite differences. Layouts are row-major; activations of a batch are
// [B*T, features], with heads split as [B, T, H, Dh] (the natural output of x·W^T). The CUDA kernels implement the
// same functions with the same arguments and are tested against these.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "io/dtype.h"
#include "model/adamw_math.h"
#include "util/error.h"
#include "util/per_thread.h"
#include "util/philox.h"
#include "util/simd_clones.h"
#include "cpu/vector_exp.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qlora::cpu {

inline int64_t max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int64_t thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Frozen weights kept in 16 bits (StoredMatrix) are B operands of the GEMMs below, of element type Bf16Bits or
// F16Bits, widened to T (exactly) where they are read or packed; every sum is the one with B widened beforehand.
struct Bf16Bits {
  uint16_t bits;
};
struct F16Bits {
  uint16_t bits;
};
template <typename T, typename TB>
QLORA_ALWAYS_INLINE T widen(TB v) {
  if constexpr (std::is_same_v<TB, Bf16Bits>)
    return static_cast<T>(bf16_to_f32(v.bits));
  else if constexpr (std::is_same_v<TB, F16Bits>)
    return static_cast<T>(f16_to_f32(v.bits));
  else
    return v;
}

// ---------------------------------------------------------------------------------------------------------------
// GEMM: C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C. op(A) = A ([M,K]) or A^T (A stored [K,M]);
// op(B) = B ([K,N]) or B^T (B stored [N,K]). So x·W^T is gemm(false, true, ...). The inner loop is a contiguous
// axpy over a row of B (B^T packed row-major first, whole or a chunk at a time); threads take panels of C (see
// gemm_panel).
// C[m, n] = alpha * sum_k A[m, k] B[n, k] (+ beta C) for a handful of rows m: generation's x·W^T. Each sum runs over
// k in order in T, exactly as gemm's inner loop accumulates it, so the result equals gemm's bit for bit; threads
// split the outputs n (gemm splits rows, which would leave one thread working), and W is read a tile at a time
// instead of being transposed whole first.
template <typename T, typename TB = T>
void gemm_nt_few_rows(int64_t M, int64_t N, int64_t K, T alpha, const T* A, const TB* B, T beta, T* C);

// Rows that take gemm_nt_few_rows.
constexpr int64_t kFewRows = 4;

// Outputs n0 .. n0 + cols - 1 (cols <= 16) of gemm_nt_few_rows. The sums run across 16 outputs at once (one vector)
// instead of along k (which would reorder them): a chunk of W's rows is copied transposed into a small tile so that
// each k adds one contiguous vector per row of A. Always inlined, for gemm_nt_tile_f32's instruction sets.
constexpr int64_t kNtTile = 16;
constexpr int64_t kNtChunk = 256;
// acc[m][0..15] += a * tile[k][0..15], one vector of 16 lanes (GCC/Clang vector extension: element by element, so
// the same bits as the scalar loop; left to itself the compiler vectorizes across m instead).
template <typename T>
QLORA_ALWAYS_INLINE void axpy16(T* acc, T a, const T* x) {
#if defined(__GNUC__) || defined(__clang__)
  if constexpr (std::is_same_v<T, float>) {
    typedef float v16 __attribute__((vector_size(64), aligned(4)));
    *reinterpret_cast<v16*>(acc) += a * *reinterpret_cast<const v16*>(x);
    return;
  }
#endif
  for (int64_t j = 0; j < 16; ++j) acc[j] += a * x[j];
}

// gemm_nt_tile's sums with the tile's values from fill(k0, kc, tile), which writes tile[k][j] = B[n0 + j, k0 + k]
// (widened or dequantized) for k < kc: one loop of sums for every kind of B, however its tile is made. The chunks of
// k are first_chunk long, then kNtChunk each; every sum runs over k in order whatever the chunks (see
// nt_first_chunk).
// Rows: a constant, so that the sums stay in registers instead of going through memory at each k. L: with GCC or
// Clang, fp32 sums in vectors of L lanes (16 or 8: a register of AVX-512 or AVX2, see cpu/simd_f32.cpp), the same
// operations as axpy16's.
template <int Rows, int L, typename T, typename FillTile>
QLORA_ALWAYS_INLINE void nt_tile_product_rows(int64_t n0, int64_t cols, int64_t N, int64_t K, T alpha, const T* A,
                                              T beta, T* C, const FillTile& fill, int64_t first_chunk) {
  alignas(64) T acc[Rows][kNtTile] = {};
  alignas(64) T tile[kNtChunk][kNtTile];
#if defined(__GNUC__) || defined(__clang__)
  if constexpr (std::is_same_v<T, float> && (L == 8 || L == 16)) {
    // sums that live only in the loop over k: GCC keeps an array's sums, or sums that outlive an inlined fill, in
    // memory between iterations, which makes each add wait for a store
    typedef float V __attribute__((vector_size(L * sizeof(float))));
    constexpr int kGroups = kNtTile / L;
    for (int64_t k0 = 0, kc = 0; k0 < K; k0 += kc) {
      kc = std::min(k0 == 0 ? first_chunk : kNtChunk, K - k0);
      fill(k0, kc, tile);
      V sums[Rows][kGroups];
      std::memcpy(sums, acc, sizeof sums);
      for (int64_t k = 0; k < kc; ++k)
        for (int g = 0; g < kGroups; ++g) {
          V b;
          std::memcpy(&b, &tile[k][g * L], sizeof b);
          for (int m = 0; m < Rows; ++m) sums[m][g] += A[m * K + k0 + k] * b;
        }
      std::memcpy(acc, sums, sizeof sums);
    }
  } else
#endif
  {
    for (int64_t k0 = 0, kc = 0; k0 < K; k0 += kc) {
      kc = std::min(k0 == 0 ? first_chunk : kNtChunk, K - k0);
      fill(k0, kc, tile);
      for (int64_t k = 0; k < kc; ++k)
        for (int m = 0; m < Rows; ++m) axpy16(acc[m], A[m * K + k0 + k], tile[k]);
    }
  }
  for (int m = 0; m < Rows; ++m)
    for (int64_t j = 0; j < cols; ++j) {
      T* c = C + m * N + n0 + j;
      *c = beta == T(0) ? alpha * acc[m][j] : beta * *c + alpha * acc[m][j];
    }
}
template <int L, typename T, typename FillTile>
QLORA_ALWAYS_INLINE void nt_tile_product(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, T alpha,
                                         const T* A, T beta, T* C, const FillTile& fill,
                                         int64_t first_chunk = kNtChunk) {
  static_assert(kFewRows == 4, "one case per number of rows");
  if (M <= 0) return;
  switch (M) {
    case 1: return nt_tile_product_rows<1, L>(n0, cols, N, K, alpha, A, beta, C, fill, first_chunk);
    case 2: return nt_tile_product_rows<2, L>(n0, cols, N, K, alpha, A, beta, C, fill, first_chunk);
    case 3: return nt_tile_product_rows<3, L>(n0, cols, N, K, alpha, A, beta, C, fill, first_chunk);
    default: return nt_tile_product_rows<4, L>(n0, cols, N, K, alpha, A, beta, C, fill, first_chunk);
  }
}

// The first chunk of k for rows of B of `ld` values of `bytes` each, the first of them at `row`: where every row
// starts the same distance past a cache line (ld values fill whole lines) and that distance is whole values, the
// values up to the next line, so that the chunks after start on lines and their vector loads never straddle two (a
// bf16 model's weights read where the file's mapping holds them lie where the file puts them: 8 bytes past a line,
// typically, which cost a decoded token over a tenth of its time). Else kNtChunk.
inline int64_t nt_first_chunk(const void* row, int64_t bytes, int64_t ld) {
  constexpr int64_t kLine = 64;
  const int64_t past = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % kLine);
  if (past == 0 || past % bytes != 0 || (ld * bytes) % kLine != 0) return kNtChunk;
  return (kLine - past) / bytes;
}

// fill for B [N, K] stored as TB: rows n0 .. n0 + 15 (lanes past cols repeat the last row, unused) into tile[k][j],
// widened an element at a time. A struct, not a lambda, so that it is inlined into every instruction set's clone.
template <typename T, typename TB>
struct WidenedTile {
  const TB* B;
  int64_t n0, cols, ld;  // ld: B's rows are ld values apart
  QLORA_ALWAYS_INLINE void operator()(int64_t k0, int64_t kc, T (*tile)[kNtTile]) const {
    for (int64_t j = 0; j < kNtTile; ++j) {
      const TB* bn = B + (n0 + std::min(j, cols - 1)) * ld + k0;
      for (int64_t k = 0; k < kc; ++k) tile[k][j] = widen<T>(bn[k]);
    }
  }
};

template <typename T, typename TB>
QLORA_ALWAYS_INLINE void gemm_nt_tile(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                                      const TB* B, T beta, T* C) {
  nt_tile_product<1>(n0, cols, M, N, K, alpha, A, beta, C, WidenedTile<T, TB>{B, n0, cols, K});
}

void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const float* B, float beta, float* C);
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const Bf16Bits* B, float beta, float* C);
void gemm_nt_tile_f32(int64_t n0, int64_t cols, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                      const F16Bits* B, float beta, float* C);

// out[j] = the sum over d < dim, in order, of x[d] * rows[j * ld + d], for j < count: attention's scores (q·k_j)
// and its backward's dp (dout·v_j), 16 rows at a time in vectors (gemm_nt_tile_f32's tiles): the bits of the plain
// loop over d.
void dot_rows_f32(const float* x, const float* rows, int64_t ld, int64_t count, int64_t dim, float* out);
// dot_rows_f32 for any T: in fp32 through it, otherwise a row at a time.
template <typename T>
void dot_rows(const T* x, const T* rows, int64_t ld, int64_t count, int64_t dim, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    dot_rows_f32(x, rows, ld, count, dim, out);
  } else {
    for (int64_t j = 0; j < count; ++j) {
      T dot = 0;
      for (int64_t d = 0; d < dim; ++d) dot += x[d] * rows[j * ld + d];
      out[j] = dot;
    }
  }
}

// dot_rows of m <= kFewRows vectors at once (xs: m rows of dim values, contiguous): out[r * count + j] = the sum over
// d < dim, in order, of xs[r * dim + d] * rows[j * ld + d]; each 16 rows are laid out in lanes once for all m.
void dot_rows_few_f32(const float* xs, int64_t m, const float* rows, int64_t ld, int64_t count, int64_t dim,
                      float* out);
template <typename T>
void dot_rows_few(const T* xs, int64_t m, const T* rows, int64_t ld, int64_t count, int64_t dim, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    dot_rows_few_f32(xs, m, rows, ld, count, dim, out);
  } else {
    for (int64_t r = 0; r < m; ++r) dot_rows(xs + r * dim, rows, ld, count, dim, out + r * count);
  }
}

// Dropout of n values whose uniforms are those of rng (Philox::uniform) at counters offset .. offset + n - 1: out[i]
// = x[i] * keep_scale where the uniform is >= p, else 0. Eight Philox blocks (32 values) at a time in vectors: the
// same words, so the same mask and values, as a block at a time.
void dropout_f32(const float* x, int64_t n, float p, float keep_scale, const Philox& rng, uint64_t offset,
                 float* out);

// The fp32 GEMM's panels, whole transposes and few-row products (gemm_panel_f32, transpose_16_rows_f32,
// gemm_nt_tile_f32, nf4_matmul_tile_f32, dot_rows_f32) use vectors of 8 lanes even where the CPU has AVX-512 (where
// they use 16): for tests, which check that both widths give the same bits. It changes the width, not the
// instruction set's clone the CPU runs.
void force_narrow_vectors(bool narrow);
// The CPU vector code this machine runs, for doctor: the instruction set's version the addon chose when it loaded and
// the vectors' width ("AVX-512, 16-lane vectors").
std::string vector_code();

// nf4::dequantize (round_to: 0 fp32, 1 bf16, 2 fp16), the same bits, on every core: where the block size is a
// multiple of 32, 32 values at a time, their codes looked up in the block's 16 values held in vector registers.
void nf4_dequantize_f32(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, int round_to,
                        float* out);

// Outputs o0 .. o0 + cols - 1 (cols <= 16) of y [rows, out] = x [rows, in] · W^T with W [out, in] in NF4 (codes
// `packed`, one constant per `blocksize` weights), each weight dequantized and rounded (round_to: 0 fp32, 1 bf16,
// 2 fp16) as nf4_dequantize does, summed as gemm_nt_few_rows sums: the same bits as dequantize + gemm.
void nf4_matmul_tile_f32(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, int64_t o0,
                         int64_t cols, int64_t out, int64_t in, int blocksize, int round_to, float* y);

template <typename T, typename TB>
void gemm_nt_few_rows(int64_t M, int64_t N, int64_t K, T alpha, const T* A, const TB* B, T beta, T* C) {
  const int64_t tiles = (N + kNtTile - 1) / kNtTile;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kNtTile, cols = std::min(kNtTile, N - n0);
    if constexpr (std::is_same_v<T, float>)
      gemm_nt_tile_f32(n0, cols, M, N, K, alpha, A, B, beta, C);
    else
      gemm_nt_tile<T, TB>(n0, cols, M, N, K, alpha, A, B, beta, C);
  }
}

// One panel of C = alpha * a b + beta * C (a [M, K] and b [K, N] row-major): rows m0 .. m0 + rows - 1 (rows <= 64) and
// columns n0 .. n0 + cols - 1 (cols <= 512). The sums are kept in `acc` across chunks of 128 k, so that a chunk of b
// (128 x 512, in L2) serves all the panel's rows, four at a time (in registers for 64 or 16 columns at a time, see
// panel_register_block), before the next is read: b is read once per 64 rows of C, not once per 4. Each sum still runs
// over k in order in T, so any vector width, register block and panel size give the same bits. Always inlined, so that
// gemm_panel_f32's AVX-512 and AVX2 versions compile this loop.
constexpr int64_t kGemmPanelRows = 64, kGemmColTile = 512, kGemmKChunk = 128;
// With trans_b, b is stored [N, K] (x · W^T): each chunk is first copied transposed into `pack`, so W is never
// transposed whole (a 128256 x 4096 LM head would be 2 GB). A 16-bit b is packed too, widened, either way.
template <typename TB>
constexpr bool kGemmWidensB = !std::is_same_v<TB, float> && !std::is_same_v<TB, double>;
#if defined(__GNUC__) || defined(__clang__)
// acc[r][j] += a[r][k] * b[k][j] for RR rows, J vectors of L columns and k < kc, in order for each sum, with the
// RR x J sums in registers (loaded at the start, stored at the end): per k, J loads of b and RR of a serve RR * J
// vector products, where the plain loop loads and stores a row of sums per row of a. a's rows are lda apart, b's ldb,
// acc's kGemmColTile.
template <int RR, int J, int L>
QLORA_ALWAYS_INLINE void panel_register_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc,
                                              float* acc) {
  typedef float V __attribute__((vector_size(L * sizeof(float))));
  V sums[RR][J];
  for (int r = 0; r < RR; ++r)
    for (int v = 0; v < J; ++v) std::memcpy(&sums[r][v], acc + r * kGemmColTile + v * L, sizeof(V));
  for (int64_t k = 0; k < kc; ++k) {
    V bv[J];
    for (int v = 0; v < J; ++v) std::memcpy(&bv[v], b + k * ldb + v * L, sizeof(V));
    for (int r = 0; r < RR; ++r) {
      const float av = a[r * lda + k];
      for (int v = 0; v < J; ++v) sums[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int v = 0; v < J; ++v) std::memcpy(acc + r * kGemmColTile + v * L, &sums[r][v], sizeof(V));
}
// panel_register_block over the columns it covers (whole blocks of 64 or 16 columns) for RR rows; returns how many it
// covered.
template <int RR, int L>
QLORA_ALWAYS_INLINE int64_t panel_register_blocks(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                  int64_t kc, int64_t cols, float* acc) {
  constexpr int J = L == 16 ? 4 : 2;  // a row: 64 columns in 4 of AVX-512's 32 registers, 16 in 2 of AVX2's 16
  constexpr int kBlock = J * L;
  const int64_t covered = cols / kBlock * kBlock;
  for (int64_t j0 = 0; j0 < covered; j0 += kBlock) panel_register_block<RR, J, L>(a, lda, b + j0, ldb, kc, acc + j0);
  return covered;
}
#endif

// The chunk k0 .. k0 + kc - 1 of rows j0 .. j1 - 1 (j1 - j0 <= 16) of b (B [N, K] from gemm_panel's row n0 on),
// transposed into pack[k][j] (rows kGemmColTile values apart) and widened: an element at a time.
struct PackTransposed {
  template <typename T, typename TB>
  QLORA_ALWAYS_INLINE void operator()(const TB* b, int64_t j0, int64_t j1, int64_t K, int64_t k0, int64_t kc,
                                      T* pack) const {
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t j = j0; j < j1; ++j) pack[k * kGemmColTile + j] = widen<T>(b[j * K + k0 + k]);
  }
};

// L: with GCC or Clang, fp32 sums of 64 columns (16 with 8 lanes) at a time in registers of L lanes (16 or 8: AVX-512
// or AVX2, see cpu/simd_f32.cpp); 1, or other types, a row of sums at a time. pack_transposed: see PackTransposed.
template <typename T, typename TB, int L = 1, typename PackB = PackTransposed>
QLORA_ALWAYS_INLINE void gemm_panel(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, T alpha,
                                    const T* a, const TB* b, bool trans_b, T beta, T* C,
                                    T* acc /* [kGemmPanelRows][kGemmColTile] */,
                                    T* pack /* [kGemmKChunk][kGemmColTile], with trans_b or a 16-bit b */,
                                    const PackB& pack_transposed = PackB{}) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) acc[r * kGemmColTile + j] = T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKChunk) {
    const int64_t k1 = std::min(K, k0 + kGemmKChunk);
    if (trans_b) {  // 16 rows of b at a time: 16 sequential reads, 64-byte writes
      for (int64_t j0 = 0; j0 < cols; j0 += 16)
        pack_transposed(b + n0 * K, j0, std::min(cols, j0 + 16), K, k0, k1 - k0, pack);
    } else if constexpr (kGemmWidensB<TB>) {
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t j = 0; j < cols; ++j) pack[(k - k0) * kGemmColTile + j] = widen<T>(b[k * N + n0 + j]);
    }
    const bool packed = trans_b || kGemmWidensB<TB>;
    const T* b_chunk = packed ? pack : reinterpret_cast<const T*>(b + k0 * N + n0);
    const int64_t ldb = packed ? kGemmColTile : N;
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int64_t rr = std::min<int64_t>(4, rows - r0);
      const T* a_rows = a + (m0 + r0) * K + k0;
      T* acc_rows = acc + r0 * kGemmColTile;
      int64_t j_from = 0;  // the columns from here on are summed a row at a time
#if defined(__GNUC__) || defined(__clang__)
      if constexpr (std::is_same_v<T, float> && (L == 8 || L == 16)) {
        const int64_t kc = k1 - k0;
        switch (rr) {
          case 4: j_from = panel_register_blocks<4, L>(a_rows, K, b_chunk, ldb, kc, cols, acc_rows); break;
          case 3: j_from = panel_register_blocks<3, L>(a_rows, K, b_chunk, ldb, kc, cols, acc_rows); break;
          case 2: j_from = panel_register_blocks<2, L>(a_rows, K, b_chunk, ldb, kc, cols, acc_rows); break;
          default: j_from = panel_register_blocks<1, L>(a_rows, K, b_chunk, ldb, kc, cols, acc_rows); break;
        }
      }
#endif
      if (j_from == cols) continue;
      for (int64_t k = 0; k < k1 - k0; ++k) {
        const T* brow = b_chunk + k * ldb;
        for (int64_t r = 0; r < rr; ++r) {
          const T av = a_rows[r * K + k];
          T* accr = acc_rows + r * kGemmColTile;
          for (int64_t j = j_from; j < cols; ++j) accr[j] += av * brow[j];
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* crow = C + (m0 + r) * N + n0;
    const T* accr = acc + r * kGemmColTile;
    if (beta == T(0)) {
      for (int64_t j = 0; j < cols; ++j) crow[j] = alpha * accr[j];
    } else {
      for (int64_t j = 0; j < cols; ++j) crow[j] = beta * crow[j] + alpha * accr[j];
    }
  }
}

// The fp32 instance of gemm_panel, compiled for AVX-512 and AVX2 too and chosen at load time by what the CPU has
// (cpu/simd_f32.cpp): the same operations in the same order, so the same bits on every CPU.
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const float* b, bool trans_b, float beta, float* C, float* acc, float* pack);
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const Bf16Bits* b, bool trans_b, float beta, float* C, float* acc, float* pack);
void gemm_panel_f32(int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t N, int64_t K, float alpha,
                    const float* a, const F16Bits* b, bool trans_b, float beta, float* C, float* acc, float* pack);

// C = alpha * a op(b) + beta * C, a [M, K] row-major, b [K, N] or with trans_b [N, K]; threaded over panels of 64
// rows by 512 columns.
template <typename T, typename TB>
void gemm_row_major(int64_t M, int64_t N, int64_t K, T alpha, const T* a, const TB* b, bool trans_b, T beta, T* C) {
  const int64_t panels = (M + kGemmPanelRows - 1) / kGemmPanelRows;
  const int64_t col_tiles = (N + kGemmColTile - 1) / kGemmColTile;
  // Each thread's sums and packed chunk, allocated here (an allocation failure inside the parallel region would end
  // the process instead of reaching the caller) and not zero-filled (gemm_panel writes what it reads).
  const bool packs = trans_b || kGemmWidensB<TB>;
  const int64_t per_thread = kGemmPanelRows * kGemmColTile + (packs ? kGemmKChunk * kGemmColTile : 0);
  const int64_t threads = std::min<int64_t>(max_threads(), panels * col_tiles);
  std::unique_ptr<T[]> scratch(new T[static_cast<size_t>(threads * per_thread)]);
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    T* acc = scratch.get() + thread_index() * per_thread;
    T* pack = acc + kGemmPanelRows * kGemmColTile;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t t = 0; t < col_tiles; ++t) {
        const int64_t m0 = p * kGemmPanelRows, n0 = t * kGemmColTile;
        const int64_t rows = std::min(kGemmPanelRows, M - m0), cols = std::min(kGemmColTile, N - n0);
        if constexpr (std::is_same_v<T, float>)
          gemm_panel_f32(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
        else
          gemm_panel<T, TB>(m0, rows, n0, cols, N, K, alpha, a, b, trans_b, beta, C, acc, pack);
      }
  }
}

// dst[c * ld_dst + j] = src[j * ld_src + c] widened, for 16 rows j and c < cols: a block of transpose_whole, through
// the same transposes in registers as the few-row tiles (cpu/simd_f32.cpp).
void transpose_16_rows_f32(const float* src, int64_t ld_src, int64_t cols, float* dst, int64_t ld_dst);
void transpose_16_rows_f32(const Bf16Bits* src, int64_t ld_src, int64_t cols, float* dst, int64_t ld_dst);
void transpose_16_rows_f32(const F16Bits* src, int64_t ld_src, int64_t cols, float* dst, int64_t ld_dst);

// dst [cols, rows] = src [rows, cols]^T, widened: 16 rows at a time in fp32, the rest (and other types) in 32 x 32
// tiles an element at a time.
template <typename T, typename TB>
void transpose_whole(const TB* src, int64_t rows, int64_t cols, T* dst) {
  int64_t done = 0;  // rows transposed 16 at a time
  if constexpr (std::is_same_v<T, float>) {
    done = rows / 16 * 16;
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < done; r0 += 16) transpose_16_rows_f32(src + r0 * cols, cols, cols, dst + r0, rows);
  }
  constexpr int64_t kTile = 32;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r0 = done; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) dst[c * rows + r] = widen<T>(src[r * cols + c]);
}

template <typename T, typename TB = T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const TB* B, T beta,
          T* C) {
  if (M == 0 || N == 0) return;
  if (!trans_a && trans_b && M <= kFewRows) return gemm_nt_few_rows(M, N, K, alpha, A, B, beta, C);
  // op(A) = A^T is packed row-major (only LoRA's weight gradients ask for it: a handful of rows).
  std::vector<T> a_packed;
  const T* a = A;
  if (trans_a) {
    a_packed.resize(static_cast<size_t>(M * K));
    transpose_whole(A, K, M, a_packed.data());
    a = a_packed.data();
  }
  // B^T is transposed a chunk at a time inside the panels, each panel of 64 rows packing what it reads: with few
  // rows (up to 4 panels) that costs less than transposing B whole, and an LM head is never transposed whole. Many
  // rows with a B of up to 64 MiB: B is transposed once, whole.
  constexpr int64_t kWholeTransposeBytes = int64_t{64} << 20;
  if (trans_b && M > 4 * kGemmPanelRows && K * N * static_cast<int64_t>(sizeof(T)) <= kWholeTransposeBytes) {
    std::unique_ptr<T[]> b_packed(new T[static_cast<size_t>(K * N)]);  // every element is written below
    transpose_whole(B, N, K, b_packed.get());
    return gemm_row_major(M, N, K, alpha, a, b_packed.get(), false, beta, C);
  }
  gemm_row_major(M, N, K, alpha, a, B, trans_b, beta, C);
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm as transformers computes it: y = x / sqrt(mean(x^2) + eps) * w. rstd[row] is kept for backward.
template <typename T>
void rmsnorm_forward(const T* x, const T* w, int64_t rows, int64_t dim, double eps, T* y, T* rstd) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const T s = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    rstd[r] = s;
    T* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = (xr[i] * s) * w[i];
  }
}

// dx = rstd * (dy*w - x_hat * mean(dy*w * x_hat)), x_hat = x * rstd. The norm weight is frozen (not trained).
template <typename T>
void rmsnorm_backward(const T* dy, const T* x, const T* w, const T* rstd, int64_t rows, int64_t dim, T* dx) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dy + r * dim;
    const T s = rstd[r];
    double dot = 0.0;
    for (int64_t i = 0; i < dim; ++i) dot += static_cast<double>(dyr[i]) * w[i] * xr[i] * s;
    const T mean_dot = static_cast<T>(dot / static_cast<double>(dim));
    T* dxr = dx + r * dim;
    for (int64_t i = 0; i < dim; ++i) dxr[i] = s * (dyr[i] * w[i] - xr[i] * s * mean_dot);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE on the two halves of each head (transformers' rotate_half): for i < Dh/2,
//   out[i] = x[i] cos - x[i+h] sin,  out[i+h] = x[i+h] cos + x[i] sin,
// with cos/sin tables [T, Dh/2] for positions 0..T-1 (built by the model from the config's rope settings).
// In place on x [B, T, H, Dh]. Backward applies the inverse rotation (sin negated).
template <typename T>
void rope_apply(T* x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, const float* cos_table,
                const float* sin_table, bool inverse) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t) {
      const float* c = cos_table + t * half;
      const float* s = sin_table + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + ((b * seq + t) * heads + h) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const T ci = static_cast<T>(c[i]);
          const T si = inverse ? -static_cast<T>(s[i]) : static_cast<T>(s[i]);
          const T x1 = v[i], x2 = v[i + half];
          v[i] = x1 * ci - x2 * si;
          v[i + half] = x2 * ci + x1 * si;
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// acc[d] += a[t] * rows[t * ld + d] for t < count in turn, for d < n: each acc[d] summed in the plain loop's order.
// With GCC or Clang, fp32 rows of whole vectors of 16 keep their sums in registers across t (the plain loop stores
// and reloads acc at every t, each add waiting on the last one's store), four vectors at a time: each vector's adds
// wait on its previous one, so one vector alone ran at an add per add latency (attention's P·V over a 64-wide head:
// a quarter of what four independent sums in flight reach).
template <typename T>
QLORA_ALWAYS_INLINE void accumulate_rows(T* acc, const T* a, const T* rows, int64_t ld, int64_t count, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  if constexpr (std::is_same_v<T, float>) {
    if (n % 16 == 0) {
      typedef float V __attribute__((vector_size(64)));
      int64_t d0 = 0;
      for (; d0 + 64 <= n; d0 += 64) {
        V s0, s1, s2, s3;
        std::memcpy(&s0, acc + d0, sizeof s0);
        std::memcpy(&s1, acc + d0 + 16, sizeof s1);
        std::memcpy(&s2, acc + d0 + 32, sizeof s2);
        std::memcpy(&s3, acc + d0 + 48, sizeof s3);
        for (int64_t t = 0; t < count; ++t) {
          const float* row = rows + t * ld + d0;
          V r0, r1, r2, r3;
          std::memcpy(&r0, row, sizeof r0);
          std::memcpy(&r1, row + 16, sizeof r1);
          std::memcpy(&r2, row + 32, sizeof r2);
          std::memcpy(&r3, row + 48, sizeof r3);
          s0 += a[t] * r0;
          s1 += a[t] * r1;
          s2 += a[t] * r2;
          s3 += a[t] * r3;
        }
        std::memcpy(acc + d0, &s0, sizeof s0);
        std::memcpy(acc + d0 + 16, &s1, sizeof s1);
        std::memcpy(acc + d0 + 32, &s2, sizeof s2);
        std::memcpy(acc + d0 + 48, &s3, sizeof s3);
      }
      for (; d0 < n; d0 += 16) {
        V sum;
        std::memcpy(&sum, acc + d0, sizeof sum);
        for (int64_t t = 0; t < count; ++t) {
          V row;
          std::memcpy(&row, rows + t * ld + d0, sizeof row);
          sum += a[t] * row;
        }
        std::memcpy(acc + d0, &sum, sizeof sum);
      }
      return;
    }
  }
#endif
  for (int64_t t = 0; t < count; ++t)
    for (int64_t d = 0; d < n; ++d) acc[d] += a[t] * rows[t * ld + d];
}

// x[i] *= scale for i < n; returns the largest (the loop's std::max order matters only for NaNs and signed zeros, which
// give softmax_and_values the same result either way), 16 lanes at a time with GCC or Clang.
QLORA_ALWAYS_INLINE float scale_and_max(float* x, int64_t n, float scale) {
  float max_value = -INFINITY;
  int64_t i = 0;
#if defined(__GNUC__) || defined(__clang__)
  typedef float V __attribute__((vector_size(64)));
  if (n >= 16) {
    V lanes_max = V{} - INFINITY;
    for (; i + 16 <= n; i += 16) {
      V v;
      std::memcpy(&v, x + i, sizeof v);
      v *= scale;
      std::memcpy(x + i, &v, sizeof v);
      for (int l = 0; l < 16; ++l) lanes_max[l] = std::max(lanes_max[l], v[l]);
    }
    for (int l = 0; l < 16; ++l) max_value = std::max(max_value, lanes_max[l]);
  }
#endif
  for (; i < n; ++i) {
    x[i] *= scale;
    max_value = std::max(max_value, x[i]);
  }
  return max_value;
}

// attend_row once the row's scores p[0..last] are there.
template <typename T>
QLORA_ALWAYS_INLINE T softmax_and_values(T* p, const T* v, int64_t kv_stride, int64_t last, int64_t head_dim, T scale,
                                         T* oi) {
  T max_score = -INFINITY;
  T sum = 0;
  if constexpr (std::is_same_v<T, float>) {
    max_score = scale_and_max(p, last + 1, scale);
    exp_shifted(p, last + 1, max_score);
    for (int64_t j = 0; j <= last; ++j) sum += p[j];
  } else {
    for (int64_t j = 0; j <= last; ++j) {
      p[j] *= scale;
      max_score = std::max(max_score, p[j]);
    }
    for (int64_t j = 0; j <= last; ++j) {
      p[j] = std::exp(p[j] - max_score);
      sum += p[j];
    }
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j <= last; ++j) p[j] *= inv;
  for (int64_t d = 0; d < head_dim; ++d) oi[d] = 0;
  accumulate_rows(oi, p, v, kv_stride, last + 1, head_dim);
  return max_score + std::log(sum);
}

// One query row of causal attention: softmax(scale q·k_j) over the keys j = 0..last into p[0..last] (scratch), and
// out = sum_j p_j v_j; returns the row's log-sum-exp of the scores, max + log(sum exp(s - max)), from which backward
// recomputes p_j = exp(s_j - lse). k and v point at the kv head's first row; rows are kv_stride apart. The KV-cache
// pass uses it, and the full pass attend_rows, which computes each row the same way: a cached pass computes exactly
// what a full one does.
template <typename T>
QLORA_ALWAYS_INLINE T attend_row(const T* qi, const T* k, const T* v, int64_t kv_stride, int64_t last,
                                 int64_t head_dim, T scale, T* p, T* oi) {
  dot_rows(qi, k, kv_stride, last + 1, head_dim, p);
  return softmax_and_values(p, v, kv_stride, last, head_dim, scale, oi);
}

// attend_row<float> built for AVX-512, AVX2 and the baseline, the best chosen when the addon loads (cpu/simd_f32.cpp).
float attend_row_f32(const float* qi, const float* k, const float* v, int64_t kv_stride, int64_t last,
                     int64_t head_dim, float scale, float* p, float* oi);
template <typename T>
T attend_row_best(const T* qi, const T* k, const T* v, int64_t kv_stride, int64_t last, int64_t head_dim, T scale, T* p,
                  T* oi) {
  if constexpr (std::is_same_v<T, float>)
    return attend_row_f32(qi, k, v, kv_stride, last, head_dim, scale, p, oi);
  else
    return attend_row<T>(qi, k, v, kv_stride, last, head_dim, scale, p, oi);
}

// Rows i0 .. i0 + m - 1 (m <= kFewRows) of one head of causal attention, as attend_row computes each (the same
// bits): their scores in one pass over the keys 0 .. i0 + m - 1, which lays each 16 keys out once for all m rows.
// q and out: row i0 of the head, rows q_stride apart; lse: row i0's. xs: m * head_dim scratch; p: m * (i0 + m).
template <typename T>
QLORA_ALWAYS_INLINE void attend_rows(const T* q, int64_t q_stride, const T* k, const T* v, int64_t kv_stride,
                                     int64_t i0, int64_t m, int64_t head_dim, T scale, T* xs, T* p, T* out, T* lse) {
  for (int64_t r = 0; r < m; ++r) std::copy(q + r * q_stride, q + r * q_stride + head_dim, xs + r * head_dim);
  const int64_t count = i0 + m;
  dot_rows_few(xs, m, k, kv_stride, count, head_dim, p);
  for (int64_t r = 0; r < m; ++r)
    lse[r] = softmax_and_values(p + r * count, v, kv_stride, i0 + r, head_dim, scale, out + r * q_stride);
}
void attend_rows_f32(const float* q, int64_t q_stride, const float* k, const float* v, int64_t kv_stride, int64_t i0,
                     int64_t m, int64_t head_dim, float scale, float* xs, float* p, float* out, float* lse);

// Causal self-attention with grouped KV heads: q [B,T,H,Dh], k/v [B,T,Hkv,Dh], out [B,T,H,Dh]; query head h reads
// kv head h / (H/Hkv) (transformers' repeat_kv). Only each row's log-sum-exp, lse [B,H,T], is kept for backward,
// never the T x T probabilities (as FlashAttention keeps them): backward recomputes them.
template <typename T>
void attention_forward(const T* q, const T* k, const T* v, int64_t batch, int64_t seq, int64_t heads,
                       int64_t kv_heads, int64_t head_dim, T* out, T* lse) {
  const int64_t group = heads / kv_heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  PerThreadScratch<T> scratch(static_cast<size_t>(kFewRows * (head_dim + seq)));
  const int64_t blocks = (seq + kFewRows - 1) / kFewRows;  // of kFewRows query rows
#pragma omp parallel num_threads(scratch.threads())
  {
    T* xs = scratch.mine();
    T* p = xs + kFewRows * head_dim;
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t i0 = blk * kFewRows, m = std::min(kFewRows, seq - i0);
          const int64_t kv_offset = b * seq * kv_stride + (h / group) * head_dim;
          const int64_t row = (b * seq + i0) * q_stride + h * head_dim;
          T* row_lse = lse + (b * heads + h) * seq + i0;
          if constexpr (std::is_same_v<T, float>)
            attend_rows_f32(q + row, q_stride, k + kv_offset, v + kv_offset, kv_stride, i0, m, head_dim, scale, xs, p,
                            out + row, row_lse);
          else
            attend_rows<T>(q + row, q_stride, k + kv_offset, v + kv_offset, kv_stride, i0, m, head_dim, scale, xs, p,
                           out + row, row_lse);
        }
  }
}

// Attention of q_len new queries over a KV cache, for generation: query i sits at position past + i and reads the
// cache rows 0..past + i. q/out [q_len, H, Dh]; caches [>= past + q_len, Hkv, Dh].
template <typename T>
void attention_cached(const T* q, const T* k_cache, const T* v_cache, int64_t q_len, int64_t past, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, T* out) {
  const int64_t group = heads / kv_heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  PerThreadScratch<T> scratch(static_cast<size_t>(past + q_len));
#pragma omp parallel num_threads(scratch.threads())
  {
    T* p = scratch.mine();
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < q_len; ++i) {
        const int64_t kv_offset = (h / group) * head_dim;
        attend_row_best(q + i * q_stride + h * head_dim, k_cache + kv_offset, v_cache + kv_offset, kv_stride,
                        past + i, head_dim, scale, p, out + i * q_stride + h * head_dim);
      }
  }
}

// attention_backward_group's scores and dp of a block of query rows against a tile of keys laid out in lanes:
// p[r][t] = the sum over d of q_r[d] k_lanes[d][t], ds[r][t] = the same of dout_r[d] v_lanes[d][t], each over d
// ascending from 0 (axpy16's operations). Two rows at a time with GCC or Clang: four vector sums in flight, where one
// row's two chains of adds waited on the add latency.
template <typename T>
QLORA_ALWAYS_INLINE void tile_scores_and_dp(const T* q, const T* dout, int64_t stride, int64_t rows, const T* k_lanes,
                                            const T* v_lanes, int64_t head_dim, T (*p)[kNtTile], T (*ds)[kNtTile]) {
  int64_t r = 0;
#if defined(__GNUC__) || defined(__clang__)
  if constexpr (std::is_same_v<T, float>) {
    typedef float V __attribute__((vector_size(64)));
    for (; r + 2 <= rows; r += 2) {
      const float* q0 = q + r * stride;
      const float* q1 = q0 + stride;
      const float* o0 = dout + r * stride;
      const float* o1 = o0 + stride;
      V p0{}, p1{}, d0{}, d1{};
      for (int64_t d = 0; d < head_dim; ++d) {
        V kl, vl;
        std::memcpy(&kl, k_lanes + d * kNtTile, sizeof kl);
        std::memcpy(&vl, v_lanes + d * kNtTile, sizeof vl);
        p0 += q0[d] * kl;
        p1 += q1[d] * kl;
        d0 += o0[d] * vl;
        d1 += o1[d] * vl;
      }
      std::memcpy(p[r], &p0, sizeof p0);
      std::memcpy(p[r + 1], &p1, sizeof p1);
      std::memcpy(ds[r], &d0, sizeof d0);
      std::memcpy(ds[r + 1], &d1, sizeof d1);
    }
  }
#endif
  for (; r < rows; ++r) {
    const T* qi = q + r * stride;
    const T* doi = dout + r * stride;
    std::fill(p[r], p[r] + kNtTile, T(0));
    std::fill(ds[r], ds[r] + kNtTile, T(0));
    for (int64_t d = 0; d < head_dim; ++d) {
      axpy16(p[r], qi[d], k_lanes + d * kNtTile);
      axpy16(ds[r], doi[d], v_lanes + d * kNtTile);
    }
  }
}

// P = exp(scale Q·K^T - lse) recomputed from the forward pass's log-sum-exp, dP = dO·V^T,
// dS = P ⊙ (dP - D) with D = rowsum(dO ⊙ O) (= rowsum(dP ⊙ P)), dQ = scale dS·K, dK = scale dS^T·Q, dV = P^T·dO
// (summed over the query heads that share a kv head). Writes dq, dk, dv (not accumulated).
// One (batch, kv head) of attention_backward: its query heads write only its dk/dv slices. Always inlined, so that
// attention_backward_group_f32's AVX-512 and AVX2 versions compile it for their instructions.
//
// Keys go in tiles of 16, whose k and v rows are laid out once, lane by lane, for the scores and dp of every query row
// at or after the tile's first; those rows go in blocks of 16, and each key's dk and dv rows gather the block's 16
// terms in registers (row by row over all keys, each query's pass read and wrote every earlier key's dk and dv rows
// from L2 or farther: most of a CPU step's time at 2048 tokens). Every sum keeps its order: scores and dp over d
// ascending from 0 (as dot_rows), dq_i over keys ascending, dk_j and dv_j over query heads, then query rows
// ascending, so the results are those of the row-by-row loop, bit for bit.
// tiles: 2 * kNtTile * head_dim values; row_dots: seq.
template <typename T>
QLORA_ALWAYS_INLINE void attention_backward_group(const T* dout, const T* q, const T* k, const T* v, const T* out,
                                                  const T* lse, int64_t b, int64_t kvh, int64_t seq, int64_t heads,
                                                  int64_t kv_heads, int64_t head_dim, T* dq, T* dk, T* dv, T* tiles,
                                                  T* row_dots) {
  const int64_t group = heads / kv_heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  const T* kb = k + b * seq * kv_stride + kvh * head_dim;
  const T* vb = v + b * seq * kv_stride + kvh * head_dim;
  T* dkb = dk + b * seq * kv_stride + kvh * head_dim;
  T* dvb = dv + b * seq * kv_stride + kvh * head_dim;
  T* k_lanes = tiles;                       // [head_dim][16]: k_lanes[d][t] = k of key j0 + t at d
  T* v_lanes = tiles + head_dim * kNtTile;  // the same of v
  for (int64_t j = 0; j < seq; ++j)
    for (int64_t d = 0; d < head_dim; ++d) dkb[j * kv_stride + d] = dvb[j * kv_stride + d] = 0;
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    const int64_t head = (b * seq) * q_stride + h * head_dim;  // row 0 of this head in q, dout, out and dq
    for (int64_t i = 0; i < seq; ++i) {
      const T* doi = dout + head + i * q_stride;
      const T* oi = out + head + i * q_stride;
      T row_dot = 0;
      for (int64_t d = 0; d < head_dim; ++d) row_dot += doi[d] * oi[d];
      row_dots[i] = row_dot;
      T* dqi = dq + head + i * q_stride;
      for (int64_t d = 0; d < head_dim; ++d) dqi[d] = 0;
    }
    for (int64_t j0 = 0; j0 < seq; j0 += kNtTile) {
      const int64_t tile_keys = std::min(kNtTile, seq - j0);
      for (int64_t t = 0; t < kNtTile; ++t)  // lanes past the last key hold zeros (their sums are not used)
        for (int64_t d = 0; d < head_dim; ++d) {
          k_lanes[d * kNtTile + t] = t < tile_keys ? kb[(j0 + t) * kv_stride + d] : T(0);
          v_lanes[d * kNtTile + t] = t < tile_keys ? vb[(j0 + t) * kv_stride + d] : T(0);
        }
      // query rows in blocks of 16: each block's probabilities and dS for the tile's keys, then each key's dk and dv
      // summed over the block's rows in registers
      for (int64_t i0 = j0; i0 < seq; i0 += kNtTile) {
        const int64_t rows = std::min(kNtTile, seq - i0);
        alignas(64) T p[kNtTile][kNtTile];   // [row][key]
        alignas(64) T ds[kNtTile][kNtTile];  // dP, then dS
        // the scores into p, then their probabilities; dp into ds
        tile_scores_and_dp(q + head + i0 * q_stride, dout + head + i0 * q_stride, q_stride, rows, k_lanes, v_lanes,
                           head_dim, p, ds);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const int64_t keys = std::min(tile_keys, i + 1 - j0);  // the tile's keys this query row sees
          const T row_lse = lse[(b * heads + h) * seq + i];
          const T row_dot = row_dots[i];
          if constexpr (std::is_same_v<T, float>) {
            for (int64_t t = 0; t < keys; ++t) p[r][t] *= scale;
            exp_shifted(p[r], keys, row_lse);
          } else {
            for (int64_t t = 0; t < keys; ++t) p[r][t] = std::exp(p[r][t] * scale - row_lse);
          }
          for (int64_t t = 0; t < keys; ++t) ds[r][t] = p[r][t] * (ds[r][t] - row_dot) * scale;  // now dS (scaled)
          accumulate_rows(dq + head + i * q_stride, ds[r], kb + j0 * kv_stride, kv_stride, keys, head_dim);
        }
        for (int64_t t = 0; t < tile_keys; ++t) {
          const int64_t first = std::max<int64_t>(0, j0 + t - i0);  // the block's first row that sees key j0 + t
          if (first >= rows) continue;
          T ds_t[kNtTile], p_t[kNtTile];
          for (int64_t r = first; r < rows; ++r) {
            ds_t[r - first] = ds[r][t];
            p_t[r - first] = p[r][t];
          }
          const int64_t row0 = head + (i0 + first) * q_stride;
          accumulate_rows(dkb + (j0 + t) * kv_stride, ds_t, q + row0, q_stride, rows - first, head_dim);
          accumulate_rows(dvb + (j0 + t) * kv_stride, p_t, dout + row0, q_stride, rows - first, head_dim);
        }
      }
    }
  }
}

void attention_backward_group_f32(const float* dout, const float* q, const float* k, const float* v,
                                  const float* out, const float* lse, int64_t b, int64_t kvh, int64_t seq,
                                  int64_t heads, int64_t kv_heads, int64_t head_dim, float* dq, float* dk, float* dv,
                                  float* tiles, float* row_dots);

// out and lse: the forward pass's output and log-sum-exp.
template <typename T>
void attention_backward(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse, int64_t batch,
                        int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim, T* dq, T* dk, T* dv) {
  PerThreadScratch<T> scratch(static_cast<size_t>(2 * kNtTile * head_dim + seq));
  // Each (batch, kv head) is independent, so the loop parallelizes without atomics.
#pragma omp parallel num_threads(scratch.threads())
  {
    T* tiles = scratch.mine();
    T* row_dots = tiles + 2 * kNtTile * head_dim;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
        if constexpr (std::is_same_v<T, float>)
          attention_backward_group_f32(dout, q, k, v, out, lse, b, kvh, seq, heads, kv_heads, head_dim, dq, dk, dv,
                                       tiles, row_dots);
        else
          attention_backward_group<T>(dout, q, k, v, out, lse, b, kvh, seq, heads, kv_heads, head_dim, dq, dk, dv,
                                      tiles, row_dots);
      }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU's exp(-g[i]) for i < n: in fp32 through exp_shifted in chunks of kExpChunk (glibc's expf bits, eight at a
// time), otherwise std::exp; `body(i0, m, e)` then uses e[j] = exp(-g[i0 + j]) for j < m. On every core.
constexpr int64_t kExpChunk = 256;
template <typename T, typename Body>
void with_exp_of_negated(const T* g, int64_t n, const Body& body) {
  const int64_t chunks = (n + kExpChunk - 1) / kExpChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i0 = c * kExpChunk, m = std::min(kExpChunk, n - i0);
    T e[kExpChunk];
    for (int64_t j = 0; j < m; ++j) e[j] = -g[i0 + j];
    if constexpr (std::is_same_v<T, float>)
      exp_shifted(e, m, 0.0f);  // -g - 0 is -g (a negative zero's too)
    else
      for (int64_t j = 0; j < m; ++j) e[j] = std::exp(e[j]);
    body(i0, m, e);
  }
}

// SwiGLU: out = silu(g) * u, silu(g) = g * sigmoid(g).
template <typename T>
void swiglu_forward(const T* g, const T* u, int64_t n, T* out) {
  with_exp_of_negated(g, n, [&](int64_t i0, int64_t m, const T* e) {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = i0 + j;
      const T s = T(1) / (T(1) + e[j]);
      out[i] = g[i] * s * u[i];
    }
  });
}

// dg = dout * u * sigmoid(g) * (1 + g (1 - sigmoid(g))), du = dout * silu(g). dg may be g and du may be u.
template <typename T>
void swiglu_backward(const T* dout, const T* g, const T* u, int64_t n, T* dg, T* du) {
  with_exp_of_negated(g, n, [&](int64_t i0, int64_t m, const T* e) {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = i0 + j;
      const T gi = g[i], ui = u[i], di = dout[i];
      const T s = T(1) / (T(1) + e[j]);
      du[i] = di * gi * s;
      dg[i] = di * ui * s * (T(1) + gi * (T(1) - s));
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Cross-entropy over rows of logits [rows, V] with integer targets; target -100 (transformers' ignore_index) skips
// the row. Returns the sum of -log p(target) over labelled rows. When dlogits is given it receives
// grad_scale * (softmax - onehot) (zero for ignored rows); when target_logprob is given it receives log p(target)
// (0 for ignored rows). The log-sum-exp is accumulated in double.
constexpr int32_t kIgnoreIndex = -100;

template <typename T>
double cross_entropy(const T* logits, const int32_t* targets, int64_t rows, int64_t vocab, double grad_scale,
                     T* dlogits, double* target_logprob) {
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t r = 0; r < rows; ++r) {
    const T* lr = logits + r * vocab;
    const int32_t target = targets[r];
    if (target == kIgnoreIndex || target < 0 || target >= vocab) {  // outside the vocabulary: a NaN log-prob
      if (dlogits)
        for (int64_t i = 0; i < vocab; ++i) dlogits[r * vocab + i] = 0;
      if (target_logprob) target_logprob[r] = target == kIgnoreIndex ? 0.0 : std::nan("");
      continue;
    }
    double max_logit = -INFINITY;
    for (int64_t i = 0; i < vocab; ++i) max_logit = std::max(max_logit, static_cast<double>(lr[i]));
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(lr[i]) - max_logit);
    const double log_z = max_logit + std::log(sum);
    const double logprob = static_cast<double>(lr[target]) - log_z;
    total += -logprob;
    if (target_logprob) target_logprob[r] = logprob;
    if (dlogits) {
      T* dr = dlogits + r * vocab;
      for (int64_t i = 0; i < vocab; ++i)
        dr[i] = static_cast<T>(std::exp(static_cast<double>(lr[i]) - log_z) * grad_scale);
      dr[target] -= static_cast<T>(grad_scale);
    }
  }
  return total;
}

// Log-softmax of each row (the full next-token distribution), the log-sum-exp accumulated in double.
template <typename T>
void log_softmax_rows(const T* logits, int64_t rows, int64_t vocab, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* lr = logits + r * vocab;
    double max_logit = -INFINITY;
    for (int64_t i = 0; i < vocab; ++i) max_logit = std::max(max_logit, static_cast<double>(lr[i]));
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(lr[i]) - max_logit);
    const double log_z = max_logit + std::log(sum);
    for (int64_t i = 0; i < vocab; ++i) out[r * vocab + i] = static_cast<float>(static_cast<double>(lr[i]) - log_z);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AdamW (torch.optim.AdamW semantics, model/adamw_math.h) over n parameters. `step` counts from 1.
template <typename T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, double lr, double beta1, double beta2, double eps,
                  double weight_decay, int64_t step, double grad_scale) {
  const AdamWStep s = adamw_step_constants(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double p = static_cast<double>(param[i]), mi = static_cast<double>(m[i]), vi = static_cast<double>(v[i]);
    adamw_element(s, static_cast<double>(grad[i]), p, mi, vi);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    param[i] = static_cast<T>(p);
  }
}

template <typename T>
double sum_of_squares(const T* x, int64_t n) {
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  return total;
}

}  // namespace qlora::cpu
