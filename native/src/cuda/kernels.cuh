// The GPU kernels of the engine's fp32 ops, one per op of the backend seam, each computing what the CPU reference of
// cpu/kernels.h computes (the same formula, in the same precision: sums the CPU keeps in double are kept in double
// here). Reductions run over the threads of one block through shared memory; only the order of the terms of a sum
// differs from the CPU's, so results agree to rounding. This header is device code that nvcc compiles in
// cuda/cuda_backend.cu, and that the native tests compile as plain C++ under a CUDA emulator (test/cuda_emu.h) to
// check it against the CPU without a GPU. Blocks are one-dimensional, blockDim.x a power of two <= kMaxThreads.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include <stdexcept>

#include "io/dtype.h"
#endif

#include "cuda/warp_mma.cuh"  // QLORA_UNROLL
#include "model/adamw_math.h"
#include "quant/nf4_codebook.h"
#include "util/philox_core.h"

namespace qlora::cuda::kernels {
// Internal linkage: the one translation unit of the engine that includes this (cuda/cuda_backend.cu) and the native
// tests' emulator each have their own copy, so the two can never clash at link time.
namespace {

constexpr int kMaxThreads = 256;
constexpr int32_t kIgnoreIndex = -100;  // transformers' ignore_index, as cpu::kIgnoreIndex

// The maximum as std::max(a, b) takes it (a NaN candidate is skipped, as in the CPU's loops).
template <typename T>
__device__ __forceinline__ T max_of(T a, T b) {
  return a < b ? b : a;
}

// bf16 for the GEMMs of bf16 compute: each value rounded to nearest even, as torch casts.
__device__ __forceinline__ uint16_t bf16_bits(float v) {
#ifdef __CUDACC__
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  return f32_to_bf16(v);
#endif
}

// fp16 likewise (beyond 65504 it is inf, which the loss scaler sees as an overflow).
__device__ __forceinline__ uint16_t f16_bits(float v) {
#ifdef __CUDACC__
  return __half_as_ushort(__float2half_rn(v));
#else
  return f32_to_f16(v);
#endif
}

// v in half compute's 16-bit type: fp16 with f16, else bf16.
__device__ __forceinline__ uint16_t half_bits(bool f16, float v) { return f16 ? f16_bits(v) : bf16_bits(v); }

// 16-bit values widened exactly: format 1 bf16, 2 fp16 (FloatFormat's order).
__device__ __forceinline__ float widen_bits(uint16_t bits, int format) {
#ifdef __CUDACC__
  return format == 1 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
#else
  return format == 1 ? bf16_to_f32(bits) : f16_to_f32(bits);
#endif
}

// half_bits' value: fp16 bits with f16, else bf16.
__device__ __forceinline__ float half_value(bool f16, uint16_t bits) { return widen_bits(bits, f16 ? 2 : 1); }

// A matrix of n values as cols-value rows of a 16-bit one whose rows are ld apart (a GEMM input with room for
// LoRA's columns beside each row): where an op writes its output's 16-bit copy alone.
struct HalfRows {
  uint16_t* data = nullptr;
  int64_t cols = 0, ld = 0;
  __device__ uint16_t& at(int64_t row, int64_t col) const { return data[row * ld + col]; }
};

// Where a grid-stride loop over rows of `cols` values stands, advanced by additions alone: a 64-bit division per
// element would cost an elementwise kernel more than its memory traffic. (No rows of 0 values: a loop over none.)
struct RowPosition {
  int64_t row, col, cols, step_rows, step_cols;
  __device__ RowPosition(int64_t start, int64_t stride, int64_t cols_) : cols(cols_ > 0 ? cols_ : 1) {
    row = start / cols;
    col = start - row * cols;
    step_rows = stride / cols;
    step_cols = stride - step_rows * cols;
  }
  __device__ void advance() {
    row += step_rows;
    col += step_cols;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return max_of(a, b); }
};

// ---- block reductions: every thread passes its value and receives the block's result (a tree in shared memory;
// one buffer per type and operation) ----
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T buf[kMaxThreads];
  const int t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (t < s) buf[t] = op(buf[t], buf[t + s]);
    __syncthreads();
  }
  const T result = buf[0];
  __syncthreads();  // the next reduction may reuse buf
  return result;
}

template <typename T>
__device__ T block_sum(T v) {
  return block_reduce(v, SumOp{});
}
template <typename T>
__device__ T block_max(T v) {
  return block_reduce(v, MaxOp{});
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---- element-wise ----
__global__ void add_inplace(float* y, const float* x, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) y[i] += x[i];
}

__global__ void add_bias_rows(float* y, const float* bias, int64_t rows, int64_t cols) {
  for (int64_t i = global_thread(); i < rows * cols; i += grid_threads()) y[i] += bias[i % cols];
}

__global__ void scale_inplace(float* x, float s, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) x[i] *= s;
}

