// Causal GQA attention on the tensor cores for bf16 and fp16 compute: the FlashAttention-2 algorithm (tiles of
// queries by tiles of keys, an online softmax, the seq x seq scores never stored), with mma.sync m16n8k16 products in
// the compute's 16-bit type and fp32 accumulation, as torch's sdpa computes under autocast. Q, K, V, dO stay fp32 in
// memory (the engine's activations) and are rounded to 16 bits as they are staged into shared memory; P and dS are
// rounded as they enter their products. bf16 needs sm_80 and newer; fp16 runs from sm_75 (Turing) on. The scalar
// kernels of kernels.cuh remain the fp32 path, and the path of head sizes not built here.
//
// Layouts as in kernels.cuh: q, out, dq [B, T, H, D]; k, v, dk, dv [B, T, KVH, D]; lse and row_dots [B, H, T].
// Forward and dQ: a block of 4 warps takes 64 query rows (16 a warp) of one head. dK/dV: a block of 2 warps takes 32
// keys (16 a warp) of one kv head and loops over the group's query heads, so each block writes only its own rows:
// no atomics, the same sums on every run. Scores are kept in base 2 (scale * log2(e) folded in) for exp2f.
#pragma once
#include <cmath>
#include <cstdint>
#ifndef __CUDACC__
#include <stdexcept>
#endif

#include "cuda/warp_mma.cuh"

