// Element types of safetensors tensors and conversions to and from fp32.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace qlora {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

// Parses a safetensors dtype name ("F32", "BF16", ...); throws EngineError naming `context` for unknown names.
DType dtype_from_name(const std::string& name, const std::string& context);
const char* dtype_name(DType t);
size_t dtype_size(DType t);
// F32, F16, BF16 or F64: what convert_to_f32 reads.
inline bool is_floating(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16 || t == DType::F64; }

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch does when casting fp32 to bf16. NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);  // round to nearest even, overflow to inf

inline float round_to_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
inline float round_to_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

// Converts n elements of a floating dtype (F32, F16, BF16, F64) to fp32; other dtypes throw naming `context`.
void convert_to_f32(DType t, const void* src, size_t n, float* dst, const std::string& context);
// convert_to_f32 of a few values (a quantization block, a thread's chunk) in this thread: no OpenMP region entered,
// whose cost would exceed the work. `t` must be a floating type (TensorStore::floating checks it).
void convert_block_to_f32(DType t, const void* src, size_t n, float* dst);

}  // namespace qlora