// Multi-tensor launches: up to kTensorsPerLaunch tensors passed by value in the kernel's parameters, blockIdx.y
// picking one, so that a layer's LoRA parameters take one launch instead of one each (Llama-3-8B's 448 LoRA
// tensors, 14 a layer: 28 launches for the norm and 32 for the update, a layer's page at a time, instead of 448 each).
constexpr int kTensorsPerLaunch = 16;
struct TensorList {
  const float* x[kTensorsPerLaunch];
  int64_t n[kTensorsPerLaunch];
};
struct AdamWTensorList {
  float* param[kTensorsPerLaunch];
  const float* grad[kTensorsPerLaunch];
  float* m[kTensorsPerLaunch];
  float* v[kTensorsPerLaunch];
  int64_t n[kTensorsPerLaunch];
};

// One partial sum of squares (in double) per block, over the tensors of a list (blockIdx.y picks the tensor, whose
// partials go to partial[blockIdx.y * gridDim.x ...]); sum_partials adds them in order: the total is the same on
// every run.
__global__ void sum_of_squares_partial_many(TensorList t, double* partial) {
  const int k = blockIdx.y;
  const float* x = t.x[k];
  double acc = 0.0;
  for (int64_t i = global_thread(); i < t.n[k]; i += grid_threads()) acc += static_cast<double>(x[i]) * x[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(k) * gridDim.x + blockIdx.x] = total;
}

__device__ double sum_in_order(const double* partial, int64_t count) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  return block_sum(acc);
}

__global__ void sum_partials(const double* partial, int64_t count, double* out) {
  const double total = sum_in_order(partial, count);
  if (threadIdx.x == 0) *out = total;
}

// The step's GradScale from the partial sums of its gradients' squares (one block).
__global__ void grad_scale_of_partials(const double* partial, int64_t count, double loss_scale, double max_grad_norm,
                                       GradScale* out) {
  const double total = sum_in_order(partial, count);
  if (threadIdx.x == 0) *out = make_grad_scale(total, loss_scale, max_grad_norm);
}

// SwiGLU: out = silu(g) * u, in fp32 or (where out16 has data) rounded to 16 bits into its rows; g and u read in
// fp32 or (where g16, u16 have data) from their 16-bit rows.
__global__ void swiglu_forward(const float* g, const float* u, int64_t n, int64_t cols, HalfRows g16, HalfRows u16,
                               float* out, HalfRows out16, bool f16) {
  RowPosition at(global_thread(), grid_threads(), cols);
  for (int64_t i = global_thread(); i < n; i += grid_threads(), at.advance()) {
    const float gi = g16.data ? half_value(f16, g16.at(at.row, at.col)) : g[i];
    const float ui = u16.data ? half_value(f16, u16.at(at.row, at.col)) : u[i];
    const float s = 1.0f / (1.0f + expf(-gi));
    const float v = gi * s * ui;
    if (out16.data)
      out16.at(at.row, at.col) = half_bits(f16, v);
    else
      out[i] = v;
  }
}

// dg may be g and du may be u, and dg16, du16 g16's and u16's rows: each element is read before it is written.
// dout, g and u read as swiglu_forward reads g and u; dg and du in fp32, or each (where its HalfRows has data)
// rounded to 16 bits into its rows.
__global__ void swiglu_backward(const float* dout, HalfRows dout16, const float* g, const float* u, int64_t n,
                                int64_t cols, HalfRows g16, HalfRows u16, float* dg, float* du, HalfRows dg16,
                                HalfRows du16, bool f16) {
  RowPosition at(global_thread(), grid_threads(), cols);
  for (int64_t i = global_thread(); i < n; i += grid_threads(), at.advance()) {
    const float gi = g16.data ? half_value(f16, g16.at(at.row, at.col)) : g[i];
    const float ui = u16.data ? half_value(f16, u16.at(at.row, at.col)) : u[i];
    const float di = dout16.data ? half_value(f16, dout16.at(at.row, at.col)) : dout[i];
    const float s = 1.0f / (1.0f + expf(-gi));
    const float dui = di * gi * s;
    const float dgi = di * ui * s * (1.0f + gi * (1.0f - s));
    if (du16.data)
      du16.at(at.row, at.col) = half_bits(f16, dui);
    else
      du[i] = dui;
    if (dg16.data)
      dg16.at(at.row, at.col) = half_bits(f16, dgi);
    else
      dg[i] = dgi;
  }
}

// AdamW in double, the CPU's adamw_element: the step's constants from the host, the gradient's scale from the
// device (grad_scale_of_partials); nothing is written where the norm is not finite.
__global__ void adamw_update_many(AdamWTensorList t, AdamWStep s, const GradScale* scale) {
  if (!scale->finite) return;
  s.grad_scale = scale->scale;
  const int k = blockIdx.y;
  float *param = t.param[k], *m = t.m[k], *v = t.v[k];
  const float* grad = t.grad[k];
  for (int64_t i = global_thread(); i < t.n[k]; i += grid_threads()) {
    double p = param[i], mi = m[i], vi = v[i];
    adamw_element(s, static_cast<double>(grad[i]), p, mi, vi);
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    param[i] = static_cast<float>(p);
  }
}