namespace qlora::cuda::kernels {
namespace {

constexpr int kFlashThreads = 128;      // forward and dQ: 4 warps
constexpr int kFlashQueryRows = 64;     // query rows of a forward or dQ block (16 a warp)
constexpr int kFlashKeyTile = 64;       // keys of a forward tile
constexpr int kFlashBackKeyTile = 32;   // keys of a dQ tile
constexpr int kFlashDkvThreads = 64;    // dK/dV: 2 warps
constexpr int kFlashDkvKeys = 32;       // keys of a dK/dV block (16 a warp)
constexpr int kFlashDkvQueryTile = 32;  // query rows of a dK/dV tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The head sizes the kernels are instantiated for (a multiple of 16, at most 128).
inline bool flash_head_dim_supported(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

// Rows first..first+ROWS-1 of one head of a [.., T, heads, D] fp32 tensor (`head` at row 0 of this head, rows `stride`
// floats apart), rounded to 16 bits, into a row-major tile; rows at or past seq are zeros.
template <int D, bool F16, int ROWS>
__device__ __forceinline__ void stage_rows(uint16_t (*tile)[D + kTilePad], const float* head, int64_t stride,
                                           int64_t first, int64_t seq) {
  constexpr int kPairsPerRow = D / 2;
  for (int i = threadIdx.x; i < ROWS * kPairsPerRow; i += blockDim.x) {
    const int r = i / kPairsPerRow, c = i % kPairsPerRow * 2;
    const int64_t row = first + r;
    float lo = 0.0f, hi = 0.0f;
    if (row < seq) {
      const float* p = head + row * stride + c;  // 8-byte aligned: c, the strides and the heads' offsets are even
#ifdef __CUDACC__
      const float2 pair = *reinterpret_cast<const float2*>(p);
      lo = pair.x;
      hi = pair.y;
#else
      if (reinterpret_cast<uintptr_t>(p) % 8 != 0)  // the GPU's float2 load would fault
        throw std::runtime_error("cuda_emu: a float2 load from an address that is not 8-byte aligned");
      lo = p[0];
      hi = p[1];
#endif
    }
    store_pair(&tile[r][c], pack_pair<F16>(lo, hi));
  }
}

// seq query rows at positions past..past+seq-1 over past + seq keys (training: past 0; generation's prefill: the
// rows after a KV cache's past ones, batch 1). lse may be null (generation keeps none).
// s [16 x 8 N8] = A [16 x D] (a warp's rows, as A fragments of 16 columns each) times the transpose of the tile's rows
// 0..8 N8-1: scores against keys (Q K^T), or dO against values (dO V^T).
template <bool F16, int D, int N8, int W>
__device__ __forceinline__ void product_with_rows(float (&s)[N8][4], const uint32_t (&a)[D / 16][4],
                                                  const uint16_t (*tile)[W]) {
  QLORA_UNROLL
  for (int kk = 0; kk < D / 16; ++kk)
    QLORA_UNROLL
    for (int n = 0; n < N8; ++n) {
      uint32_t b[2];
      fragment_b_transposed(tile, n * 8, kk * 16, b);
      mma_16816<F16>(s[n], a[kk], b);
    }
}

// acc [16 x D] += P [16 x 8 N8] (accumulators, rounded to 16 bits as they enter) times the tile's rows 0..8 N8-1:
// P V, dS K, P^T dO, dS^T Q.
template <bool F16, int D, int N8, int W>
__device__ __forceinline__ void accumulate_times_rows(float (&acc)[D / 8][4], const float (&p)[N8][4],
                                                      const uint16_t (*tile)[W]) {
  QLORA_UNROLL
  for (int kk = 0; kk < N8 / 2; ++kk) {
    uint32_t a[4];
    accumulators_to_a<F16>(p[2 * kk], p[2 * kk + 1], a);
    QLORA_UNROLL
    for (int n = 0; n < D / 8; ++n) {
      uint32_t b[2];
      fragment_b(tile, kk * 16, n * 8, b);
      mma_16816<F16>(acc[n], a, b);
    }
  }
}

template <int D, bool F16>
__global__ void flash_attention_forward(const float* q, const float* k, const float* v, int64_t seq, int64_t past,
                                        int64_t heads, int64_t kv_heads, float scale, float* out, float* lse) {
  constexpr int BC = kFlashKeyTile;
  static_assert(kFlashQueryRows == BC, "the K tile stages the queries first");
  __shared__ __align__(16) uint16_t s_k[BC][D + kTilePad];
  __shared__ __align__(16) uint16_t s_v[BC][D + kTilePad];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t q0 = int64_t{blockIdx.x} * kFlashQueryRows, h = blockIdx.y, b = blockIdx.z;
  const int64_t group = heads / kv_heads, q_stride = heads * D, kv_stride = kv_heads * D, keys = past + seq;
  const float* qh = q + b * seq * q_stride + h * D;
  const float* kh = k + b * keys * kv_stride + (h / group) * D;
  const float* vh = v + b * keys * kv_stride + (h / group) * D;

  stage_rows<D, F16, kFlashQueryRows>(s_k, qh, q_stride, q0, seq);
  __syncthreads();
  uint32_t qa[D / 16][4];
  QLORA_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) fragment_a(s_k, warp * 16, kk * 16, qa[kk]);

  // this lane's two rows (accumulator entries 0, 1 and 2, 3), their running max (base 2) and partial sums
  const int64_t rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const int64_t block_last_key = past + (q0 + kFlashQueryRows - 1 < seq - 1 ? q0 + kFlashQueryRows - 1 : seq - 1);
  const float scale_log2 = scale * kLog2e;
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int64_t j0 = 0; j0 <= block_last_key; j0 += BC) {
    __syncthreads();  // the previous tile (or the queries) is read
    stage_rows<D, F16, BC>(s_k, kh, kv_stride, j0, keys);
    stage_rows<D, F16, BC>(s_v, vh, kv_stride, j0, keys);
    __syncthreads();
    float s[BC / 8][4] = {};
    product_with_rows<F16, D>(s, qa, s_k);
    float tile_max[2] = {m[0], m[1]};
    QLORA_UNROLL
    for (int n = 0; n < BC / 8; ++n)
      QLORA_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int64_t key = j0 + n * 8 + 2 * t + (i & 1);
        const float x = key <= past + rows[i / 2] && key < keys ? s[n][i] * scale_log2 : -INFINITY;
        s[n][i] = x;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], x);
      }
    float correction[2];
    QLORA_UNROLL
    for (int r = 0; r < 2; ++r) {
      // finite: the first tile holds key 0, which every row sees (a later tile may hold none of a row's keys)
      const float m_new = quad_max(tile_max[r]);
      correction[r] = exp2f(m[r] - m_new);  // 0 on the first tile (m = -inf)
      m[r] = m_new;
      l[r] *= correction[r];
    }
    QLORA_UNROLL
    for (int n = 0; n < D / 8; ++n)
      QLORA_UNROLL
      for (int i = 0; i < 4; ++i) o[n][i] *= correction[i / 2];
    QLORA_UNROLL
    for (int n = 0; n < BC / 8; ++n)
      QLORA_UNROLL
      for (int i = 0; i < 4; ++i) {
        const float p = exp2f(s[n][i] - m[i / 2]);
        s[n][i] = p;
        l[i / 2] += p;
      }
    accumulate_times_rows<F16, D>(o, s, s_v);
  }
  QLORA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float row_sum = quad_sum(l[r]);
    if (rows[r] >= seq) continue;
    float* out_row = out + (b * seq + rows[r]) * q_stride + h * D;
    QLORA_UNROLL
    for (int n = 0; n < D / 8; ++n) {
      out_row[n * 8 + 2 * t] = o[n][2 * r] / row_sum;
      out_row[n * 8 + 2 * t + 1] = o[n][2 * r + 1] / row_sum;
    }
    if (t == 0 && lse) lse[(b * heads + h) * seq + rows[r]] = (m[r] + log2f(row_sum)) * kLn2;
  }
}

