// Element types of checkpoints and wire payloads, and conversions to float.
//
// Arithmetic in expertmesh is fp32; bf16, f16 and fp8 (e4m3, "fn" variant:
// no infinities, max 448) are storage formats converted on load or on the wire.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/status/statusor.h"

namespace expertmesh {

enum class DType { kF32, kBF16, kF16, kF8E4M3 };

// Name as written in safetensors headers: "F32", "BF16", "F16", "F8_E4M3".
const char* DTypeName(DType t);
absl::StatusOr<DType> ParseDType(const std::string& safetensors_name);
size_t DTypeSize(DType t);

inline float Bf16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToFloat(uint16_t v);
uint16_t FloatToF16(float f);

// FP8 E4M3 (OCP "fn": bias 7, no inf, 0x7f/0xff are NaN, max finite 448).
// Decoding table, filled during static initialisation (read-only afterwards).
extern float g_f8e4m3_to_float[256];
inline float F8E4M3ToFloat(uint8_t v) { return g_f8e4m3_to_float[v]; }
// Round to nearest even, saturating to +-448.
uint8_t FloatToF8E4M3(float f);
constexpr float kF8E4M3Max = 448.0f;

// Converts n elements of type t at src to float.
void ConvertToFloat(DType t, const void* src, size_t n, float* dst);
// Converts n floats to type t (kF8E4M3 saturates; no scaling here).
void ConvertFromFloat(DType t, const float* src, size_t n, void* dst);

}  // namespace expertmesh