// Dropout with the CPU's mask: element i keeps x[i] / (1 - p) when the Philox uniform of counter offset + i
// (seed, stream, step) is >= p. Each thread computes one Philox block: four consecutive counters. x read in fp32
// or (where x16 has data) from its 16-bit rows.
__global__ void dropout(const float* x, HalfRows x16, bool f16, int64_t n, float p, uint64_t seed, uint32_t stream,
                        uint32_t step, uint64_t offset, float keep_scale, float* out) {
  const uint64_t first_block = offset >> 2, last_block = (offset + static_cast<uint64_t>(n) + 3) >> 2;
  const int64_t blocks = static_cast<int64_t>(last_block - first_block);
  for (int64_t t = global_thread(); t < blocks; t += grid_threads()) {
    const uint64_t b = first_block + static_cast<uint64_t>(t);
    const PhiloxWords words = philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), stream, step,
                                            static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const int64_t first = static_cast<int64_t>(b * 4 - offset);  // of the block's four (some may be outside 0..n)
    for (int w = 0; w < 4; ++w) {
      const int64_t i = first + w;
      if (i < 0 || i >= n) continue;
      float xi = 0.0f;
      if (x16.data) {
        const int64_t row = i / x16.cols;
        xi = half_value(f16, x16.at(row, i - row * x16.cols));
      } else {
        xi = x[i];
      }
      out[i] = philox_uniform(words.w[w]) >= p ? xi * keep_scale : 0.0f;
    }
  }
}

// rows x cols 16-bit values (fp16 with f16, else bf16), their rows ld apart, widened to fp32 [rows, cols].
__global__ void widen_rows(const uint16_t* x, int64_t rows, int64_t cols, int64_t ld, bool f16, float* out) {
  RowPosition at(global_thread(), grid_threads(), cols);
  for (int64_t i = global_thread(); i < rows * cols; i += grid_threads(), at.advance())
    out[i] = half_value(f16, x[at.row * ld + at.col]);
}

// ---- frozen weights stored in 16 bits (StoredMatrix): format 1 bf16, 2 fp16 (FloatFormat's order) ----

// A stored value of format 0 (fp32), 1 or 2 at index i, as fp32.
__device__ __forceinline__ float load_stored(const void* data, int format, int64_t i) {
  return format == 0 ? static_cast<const float*>(data)[i] : widen_bits(static_cast<const uint16_t*>(data)[i], format);
}

__global__ void widen_to_f32(const uint16_t* x, int64_t n, int format, float* out) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) out[i] = widen_bits(x[i], format);
}

// ---- rows: one block per row ----
__global__ void embedding(const int32_t* ids, const void* table, int format, int64_t dim, float* out) {
  const int64_t r = blockIdx.x;
  const int64_t row = static_cast<int64_t>(ids[r]) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = load_stored(table, format, row + i);
}

// RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) with the sum in double; y in fp32 or (where y16 has
// data) rounded to 16 bits into its rows.
__global__ void rmsnorm_forward(const float* x, const float* w, int64_t dim, double eps, float* y, HalfRows y16,
                                bool f16, float* rstd) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += static_cast<double>(xr[i]) * xr[i];
  ss = block_sum(ss);
  const float s = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(dim) + eps));
  if (threadIdx.x == 0) rstd[r] = s;
  if (y16.data) {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) y16.at(r, i) = half_bits(f16, (xr[i] * s) * w[i]);
    return;
  }
  float* yr = y + r * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = (xr[i] * s) * w[i];
}

// dx = rstd * (dy*w - x_hat * mean(dy*w * x_hat)).
__global__ void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, int64_t dim,
                                 float* dx) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  const float* dyr = dy + r * dim;
  const float s = rstd[r];
  double dot = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dot += static_cast<double>(dyr[i]) * w[i] * xr[i] * s;
  dot = block_sum(dot);
  const float mean_dot = static_cast<float>(dot / static_cast<double>(dim));
  float* dxr = dx + r * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dxr[i] = s * (dyr[i] * w[i] - xr[i] * s * mean_dot);
}

// The log-sum-exp of one row, by the whole block: the row's max and log(sum_i exp(row[i] - max)). The exponentials
// and each thread's sum in fp32, as torch computes a loss (a consumer GPU runs fp64 at 1/32 to 1/64 of fp32's rate,
// which made double exponentials a few percent of a small model's step), the sum compensated (Kahan) so that a row
// of 128k logits stays within about 1e-7 of the exact sum; the threads' sums add up in double.
struct RowLogSumExp {
  float max;
  double log_sum;
  __device__ double value() const { return static_cast<double>(max) + log_sum; }
};
__device__ RowLogSumExp row_log_sum_exp(const float* row, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = max_of(m, row[i]);
  m = block_max(m);
  float sum = 0.0f, lost = 0.0f;  // lost: what the last addition rounded away (Kahan)
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float term = expf(row[i] - m) - lost;
    const float next = sum + term;
    lost = (next - sum) - term;
    sum = next;
  }
  return {m, log(block_sum(static_cast<double>(sum) - static_cast<double>(lost)))};
}

