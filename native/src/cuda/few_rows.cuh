// Generation's few-row products (decode's one row, a short prefill's up to kMaxFewRows): matrix-vector work, bound by
// reading the weights, so each kernel reads them once, in wide loads, and does everything else a linear layer adds on
// the way (the block constants' double quantization, the bias, LoRA's up projection) instead of in launches of its
// own: a decoded token is some 2 launches per linear layer rather than 8. Device code that nvcc compiles and the native
// tests run under the CUDA emulator (test/cuda_emu.h).
#pragma once
#include <cstdint>

#include "cuda/kernels.cuh"
#include "cuda/warp_mma.cuh"

namespace qlora::cuda::kernels {
namespace {

constexpr int kMaxFewRows = 4;
constexpr int kLanes = 32;

// FewRowsAddends on the device.
struct RowAddends {
  const float* bias;
  const float* lora_t;
  const float* lora_b;
  int64_t rank;
  float lora_scale;
};

// y [rows, out] = x [rows, in] · W^T + bias + lora_scale · t [rows, rank] · B^T with W in NF4, each weight
// dequantized (rounded to round_to, then to the compute dtype, as the dequantized GEMM's operand is) as it is read,
// never written out. One warp per output row; blockDim.x a multiple of 32. Wide (the host's choice: in and the block size multiples
// of 32, packed and x 16-byte aligned): each lane reads 16 bytes of codes (32 weights under one block constant) and
// their x in float4s per step, the warp 512 contiguous bytes; otherwise a lane takes every 32nd weight. The NF4 code
// book sits in shared memory (shared_nf4_codes).
__global__ void nf4_matmul_nt(const float* x, int64_t rows, Nf4Rows w, bool wide, RowAddends add, float* y) {
  const float* codes = shared_nf4_codes();
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + threadIdx.x / kLanes;
  if (o >= w.out) return;  // the whole warp: no barrier and no shuffle of it is left
  float acc[kMaxFewRows] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t first = o * w.in;  // the row's first weight
  if (wide) {
    // a lane's step: one chunk of 16 bytes of codes, 32 weights under one block constant
    for (int64_t k = static_cast<int64_t>(lane) * kNf4ChunkValues; k < w.in; k += kLanes * kNf4ChunkValues) {
      uint32_t words[4];
      load_16_bytes(w.packed + (first + k) / 2, words);
      float weights[kNf4ChunkValues];
      nf4_chunk_values(codes, words, block_constant(w, (first + k) / w.blocksize), w.round_to, weights);
      QLORA_UNROLL
      for (int j = 0; j < kNf4ChunkValues; ++j) weights[j] = round_stored(weights[j], w.round_x);
      QLORA_UNROLL
      for (int r = 0; r < kMaxFewRows; ++r) {  // a constant bound, so that acc stays in registers
        if (r >= rows) break;
        QLORA_UNROLL
        for (int j = 0; j < kNf4ChunkValues; j += 4) {
          float xs[4];
          load_4_floats(x + r * w.in + k + j, xs);
          QLORA_UNROLL
          for (int e = 0; e < 4; ++e) acc[r] += round_stored(xs[e], w.round_x) * weights[j + e];
        }
      }
    }
  } else {
    for (int64_t k = lane; k < w.in; k += kLanes) {
      const float weight = round_stored(nf4_value(codes, w, first + k), w.round_x);
      QLORA_UNROLL
      for (int r = 0; r < kMaxFewRows; ++r)
        if (r < rows) acc[r] += round_stored(x[r * w.in + k], w.round_x) * weight;
    }
  }
  QLORA_UNROLL
  for (int r = 0; r < kMaxFewRows; ++r) {
    if (r >= rows) break;
    float v = warp_sum(acc[r]);
    if (add.bias) v += add.bias[o];
    if (add.lora_t && add.rank > 0) {
      float dot = 0.0f;
      for (int64_t j = lane; j < add.rank; j += kLanes)
        dot += round_stored(add.lora_t[r * add.rank + j], w.round_x) *
               round_stored(add.lora_b[o * add.rank + j], w.round_x);
      v = add.lora_scale * warp_sum(dot) + v;
    }
    if (lane == 0) y[r * w.out + o] = v;
  }
}

// y [rows, out] = x [rows, in] · W^T for fp32 W, rows <= kMaxFewRows, the operands rounded to the compute dtype
// (round_x) as its GEMM rounds them: one block per output (LoRA's down projection has a few outputs of long rows), its
// threads splitting k. Wide (the host's choice: in a multiple of 4, w and x 16-byte aligned): four values of each row
// a load, so that the few blocks keep four times the bytes in flight.
__global__ void gemm_few_rows_nt(const float* x, int64_t rows, const float* w, int64_t out, int64_t in, bool wide,
                                 int round_x, float* y) {
  const int64_t o = blockIdx.x;
  float acc[kMaxFewRows] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (wide) {
    for (int64_t k = 4 * static_cast<int64_t>(threadIdx.x); k < in; k += 4 * static_cast<int64_t>(blockDim.x)) {
      float weights[4];
      load_4_floats(w + o * in + k, weights);
      QLORA_UNROLL
      for (int r = 0; r < kMaxFewRows; ++r) {
        if (r >= rows) break;
        float xs[4];
        load_4_floats(x + r * in + k, xs);
        QLORA_UNROLL
        for (int e = 0; e < 4; ++e) acc[r] += round_stored(xs[e], round_x) * round_stored(weights[e], round_x);
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < in; k += blockDim.x) {
      const float weight = round_stored(w[o * in + k], round_x);
      QLORA_UNROLL
      for (int r = 0; r < kMaxFewRows; ++r)
        if (r < rows) acc[r] += round_stored(x[r * in + k], round_x) * weight;
    }
  }
  QLORA_UNROLL
  for (int r = 0; r < kMaxFewRows; ++r) {
    if (r >= rows) break;
    const float total = block_sum(acc[r]);
    if (threadIdx.x == 0) y[r * out + o] = total;
  }
}

}  // namespace
}  // namespace qlora::cuda::kernels
