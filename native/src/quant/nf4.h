// NF4 with double quantization, bit-identical to bitsandbytes (checked against the vectors in test/fixtures/reference/nf4-vectors.safetensors):
// - blocks of 64 over the row-major flattened weight; absmax = max |x| (fp32); each x * (1/absmax) goes to the
//   NF4 code chosen by bitsandbytes' midpoint decision tree (strict >); two codes per byte, first element in the
//   high nibble; a last partial block is padded with code 0; an all-zero block writes code 0.
// - double quantization: offset = mean(absmax); (absmax - offset) quantized in blocks of 256 to 8 bits with the
//   signed dynamic map (bitsandbytes' create_dynamic_map(signed=True)), one fp32 absmax per 256-block.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "quant/nf4_codebook.h"

namespace qlora::nf4 {

extern const float kCodes[16];  // code_value(0..15) as a table

struct Blockwise4bit {
  std::vector<uint8_t> packed;  // ceil(n / 2) bytes
  std::vector<float> absmax;    // ceil(n / blocksize)
};

Blockwise4bit quantize(const float* x, int64_t n, int blocksize = 64);

// One block of `count` values: its codes into `packed` (ceil(count / 2) bytes, the first value in the high nibble;
// an odd count's padding quantized as 0.0f, as the kernel loads it) and its absmax returned.
float quantize_block(const float* x, int64_t count, uint8_t* packed);

// quantize() of n values that `load(begin, count, out)` writes a block at a time into `out` (from a file's bf16
// bytes, say), so that no fp32 copy of the whole tensor is made. Blocks are loaded on every core; `load` must not
// throw.
using BlockLoader = std::function<void(int64_t begin, int64_t count, float* out)>;
Blockwise4bit quantize_loaded(int64_t n, int blocksize, const BlockLoader& load);
// The block constants quantize_loaded would return, without the codes (what double quantization's offset needs
// before a writer lays out the quant state).
std::vector<float> absmax_loaded(int64_t n, int blocksize, const BlockLoader& load);

// A block must start on a byte (two codes a byte): a positive even block size, else an error naming `what`. The CPU
// and GPU quantizers and dequantizers all check with it.
void check_blocksize(int blocksize, const char* what);
// Dequantized values written in rows of row_len, row_stride apart: positive rows no wider than their stride, else an
// error naming `what` (the CPU's and the GPU's nf4_dequantize_16).
void check_rows(int64_t row_len, int64_t row_stride, const char* what);

// A value rounding: round_to_bf16 or round_to_f16 (the quant state's dtype, into which bitsandbytes writes code *
// absmax), or none (fp32).
using Rounding = float (*)(float);

// The 16 values of a block whose constant is `scale`: kCodes[c] * scale in fp32, then rounded when `round` is given.
// Each dequantizer builds them once a block and looks its codes up, which rounds each value as rounding after would.
inline void block_values(float scale, Rounding round, float table[16]) {
  for (int c = 0; c < 16; ++c) table[c] = round ? round(kCodes[c] * scale) : kCodes[c] * scale;
}

// out[i] = kCodes[code_i] * absmax[i / blocksize], computed in fp32, then rounded when `round` is given.
void dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, float* out,
                Rounding round = nullptr);

// bitsandbytes' signed dynamic 8-bit map (256 sorted values in [-1, 1]), used for the block constants.
const std::vector<float>& dynamic_map_signed();

struct DoubleQuantized {
  std::vector<uint8_t> codes;          // one byte per absmax value
  std::vector<float> state2_absmax;    // one per `blocksize2` codes
  float offset = 0.0f;                 // mean of the absmax values
};

DoubleQuantized double_quantize(const std::vector<float>& absmax, int blocksize2 = 256);
float double_quant_offset(const std::vector<float>& absmax);  // double_quantize's offset alone
// absmax_i = code2[codes_i] * state2_absmax[i / blocksize2] + offset
std::vector<float> double_dequantize(const uint8_t* codes, int64_t n, const float* state2_absmax,
                                     const float* code2, float offset, int blocksize2 = 256);
void double_dequantize_into(const uint8_t* codes, int64_t n, const float* state2_absmax, const float* code2,
                            float offset, int blocksize2, float* out);

// 8-bit blockwise quantization with a sorted 256-entry map, as bitsandbytes' quantize_blockwise does (x times the
// reciprocal of the block absmax, then the map's binary search with midpoint rounding).
void quantize_blockwise_8bit(const float* x, int64_t n, const std::vector<float>& code, int blocksize,
                             uint8_t* codes_out, float* absmax_out);

}  // namespace qlora::nf4