// Cross-entropy of one row against its target (kIgnoreIndex: skipped, zero gradient): log p(target) into
// logprob[r]; the gradient grad_scale * (softmax - onehot) (optional) into dlogits16's rows where it has data,
// rounded to 16 bits (fp16 with f16, else bf16) as a GEMM would round it, else into dlogits in fp32. The gradient's
// exponentials in fp32, as the log-sum-exp's. dlogits may be the logits themselves (the model writes the gradient
// in place): every read of the row that another thread's write could overwrite happens before the reductions'
// barriers.
__global__ void cross_entropy(const float* logits, const int32_t* targets, int64_t vocab, double grad_scale,
                              float* dlogits, HalfRows dlogits16, bool f16, double* logprob) {
  const int64_t r = blockIdx.x;
  const int32_t target = targets[r];
  const float* lr = logits + r * vocab;
  float* dr = dlogits ? dlogits + r * vocab : nullptr;
  uint16_t* dr16 = dlogits16.data ? dlogits16.data + r * dlogits16.ld : nullptr;
  auto write = [&](int64_t i, float d) {
    if (dr16)
      dr16[i] = half_bits(f16, d);
    else
      dr[i] = d;
  };
  // the whole block takes this branch: no barrier is skipped by some threads only
  if (target == kIgnoreIndex || target < 0 || target >= vocab) {  // outside the vocabulary: a NaN log-prob
    if (dr || dr16)
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) write(i, 0.0f);
    if (threadIdx.x == 0) logprob[r] = target == kIgnoreIndex ? 0.0 : static_cast<double>(NAN);
    return;
  }
  const double target_logit = lr[target];
  const RowLogSumExp lse = row_log_sum_exp(lr, vocab);
  if (threadIdx.x == 0) logprob[r] = target_logit - lse.value();
  const float log_sum = static_cast<float>(lse.log_sum), scale = static_cast<float>(grad_scale);
  if (dr || dr16)  // each thread reads and writes its own elements only
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      float d = expf((lr[i] - lse.max) - log_sum) * scale;
      if (i == target) d -= scale;
      write(i, d);
    }
}

__global__ void log_softmax_rows(const float* logits, int64_t vocab, float* out) {
  const int64_t r = blockIdx.x;
  const float* lr = logits + r * vocab;
  const double log_z = row_log_sum_exp(lr, vocab).value();
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
    out[r * vocab + i] = static_cast<float>(static_cast<double>(lr[i]) - log_z);
}

// RoPE on the two halves of each head, in place on x [B, T, H, Dh]; tables [T, Dh/2]; inverse negates sin.
__global__ void rope_apply(float* x, int64_t seq, int64_t heads, int64_t head_dim, const float* cos_table,
                           const float* sin_table, bool inverse) {
  // one block per token (b * seq + t), its threads over the heads' pairs (h, i), stepped without division
  const int64_t half = head_dim / 2, token = blockIdx.x, t = token % seq;
  float* row = x + token * heads * head_dim;
  RowPosition at(threadIdx.x, blockDim.x, half);  // at.row: the head, at.col: i
  for (int64_t j = threadIdx.x; j < heads * half; j += blockDim.x, at.advance()) {
    const int64_t i = at.col;
    const float c = cos_table[t * half + i];
    const float s = inverse ? -sin_table[t * half + i] : sin_table[t * half + i];
    float* v = row + at.row * head_dim;
    const float x1 = v[i], x2 = v[i + half];
    v[i] = x1 * c - x2 * s;
    v[i + half] = x2 * c + x1 * s;
  }
}

// ---- attention: FlashAttention's algorithm, a row at a time (no seq x seq matrix is ever stored) ----
// head_dim / blockDim rounded up: the output dims one thread accumulates (d = threadIdx.x + r * blockDim.x).
constexpr int kMaxDimsPerThread = 4;

