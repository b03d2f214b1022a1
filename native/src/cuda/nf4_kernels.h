// NF4 on the GPU: the block quantizer and the dequantizer, byte for byte and bit for bit the CPU reference's
// (quant/nf4.h), which is bitsandbytes'. Plain C++ declarations over device pointers; defined in cuda_backend.cu.
#pragma once
#include <cstdint>

#include "backend/backend.h"

namespace qlora::cuda {

// out[i] = code(packed, i) * absmax[i / blocksize], rounded to `round_to` (the quant state's dtype). Bit for bit the
// CPU's for every finite block constant (a NaN result, from an inf or NaN constant, is the canonical NaN here).
void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, FloatFormat round_to, float* out);

// bitsandbytes' kQuantizeBlockwise for NF4: absmax[b] = max |x| over block b; each x * (1 / absmax) to its code, two
// per byte (first element in the high nibble); an odd n pads the last byte with the code of 0; an all-zero block
// writes code 0.
void nf4_quantize(const float* x, int64_t n, int blocksize, uint8_t* packed, float* absmax);

}  // namespace qlora::cuda
