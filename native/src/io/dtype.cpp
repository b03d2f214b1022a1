#include "io/dtype.h"

#include <algorithm>

#include "util/error.h"

namespace qlora {

namespace {
struct DTypeEntry {
  DType type;
  const char* name;
  size_t size;
};
// The names are those of the safetensors format (and its Python and Rust libraries).
constexpr DTypeEntry kDTypes[] = {
    {DType::F64, "F64", 8}, {DType::F32, "F32", 4}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2}, {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1},
};

// Reads element i of a packed little-endian array without assuming alignment (mmap'd tensors need not be aligned).
template <typename T>
T load(const void* src, size_t i) {
  T v;
  std::memcpy(&v, static_cast<const uint8_t*>(src) + i * sizeof(T), sizeof(T));
  return v;
}
}  // namespace

DType dtype_from_name(const std::string& name, const std::string& context) {
  for (const auto& e : kDTypes)
    if (name == e.name) return e.type;
  fail(context, ": dtype '", name, "' is not supported (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
}

const char* dtype_name(DType t) {
  for (const auto& e : kDTypes)
    if (e.type == t) return e.name;
  return "?";
}

size_t dtype_size(DType t) {
  for (const auto& e : kDTypes)
    if (e.type == t) return e.size;
  return 0;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;  // ±0
    } else {
      // Subnormal (mantissa * 2^-24): shift until the implicit bit appears; every f16 subnormal is an f32 normal.
      uint32_t e = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mantissa & 0x3FFu) << 13);
    }
  } else if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf, or NaN with its payload
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  // NaN stays a quiet NaN, keeping the top payload bits.
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  // 65520 (0x477FF000) is halfway between 65504, the largest f16, and 65536; the tie goes to the even side, inf.
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (abs < 0x38800000u) {
    // Below 2^-14 the result is subnormal: round abs * 2^24 to an integer, nearest even. At or below 2^-25, half
    // the smallest subnormal, that is 0 (the exact half is a tie that goes to the even 0).
    if (abs <= 0x33000000u) return sign;
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;  // with the implicit bit
    const uint32_t shift = 126 - exponent;                    // 14..24 here
    uint32_t half = mantissa >> shift;
    const uint32_t rem = mantissa & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;  // may carry into the smallest normal, which is right
    return static_cast<uint16_t>(sign | half);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits, nearest even. A carry out of
  // the mantissa bumps the exponent, which is the correct result.
  uint32_t h = (abs >> 13) - (112u << 10);
  const uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

void convert_block_to_f32(DType t, const void* src, size_t n, float* dst) {
  switch (t) {
    case DType::F32:
      if (n) std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load<uint16_t>(src, i));
      return;
    case DType::F16:
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load<uint16_t>(src, i));
      return;
    case DType::F64:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load<double>(src, i));
      return;
    default: fail("convert_block_to_f32 of ", dtype_name(t), ", which is not a floating type");
  }
}

// Conversions of whole tensors (a model's weights on load) run on every core, in chunks; a row of an embedding does
// not.
constexpr size_t kParallelFrom = size_t{1} << 16;

void convert_to_f32(DType t, const void* src, size_t n, float* dst, const std::string& context) {
  if (!is_floating(t))
    fail(context, ": dtype ", dtype_name(t), " is not a floating type (F32, F16, BF16 or F64 expected)");
  if (n < kParallelFrom) return convert_block_to_f32(t, src, n, dst);
  const int64_t chunks = static_cast<int64_t>((n + kParallelFrom - 1) / kParallelFrom);  // OpenMP 2.0 (MSVC): signed
  const size_t element = dtype_size(t);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const size_t begin = static_cast<size_t>(c) * kParallelFrom;
    convert_block_to_f32(t, static_cast<const uint8_t*>(src) + begin * element, std::min(kParallelFrom, n - begin),
                         dst + begin);
  }
}

}  // namespace qlora