__device__ __forceinline__ float dot_row(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

// One query row, by the whole block, over the keys 0..last in tiles of blockDim keys: each thread scores one key of
// the tile; the running max and sum of the row are updated tile by tile and the output so far rescaled (online
// softmax), so out = sum_j softmax(scale q·k)_j v_j without the scores of the row existing at once. Returns the
// row's log-sum-exp (to every thread). k and v point at the kv head's first row; rows are kv_stride apart.
__device__ float attend_row(const float* qi, const float* k, const float* v, int64_t kv_stride, int64_t last,
                            int64_t head_dim, float scale, float* oi) {
  __shared__ float p[kMaxThreads];
  float acc[kMaxDimsPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
  float m = -INFINITY, l = 0.0f;
  for (int64_t j0 = 0; j0 <= last; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const float s = j <= last ? dot_row(qi, k + j * kv_stride, head_dim) * scale : -INFINITY;
    const float m_new = max_of(m, block_max(s));
    const float e = j <= last ? expf(s - m_new) : 0.0f;
    p[threadIdx.x] = e;
    const float correction = expf(m - m_new);  // 0 on the first tile (m = -inf), where l and acc are 0
    l = l * correction + block_sum(e);          // block_sum's barriers also publish p
    const int64_t count = last - j0 + 1 < blockDim.x ? last - j0 + 1 : static_cast<int64_t>(blockDim.x);
    for (int r = 0; r < kMaxDimsPerThread; ++r) {
      const int64_t d = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
      if (d >= head_dim) break;
      float a = acc[r] * correction;
      for (int64_t t = 0; t < count; ++t) a += p[t] * v[(j0 + t) * kv_stride + d];
      acc[r] = a;
    }
    m = m_new;
    __syncthreads();  // the next tile rewrites p
  }
  for (int r = 0; r < kMaxDimsPerThread; ++r) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
    if (d < head_dim) oi[d] = acc[r] / l;
  }
  return m + logf(l);
}

// Causal GQA attention; grid (seq, heads, batch): one block per query row. lse [B, H, T] kept for backward.
__global__ void attention_forward(const float* q, const float* k, const float* v, int64_t seq, int64_t heads,
                                  int64_t kv_heads, int64_t head_dim, float scale, float* out, float* lse) {
  const int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t group = heads / kv_heads, q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  const int64_t kv_offset = b * seq * kv_stride + (h / group) * head_dim;
  const int64_t q_offset = (b * seq + i) * q_stride + h * head_dim;
  const float row_lse = attend_row(q + q_offset, k + kv_offset, v + kv_offset, kv_stride, i, head_dim, scale, out + q_offset);
  if (threadIdx.x == 0) lse[(b * heads + h) * seq + i] = row_lse;
}

// q_len new queries at positions past.. over a KV cache; grid (q_len, heads).
__global__ void attention_cached(const float* q, const float* k_cache, const float* v_cache, int64_t past,
                                 int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, float* out) {
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const int64_t group = heads / kv_heads, q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  const int64_t kv_offset = (h / group) * head_dim;
  const int64_t q_offset = i * q_stride + h * head_dim;
  attend_row(q + q_offset, k_cache + kv_offset, v_cache + kv_offset, kv_stride, past + i, head_dim, scale, out + q_offset);
}

// Backward recomputes each probability from the forward pass's lse: P_ij = exp(scale q_i·k_j - lse_i); with
// dP_ij = dO_i·V_j and D_i = dO_i·O_i (= sum_j dP_ij P_ij), dS_ij = scale P_ij (dP_ij - D_i).
__device__ __forceinline__ void attention_grad_entry(const float* qi, const float* doi, const float* kj, const float* vj,
                                                     int64_t head_dim, float scale, float row_lse, float row_dot,
                                                     float* p, float* ds) {
  *p = expf(dot_row(qi, kj, head_dim) * scale - row_lse);
  *ds = *p * (dot_row(doi, vj, head_dim) - row_dot) * scale;
}

// Backward, first pass; grid (seq, heads, batch), one block per query row i: D_i into row_dots [B, H, T], and
// dQ_i = sum_{j <= i} dS_ij K_j over tiles of blockDim keys.
__global__ void attention_backward_dq(const float* dout, const float* q, const float* k, const float* v,
                                      const float* out, const float* lse, int64_t seq, int64_t heads, int64_t kv_heads,
                                      int64_t head_dim, float scale, float* row_dots, float* dq) {
  __shared__ float ds[kMaxThreads];
  const int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t group = heads / kv_heads, q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  const int64_t kv_offset = b * seq * kv_stride + (h / group) * head_dim;
  const int64_t q_offset = (b * seq + i) * q_stride + h * head_dim;
  const float* doi = dout + q_offset;
  float local = 0.0f;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) local += doi[d] * out[q_offset + d];
  const float row_dot = block_sum(local);
  const int64_t row = (b * heads + h) * seq + i;
  if (threadIdx.x == 0) row_dots[row] = row_dot;
  const float row_lse = lse[row];
  float acc[kMaxDimsPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t j0 = 0; j0 <= i; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    float p = 0.0f, g = 0.0f;
    if (j <= i)
      attention_grad_entry(q + q_offset, doi, k + kv_offset + j * kv_stride, v + kv_offset + j * kv_stride, head_dim,
                           scale, row_lse, row_dot, &p, &g);
    ds[threadIdx.x] = g;
    __syncthreads();
    const int64_t count = i - j0 + 1 < blockDim.x ? i - j0 + 1 : static_cast<int64_t>(blockDim.x);
    for (int r = 0; r < kMaxDimsPerThread; ++r) {
      const int64_t d = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
      if (d >= head_dim) break;
      for (int64_t t = 0; t < count; ++t) acc[r] += ds[t] * k[kv_offset + (j0 + t) * kv_stride + d];
    }
    __syncthreads();  // the next tile rewrites ds
  }
  for (int r = 0; r < kMaxDimsPerThread; ++r) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
    if (d < head_dim) dq[q_offset + d] = acc[r];
  }
}

