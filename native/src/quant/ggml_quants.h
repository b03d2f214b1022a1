// Quantizers for llama.cpp's GGUF tensor formats, written from the formats' definitions (ggml's block structs and
// dequantization formulas, which are what a GGUF reader applies to the bytes):
//
//   F32   4 bytes a value, little-endian IEEE binary32.
//   F16   2 bytes a value, IEEE binary16, rounded to nearest even (overflow to inf, NaN stays NaN).
//   BF16  2 bytes a value, the top half of binary32 rounded to nearest even as ggml and PyTorch do; NaN stays NaN
//         (quieted), subnormals are kept.
//   Q8_0  blocks of 32 values, 34 bytes: fp16 d, int8 qs[32];                    x = qs[i] * d
//   Q5_0  blocks of 32 values, 22 bytes: fp16 d, uint8 qh[4], uint8 qs[16]; 5-bit codes q in [0, 31];
//                                                                                x = (q - 16) * d
//         value j < 16 has its low 4 bits in the low nibble of qs[j], value j + 16 in the high nibble; bit j of
//         the little-endian uint32 qh is bit 4 of value j (j = 0..31).
//   Q4_K  super-blocks of 256 values = 8 sub-blocks of 32, 144 bytes: fp16 d, fp16 dmin, uint8 scales[12] (eight
//         6-bit scales sc and eight 6-bit mins m, packed as below), uint8 qs[128] (4-bit codes q);
//                                                                                x = (d * sc) * q - (dmin * m)
//         scales[12]: for sub-block j < 4, sc = scales[j] & 63 and m = scales[j + 4] & 63; for j >= 4,
//         sc = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4 and m = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4.
//         qs: chunk c (values 64c .. 64c+63) lives in qs[32c .. 32c+31]; value 64c + l (l < 32) is the low nibble
//         of qs[32c + l] (sub-block 2c), value 64c + 32 + l its high nibble (sub-block 2c + 1).
//   Q6_K  super-blocks of 256 values = 16 sub-blocks of 16, 210 bytes: uint8 ql[128], uint8 qh[64],
//         int8 scales[16], fp16 d; 6-bit codes q in [0, 63];                     x = (d * scales[v / 16]) * (q - 32)
//         half h (values 128h .. 128h+127) uses ql[64h ..], qh[32h ..]; for l < 32 the four values 128h + l + 32k
//         (k = 0..3) take their low 4 bits from ql[64h + l] (k = 0: low nibble, k = 2: high nibble) and
//         ql[64h + 32 + l] (k = 1: low, k = 3: high), and their high 2 bits from qh[32h + l] bits 2k, 2k+1.
//
// Every product and difference above is one fp32 operation rounded on its own (the engine builds with
// -ffp-contract=off), in the order written: that is the arithmetic of ggml's scalar dequantize_row_* functions, so
// llama.cpp turns our bytes into the same floats dequantize() returns here. A row of `cols` values is stored as
// cols / block_size blocks one after another; rows follow each other with no padding, so a tensor, or any range of
// its rows, is one contiguous byte range.
//
// The encoders search for good scales themselves (weighted least squares over candidate grids, then a local search
// of each sub-block's quantized scale and min against the stored fp16 super-block constants); see ggml_quants.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace qlora::ggml {

// Values are ggml's GGML_TYPE_* ids, as a GGUF file records them.
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14, BF16 = 30 };

constexpr int64_t kQK8_0 = 32;
constexpr int64_t kQK5_0 = 32;
constexpr size_t kBlockBytesQ5_0 = 22;
constexpr int64_t kQK_K = 256;
constexpr size_t kBlockBytesQ8_0 = 34;
constexpr size_t kBlockBytesQ4_K = 144;
constexpr size_t kBlockBytesQ6_K = 210;

// "f32", "f16", "bf16", "q5_0", "q8_0", "q4_k", "q6_k" (case-insensitive); nullopt for anything else.
std::optional<GgmlType> type_from_name(const std::string& name);
const char* type_name(GgmlType t);  // lower case, as accepted by type_from_name
int64_t block_size(GgmlType t);     // values per block: 1 for the float types
size_t block_bytes(GgmlType t);     // bytes per block

// Bytes of one row of `cols` values. Throws EngineError when cols is not a positive multiple of the block size:
// "q4_k: cols 100 is not a multiple of the block size 256".
size_t row_bytes(GgmlType t, int64_t cols);

// Q4_K's 12-byte scales field from eight 6-bit scales and eight 6-bit mins (values above 63 are cut to 6 bits),
// and back.
void pack_q4_k_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t out[12]);
void unpack_q4_k_scales(const uint8_t in[12], uint8_t sc[8], uint8_t m[8]);

// One row (or any run of whole blocks): k values <-> row_bytes(t, k) bytes. Single-threaded; k must be a multiple
// of the block size (checked).
void quantize_row_f32(const float* x, uint8_t* y, int64_t k);
void quantize_row_f16(const float* x, uint8_t* y, int64_t k);
void quantize_row_bf16(const float* x, uint8_t* y, int64_t k);
void quantize_row_q8_0(const float* x, uint8_t* y, int64_t k);
void quantize_row_q5_0(const float* x, uint8_t* y, int64_t k);
void quantize_row_q4_k(const float* x, uint8_t* y, int64_t k);
void quantize_row_q6_k(const float* x, uint8_t* y, int64_t k);

void dequantize_row_f32(const uint8_t* x, float* y, int64_t k);
void dequantize_row_f16(const uint8_t* x, float* y, int64_t k);
void dequantize_row_bf16(const uint8_t* x, float* y, int64_t k);
void dequantize_row_q8_0(const uint8_t* x, float* y, int64_t k);
void dequantize_row_q5_0(const uint8_t* x, float* y, int64_t k);
void dequantize_row_q4_k(const uint8_t* x, float* y, int64_t k);
void dequantize_row_q6_k(const uint8_t* x, float* y, int64_t k);

// A [rows, cols] row-major matrix (a whole tensor or a range of its rows) <-> rows * row_bytes(t, cols) bytes,
// threaded with OpenMP over blocks. The bytes do not depend on the thread count. Throws EngineError for a cols
// that is not a multiple of the block size, or negative sizes.
void quantize(GgmlType t, const float* x, uint8_t* y, int64_t rows, int64_t cols);
void dequantize(GgmlType t, const uint8_t* x, float* y, int64_t rows, int64_t cols);

}  // namespace qlora::ggml
