#include "common/dtype.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace expertmesh {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    case DType::kF8E4M3: return "F8_E4M3";
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(const std::string& s) {
  if (s == "F32") return DType::kF32;
  if (s == "BF16") return DType::kBF16;
  if (s == "F16") return DType::kF16;
  if (s == "F8_E4M3") return DType::kF8E4M3;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype \"", s, "\" (expected F32, BF16, F16 or F8_E4M3)"));
}

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16:
    case DType::kF16: return 2;
    case DType::kF8E4M3: return 1;
  }
  return 0;
}

float F16ToFloat(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

uint16_t FloatToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (a >= 65520.0f) return sign | 0x7c00u;  // overflow to inf
  if (a < std::ldexp(1.0f, -14)) {           // subnormal: units of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  int e;
  float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  uint32_t mant = static_cast<uint32_t>(std::nearbyint((m * 2.0f - 1.0f) * 1024.0f));
  int exp = e - 1 + 15;
  if (mant == 1024) { mant = 0; ++exp; }
  if (exp >= 31) return sign | 0x7c00u;
  return sign | static_cast<uint16_t>((exp << 10) | mant);
}

float g_f8e4m3_to_float[256];

namespace {
struct F8TableInit {
  F8TableInit() {
    for (int i = 0; i < 256; ++i) {
      const int sign = i >> 7, exp = (i >> 3) & 0xf, man = i & 7;
      float x;
      if (exp == 0xf && man == 7) {
        x = NAN;
      } else if (exp == 0) {
        x = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
      } else {
        x = std::ldexp(1.0f + man / 8.0f, exp - 7);
      }
      g_f8e4m3_to_float[i] = sign ? -x : x;
    }
  }
} f8_table_init;
}  // namespace

uint8_t FloatToF8E4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= kF8E4M3Max) return sign | 0x7e;  // 448
  // Smallest normal is 2^-6; subnormals are multiples of 2^-9.
  if (a < std::ldexp(1.0f, -6)) {
    int q = static_cast<int>(std::nearbyint(a * 512.0f));  // ties to even under default rounding
    return sign | static_cast<uint8_t>(q);                // q == 8 is exactly the smallest normal
  }
  int e;
  float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp = e - 1 + 7;
  int man = static_cast<int>(std::nearbyint((m * 2.0f - 1.0f) * 8.0f));
  if (man == 8) { man = 0; ++exp; }
  if (exp > 15 || (exp == 15 && man == 7)) return sign | 0x7e;
  return sign | static_cast<uint8_t>((exp << 3) | man);
}

void ConvertToFloat(DType t, const void* src, size_t n, float* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(s[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToFloat(s[i]);
      return;
    }
    case DType::kF8E4M3: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = g_f8e4m3_to_float[s[i]];
      return;
    }
  }
}

void ConvertFromFloat(DType t, const float* src, size_t n, void* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToBf16(src[i]);
      return;
    }
    case DType::kF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToF16(src[i]);
      return;
    }
    case DType::kF8E4M3: {
      uint8_t* d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToF8E4M3(src[i]);
      return;
    }
  }
}

}  // namespace expertmesh