// Backward, second pass; grid (seq, kv_heads, batch), one block per key row j of a kv head: over the group's query
// heads and tiles of blockDim query rows i >= j, dK_j = sum dS_ij Q_i and dV_j = sum P_ij dO_i. row_dots: D from the
// first pass. Each block writes only its own key row: no atomics, the same sums on every run.
__global__ void attention_backward_dkv(const float* dout, const float* q, const float* k, const float* v,
                                       const float* lse, const float* row_dots, int64_t seq, int64_t heads,
                                       int64_t kv_heads, int64_t head_dim, float scale, float* dk, float* dv) {
  __shared__ float ps[kMaxThreads];
  __shared__ float dss[kMaxThreads];
  const int64_t j = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int64_t group = heads / kv_heads, q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  const int64_t kv_row = (b * seq + j) * kv_stride + kvh * head_dim;
  float dk_acc[kMaxDimsPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
  float dv_acc[kMaxDimsPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
    for (int64_t i0 = j; i0 < seq; i0 += blockDim.x) {
      const int64_t i = i0 + threadIdx.x;
      float p = 0.0f, g = 0.0f;
      if (i < seq) {
        const int64_t q_offset = (b * seq + i) * q_stride + h * head_dim;
        const int64_t row = (b * heads + h) * seq + i;
        attention_grad_entry(q + q_offset, dout + q_offset, k + kv_row, v + kv_row, head_dim, scale, lse[row],
                             row_dots[row], &p, &g);
      }
      ps[threadIdx.x] = p;
      dss[threadIdx.x] = g;
      __syncthreads();
      const int64_t count = seq - i0 < blockDim.x ? seq - i0 : static_cast<int64_t>(blockDim.x);
      for (int r = 0; r < kMaxDimsPerThread; ++r) {
        const int64_t d = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
        if (d >= head_dim) break;
        for (int64_t t = 0; t < count; ++t) {
          const int64_t at = (b * seq + i0 + t) * q_stride + h * head_dim + d;
          dk_acc[r] += dss[t] * q[at];
          dv_acc[r] += ps[t] * dout[at];
        }
      }
      __syncthreads();  // the next tile rewrites ps and dss
    }
  for (int r = 0; r < kMaxDimsPerThread; ++r) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
    if (d < head_dim) {
      dk[kv_row + d] = dk_acc[r];
      dv[kv_row + d] = dv_acc[r];
    }
  }
}

// x rounded to a 16-bit type: bf16 (to_f16 false) or fp16.
__global__ void to_half(const float* x, int64_t n, bool to_f16, uint16_t* out) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) out[i] = half_bits(to_f16, x[i]);
}

// Rows of cols values of x (x_ld apart) times scale, rounded to 16 bits into rows out_ld apart, each row's columns
// cols..out_cols-1 zeros: a part of a wider 16-bit matrix (LoRA's factor beside a weight, or t beside x, with the
// alignment padding that must hold zeros, not whatever the memory held).
__global__ void to_half_rows(const float* x, int64_t rows, int64_t cols, int64_t x_ld, float scale, bool to_f16,
                             uint16_t* out, int64_t out_ld, int64_t out_cols) {
  RowPosition at(global_thread(), grid_threads(), out_cols);
  for (int64_t i = global_thread(); i < rows * out_cols; i += grid_threads(), at.advance()) {
    const float v = at.col < cols ? x[at.row * x_ld + at.col] * scale : 0.0f;
    out[at.row * out_ld + at.col] = half_bits(to_f16, v);
  }
}

// 16-bit values of format 1 or 2 in the other 16-bit type (a bf16 weight for fp16 compute: as torch casts it).
__global__ void half_to_half(const uint16_t* x, int64_t n, int format, bool to_f16, uint16_t* out) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float v = widen_bits(x[i], format);
    out[i] = half_bits(to_f16, v);
  }
}

// ---- NF4 ----
// A dequantized value rounded to the quant state's dtype (round_to: 0 fp32, 1 bf16, 2 fp16), round to nearest even.
__device__ __forceinline__ float round_stored(float v, int round_to) {
#ifdef __CUDACC__
  if (round_to == 1) return __bfloat162float(__float2bfloat16_rn(v));
  if (round_to == 2) return __half2float(__float2half_rn(v));
#else
  if (round_to == 1) return round_to_bf16(v);
  if (round_to == 2) return round_to_f16(v);
#endif
  return v;
}