// Backward, first pass: D_i = dO_i . O_i into row_dots, and dQ_i = scale sum_j P_ij (dP_ij - D_i) K_j, P recomputed
// from lse and dP = dO V^T, over tiles of 32 keys.
template <int D, bool F16>
__global__ void flash_attention_backward_dq(const float* dout, const float* q, const float* k, const float* v,
                                            const float* out, const float* lse, int64_t seq, int64_t heads,
                                            int64_t kv_heads, float scale, float* row_dots, float* dq) {
  constexpr int BC = kFlashBackKeyTile;
  static_assert(2 * BC == kFlashQueryRows, "the K and V tiles together stage the queries first");
  __shared__ __align__(16) uint16_t s_kv[2 * BC][D + kTilePad];  // keys in rows 0..BC-1, values in BC..2BC-1
  __shared__ float s_dot[kFlashQueryRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t q0 = int64_t{blockIdx.x} * kFlashQueryRows, h = blockIdx.y, b = blockIdx.z;
  const int64_t group = heads / kv_heads, q_stride = heads * D, kv_stride = kv_heads * D;
  const int64_t q_base = b * seq * q_stride + h * D;
  const float* kh = k + b * seq * kv_stride + (h / group) * D;
  const float* vh = v + b * seq * kv_stride + (h / group) * D;
  const int64_t lse_base = (b * heads + h) * seq;

  // D_i in fp32 from the fp32 dO and O, a warp per row
  for (int r = 0; r < 16; ++r) {
    const int64_t row = q0 + warp * 16 + r;
    float part = 0.0f;
    if (row < seq)
      for (int d = lane; d < D; d += 32) part += dout[q_base + row * q_stride + d] * out[q_base + row * q_stride + d];
    part = warp_sum(part);
    if (lane == 0) {
      s_dot[warp * 16 + r] = part;
      if (row < seq) row_dots[lse_base + row] = part;
    }
  }
  uint32_t qa[D / 16][4], doa[D / 16][4];
  stage_rows<D, F16, kFlashQueryRows>(s_kv, q + q_base, q_stride, q0, seq);
  __syncthreads();
  QLORA_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) fragment_a(s_kv, warp * 16, kk * 16, qa[kk]);
  __syncthreads();
  stage_rows<D, F16, kFlashQueryRows>(s_kv, dout + q_base, q_stride, q0, seq);
  __syncthreads();
  QLORA_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) fragment_a(s_kv, warp * 16, kk * 16, doa[kk]);

  const int64_t rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const float dots[2] = {s_dot[warp * 16 + g], s_dot[warp * 16 + g + 8]};
  const float scale_log2 = scale * kLog2e;
  const float lse2[2] = {rows[0] < seq ? lse[lse_base + rows[0]] * kLog2e : 0.0f,
                         rows[1] < seq ? lse[lse_base + rows[1]] * kLog2e : 0.0f};
  const int64_t warp_last_row = q0 + warp * 16 + 15;
  const int64_t block_last_row = q0 + kFlashQueryRows - 1 < seq - 1 ? q0 + kFlashQueryRows - 1 : seq - 1;
  float acc[D / 8][4] = {};
  for (int64_t j0 = 0; j0 <= block_last_row; j0 += BC) {
    __syncthreads();  // the previous tile (or dO) is read
    stage_rows<D, F16, BC>(s_kv, kh, kv_stride, j0, seq);
    stage_rows<D, F16, BC>(s_kv + BC, vh, kv_stride, j0, seq);
    __syncthreads();
    if (j0 > warp_last_row) continue;
    float s[BC / 8][4] = {}, dp[BC / 8][4] = {};
    product_with_rows<F16, D>(s, qa, s_kv);
    product_with_rows<F16, D>(dp, doa, s_kv + BC);
    QLORA_UNROLL
    for (int n = 0; n < BC / 8; ++n)
      QLORA_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int64_t key = j0 + n * 8 + 2 * t + (i & 1), row = rows[i / 2];
        const float p = key <= row && row < seq ? exp2f(s[n][i] * scale_log2 - lse2[i / 2]) : 0.0f;
        s[n][i] = p * (dp[n][i] - dots[i / 2]) * scale;  // dS
      }
    accumulate_times_rows<F16, D>(acc, s, s_kv);
  }
  QLORA_UNROLL
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= seq) continue;
    float* dq_row = dq + q_base + rows[r] * q_stride;
    QLORA_UNROLL
    for (int n = 0; n < D / 8; ++n) {
      dq_row[n * 8 + 2 * t] = acc[n][2 * r];
      dq_row[n * 8 + 2 * t + 1] = acc[n][2 * r + 1];
    }
  }
}