// The NF4 code book in shared memory, for kernels whose lanes look up different codes at once: nf4::code_value's
// switch compiles to a tree of branches that a warp would walk for each of the codes its lanes hold. Every thread
// of the block calls it (it ends at a barrier) before its grid-stride loop.
__device__ __forceinline__ const float* shared_nf4_codes() {
  __shared__ float codes[16];
  if (threadIdx.x < 16) codes[threadIdx.x] = nf4::code_value(static_cast<int>(threadIdx.x));
  __syncthreads();
  return codes;
}

// Code i of an NF4 tensor: two a byte, the first in the high nibble (bitsandbytes' layout).
__device__ __forceinline__ int nf4_code(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0x0f) : (byte >> 4);
}

// Weight i of an NF4 tensor, dequantized and rounded to round_to.
__device__ __forceinline__ float nf4_weight(const float* codes, const uint8_t* packed, const float* absmax, int64_t i,
                                            int blocksize, int round_to) {
  return round_stored(codes[nf4_code(packed, i)] * absmax[i / blocksize], round_to);
}

// 16 bytes to or from a 16-byte aligned address in one access (a misaligned one faults on the GPU; the emulator says
// so).
__device__ __forceinline__ void check_16_byte_aligned(const void* p) {
#ifndef __CUDACC__
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw std::runtime_error("cuda_emu: a 16-byte access at an address that is not 16-byte aligned");
#else
  (void)p;
#endif
}
__device__ __forceinline__ void load_16_bytes(const void* p, uint32_t (&out)[4]) {
  check_16_byte_aligned(p);
#ifdef __CUDACC__
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
#else
  std::memcpy(out, p, 16);
#endif
}
__device__ __forceinline__ void store_16_bytes(void* p, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  check_16_byte_aligned(p);
#ifdef __CUDACC__
  *reinterpret_cast<uint4*>(p) = make_uint4(w0, w1, w2, w3);
#else
  const uint32_t w[4] = {w0, w1, w2, w3};
  std::memcpy(p, w, 16);
#endif
}
__device__ __forceinline__ void load_4_floats(const float* p, float (&out)[4]) {
  uint32_t words[4];
  load_16_bytes(p, words);
  for (int i = 0; i < 4; ++i) {
#ifdef __CUDACC__
    out[i] = __uint_as_float(words[i]);
#else
    std::memcpy(&out[i], &words[i], 4);
#endif
  }
}

// Two elements per thread: one packed byte.
__global__ void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, int round_to,
                               float* out) {
  const float* codes = shared_nf4_codes();
  for (int64_t i = 2 * global_thread(); i < n; i += 2 * grid_threads())
    for (int64_t k = i; k < i + 2 && k < n; ++k) out[k] = nf4_weight(codes, packed, absmax, k, blocksize, round_to);
}

// A double-quantized block constant: code2[code] * state2_absmax + offset, the product and the sum rounded
// separately, as bitsandbytes does (the build's --fmad=false already keeps nvcc from fusing them; the intrinsics say
// so here whatever the flags).
__device__ __forceinline__ float restored_block_constant(float code2_value, float state2_absmax, float offset) {
#ifdef __CUDACC__
  return __fadd_rn(__fmul_rn(code2_value, state2_absmax), offset);
#else
  const float product = code2_value * state2_absmax;
  return product + offset;
#endif
}

// Double quantization's block constants: out[i] = code2[codes[i]] * state2_absmax[i / blocksize2] + offset.
__global__ void absmax_dequantize(const uint8_t* codes, int64_t n, const float* state2_absmax, const float* code2,
                                  float offset, int blocksize2, float* out) {
  for (int64_t i = global_thread(); i < n; i += grid_threads())
    out[i] = restored_block_constant(code2[codes[i]], state2_absmax[i / blocksize2], offset);
}

// An NF4 weight as Nf4Weight describes it, with the rounding of its values (round_to, FloatFormat's order) and, in
// products, of their operands (round_x: the compute dtype's, as its GEMM rounds them).
struct Nf4Rows {
  const uint8_t* packed;
  const float* absmax;  // null: double-quantized
  const uint8_t* absmax_codes;
  const float* absmax2;
  const float* absmax_map;
  float absmax_offset;
  int absmax_blocksize2;
  int blocksize;
  int64_t out, in;
  int round_to, round_x;
};

// Block constant `block` of w: its own, or restored from double quantization as absmax_dequantize restores it.
__device__ __forceinline__ float block_constant(const Nf4Rows& w, int64_t block) {
  if (w.absmax) return w.absmax[block];
  return restored_block_constant(w.absmax_map[w.absmax_codes[block]], w.absmax2[block / w.absmax_blocksize2],
                                 w.absmax_offset);
}

// Value i of w, dequantized and rounded to w.round_to: nf4_weight's value with w's block constants.
__device__ __forceinline__ float nf4_value(const float* codes, const Nf4Rows& w, int64_t i) {
  return round_stored(codes[nf4_code(w.packed, i)] * block_constant(w, i / w.blocksize), w.round_to);
}

// The 32 values of 16 bytes of NF4 codes (load_16_bytes' words, little-endian; each byte's high nibble first) under
// one block constant, dequantized and rounded to round_to: the wide kernels' chunk.
constexpr int kNf4ChunkValues = 32;
__device__ __forceinline__ void nf4_chunk_values(const float* codes, const uint32_t (&words)[4], float scale,
                                                 int round_to, float (&values)[kNf4ChunkValues]) {
  QLORA_UNROLL
  for (int i = 0; i < 16; ++i) {
    const uint32_t byte = (words[i / 4] >> (8 * (i % 4))) & 0xffu;
    values[2 * i] = round_stored(codes[byte >> 4] * scale, round_to);
    values[2 * i + 1] = round_stored(codes[byte & 15u] * scale, round_to);
  }
}

// nf4_dequantize's values of w (its block constants restored in place where double-quantized) rounded on to 16 bits
// (bf16, or fp16 when to_f16): what to_half makes of them. Value k goes to row k / row_len, rows row_stride apart
// (row_stride > row_len leaves room beside each row).
__global__ void nf4_dequantize_16(Nf4Rows w, bool to_f16, int64_t row_len, int64_t row_stride, uint16_t* out) {
  const float* codes = shared_nf4_codes();
  const int64_t n = w.out * w.in;
  for (int64_t i = 2 * global_thread(); i < n; i += 2 * grid_threads())
    for (int64_t k = i; k < i + 2 && k < n; ++k)
      out[k / row_len * row_stride + k % row_len] = half_bits(to_f16, nf4_value(codes, w, k));
}

// nf4_dequantize_16 where every 32 values (16 bytes of codes) share a block constant and a row, packed and each 32
// values' place in out are 16-byte aligned (the host checks: row_len and blocksize multiples of 32, row_stride of 8):
// a thread reads 16 bytes at once, restores their block constant and divides once for the row, and writes 64 bytes
// in four stores, so that the kernel moves bytes at the memory's pace instead of doing integer division and
// branching per value.
__global__ void nf4_dequantize_16_wide(Nf4Rows w, bool to_f16, int64_t row_len, int64_t row_stride, uint16_t* out) {
  const float* codes = shared_nf4_codes();
  const int64_t chunks = w.out * w.in / kNf4ChunkValues;
  for (int64_t c = global_thread(); c < chunks; c += grid_threads()) {
    const int64_t first = c * kNf4ChunkValues;
    const int64_t row = first / row_len;
    uint32_t words[4];
    load_16_bytes(w.packed + first / 2, words);
    float values[kNf4ChunkValues];
    nf4_chunk_values(codes, words, block_constant(w, first / w.blocksize), w.round_to, values);
    uint32_t pairs[kNf4ChunkValues / 2];  // values 2i and 2i + 1 in 16 bits, the first in the low half
    QLORA_UNROLL
    for (int i = 0; i < kNf4ChunkValues / 2; ++i)
      pairs[i] = static_cast<uint32_t>(half_bits(to_f16, values[2 * i])) |
                 (static_cast<uint32_t>(half_bits(to_f16, values[2 * i + 1])) << 16);
    uint16_t* to = out + row * row_stride + (first - row * row_len);
    QLORA_UNROLL
    for (int q = 0; q < 4; ++q)
      store_16_bytes(to + 8 * q, pairs[4 * q], pairs[4 * q + 1], pairs[4 * q + 2], pairs[4 * q + 3]);
  }
}

// One CUDA block per quantization block: the absmax by a reduction (max is exact in any order; NaN is skipped as
// fmaxf skips it, like the CPU's `a > m`), then each thread quantizes pairs with bitsandbytes' decision tree,
// multiplying by the reciprocal of the absmax as bitsandbytes does. An all-zero block writes code 0.
__global__ void nf4_quantize(const float* x, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t count = n - begin < blocksize ? n - begin : static_cast<int64_t>(blocksize);
  float m = 0.0f;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) m = fmaxf(m, fabsf(x[begin + j]));
  const float block_absmax = block_max(m);
  if (threadIdx.x == 0) absmax[blockIdx.x] = block_absmax;
  const float scale = 1.0f / block_absmax;
  const int64_t pairs = (count + 1) / 2;
  for (int64_t pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
    const int64_t j = 2 * pair;
    uint8_t byte = 0;
    if (block_absmax != 0.0f) {
      const float v0 = x[begin + j];
      const float v1 = j + 1 < count ? x[begin + j + 1] : 0.0f;
      byte = static_cast<uint8_t>((nf4::quantize_normalized(v0 * scale) << 4) | nf4::quantize_normalized(v1 * scale));
    }
    packed[(begin + j) / 2] = byte;
  }
}

}  // namespace
}  // namespace qlora::cuda::kernels