// Backward, second pass: for 32 keys of a kv head, over the group's query heads and tiles of 32 query rows i >= j,
// dV_j = sum_i P_ij dO_i and dK_j = scale sum_i P_ij (dP_ij - D_i) Q_i, with the transposed scores S^T = K Q^T and
// dP^T = V dO^T (the keys as the rows of every product). row_dots: D from the first pass.
template <int D, bool F16>
__global__ void flash_attention_backward_dkv(const float* dout, const float* q, const float* k, const float* v,
                                             const float* lse, const float* row_dots, int64_t seq, int64_t heads,
                                             int64_t kv_heads, float scale, float* dk, float* dv) {
  constexpr int BK = kFlashDkvKeys, BQ = kFlashDkvQueryTile;
  __shared__ __align__(16) uint16_t s_k[BK][D + kTilePad];
  __shared__ __align__(16) uint16_t s_v[BK][D + kTilePad];
  __shared__ __align__(16) uint16_t s_q[BQ][D + kTilePad];
  __shared__ __align__(16) uint16_t s_do[BQ][D + kTilePad];
  __shared__ float s_lse2[BQ], s_dot[BQ];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t key0 = int64_t{blockIdx.x} * BK, kvh = blockIdx.y, b = blockIdx.z;
  const int64_t group = heads / kv_heads, q_stride = heads * D, kv_stride = kv_heads * D;
  const int64_t kv_base = b * seq * kv_stride + kvh * D;
  stage_rows<D, F16, BK>(s_k, k + kv_base, kv_stride, key0, seq);
  stage_rows<D, F16, BK>(s_v, v + kv_base, kv_stride, key0, seq);

  const int64_t keys[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
  const float scale_log2 = scale * kLog2e;
  float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    const int64_t q_base = b * seq * q_stride + h * D, lse_base = (b * heads + h) * seq;
    for (int64_t i0 = key0; i0 < seq; i0 += BQ) {
      __syncthreads();  // K and V are staged; the previous tile is read
      stage_rows<D, F16, BQ>(s_q, q + q_base, q_stride, i0, seq);
      stage_rows<D, F16, BQ>(s_do, dout + q_base, q_stride, i0, seq);
      for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
        const int64_t row = i0 + i;
        s_lse2[i] = row < seq ? lse[lse_base + row] * kLog2e : 0.0f;
        s_dot[i] = row < seq ? row_dots[lse_base + row] : 0.0f;
      }
      __syncthreads();
      float s[BQ / 8][4] = {}, dp[BQ / 8][4] = {};
      QLORA_UNROLL
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ka[4], va[4];
        fragment_a(s_k, warp * 16, kk * 16, ka);
        fragment_a(s_v, warp * 16, kk * 16, va);
        QLORA_UNROLL
        for (int n = 0; n < BQ / 8; ++n) {
          uint32_t qb[2], dob[2];
          fragment_b_transposed(s_q, n * 8, kk * 16, qb);
          mma_16816<F16>(s[n], ka, qb);
          fragment_b_transposed(s_do, n * 8, kk * 16, dob);
          mma_16816<F16>(dp[n], va, dob);
        }
      }
      QLORA_UNROLL
      for (int n = 0; n < BQ / 8; ++n)
        QLORA_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int c = n * 8 + 2 * t + (i & 1);
          const int64_t row = i0 + c;  // the query row of this entry; its key is keys[i / 2]
          const float p = row >= keys[i / 2] && row < seq ? exp2f(s[n][i] * scale_log2 - s_lse2[c]) : 0.0f;
          s[n][i] = p;
          dp[n][i] = p * (dp[n][i] - s_dot[c]) * scale;  // dS^T
        }
      accumulate_times_rows<F16, D>(dv_acc, s, s_do);
      accumulate_times_rows<F16, D>(dk_acc, dp, s_q);
    }
  }
  QLORA_UNROLL
  for (int r = 0; r < 2; ++r) {
    if (keys[r] >= seq) continue;
    float* dk_row = dk + kv_base + keys[r] * kv_stride;
    float* dv_row = dv + kv_base + keys[r] * kv_stride;
    QLORA_UNROLL
    for (int n = 0; n < D / 8; ++n) {
      dk_row[n * 8 + 2 * t] = dk_acc[n][2 * r];
      dk_row[n * 8 + 2 * t + 1] = dk_acc[n][2 * r + 1];
      dv_row[n * 8 + 2 * t] = dv_acc[n][2 * r];
      dv_row[n * 8 + 2 * t + 1] = dv_acc[n][2 * r + 1];
    }
  }
}

}  // namespace
}  // namespace qlora::cuda::kernels
