// Element types: decoding and rounding of BF16, F16 and FP8 E4M3 against
// values computed here from the format definitions.
#include "common/dtype.h"

#include <cmath>
#include <cstring>

#include "gtest/gtest.h"
#include "tests/common/test_util.h"

namespace expertmesh {
namespace {

// E4M3 "fn" from its definition: bias 7, 3 mantissa bits, exponent 0 subnormal,
// S.1111.111 NaN, no infinities.
double E4M3(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return NAN;
  const double v = e == 0 ? m / 8.0 * std::ldexp(1.0, -6) : (1 + m / 8.0) * std::ldexp(1.0, e - 7);
  return s ? -v : v;
}

TEST(DType, Names) {
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3}) {
    auto back = ParseDType(DTypeName(t));
    ASSERT_OK(back);
    EXPECT_EQ(*back, t);
  }
  EXPECT_EQ(DTypeSize(DType::kF8E4M3), 1u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_ERROR(ParseDType("F8_E5M2"), absl::StatusCode::kInvalidArgument, "F8_E5M2");
}

TEST(DType, F8DecodeAllCodes) {
  for (int c = 0; c < 256; ++c) {
    const double want = E4M3(c);
    const float got = F8E4M3ToFloat(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      EXPECT_EQ(got, want) << c;
      EXPECT_EQ(FloatToF8E4M3(got), c == 0x80 ? 0x80 : c) << c;  // round trip
    }
  }
  EXPECT_EQ(F8E4M3ToFloat(0x7e), 448.0f);
}

TEST(DType, F8Rounding) {
  EXPECT_EQ(FloatToF8E4M3(1.0625f), 0x38);   // tie between 1 and 1.125: even
  EXPECT_EQ(FloatToF8E4M3(1.1875f), 0x3a);   // tie between 1.125 and 1.25: even
  EXPECT_EQ(FloatToF8E4M3(1.07f), 0x39);
  EXPECT_EQ(FloatToF8E4M3(1000.0f), 0x7e);   // saturates to 448
  EXPECT_EQ(FloatToF8E4M3(-1000.0f), 0xfe);
  EXPECT_EQ(FloatToF8E4M3(464.0f), 0x7e);    // above 448 never becomes NaN
  EXPECT_EQ(FloatToF8E4M3(INFINITY), 0x7e);
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(FloatToF8E4M3(NAN))));
  EXPECT_EQ(FloatToF8E4M3(std::ldexp(1.0f, -10)), 0x00);      // half the smallest subnormal: even (0)
  EXPECT_EQ(FloatToF8E4M3(3 * std::ldexp(1.0f, -10)), 0x02);  // 1.5 subnormal steps: even (2)
  EXPECT_EQ(FloatToF8E4M3(std::ldexp(1.0f, -12)), 0x00);
  EXPECT_EQ(FloatToF8E4M3(15 * std::ldexp(1.0f, -10)), 0x08);  // 7.5 steps rounds up to the smallest normal
  // every float rounds to the nearest code
  for (float x = -460.0f; x <= 460.0f; x += 0.37f) {
    const float y = F8E4M3ToFloat(FloatToF8E4M3(x));
    const float ax = std::fabs(x);
    const float ulp = ax < std::ldexp(1.0f, -6) ? std::ldexp(1.0f, -9)
                                                : std::ldexp(1.0f, static_cast<int>(std::floor(std::log2(ax))) - 3);
    EXPECT_LE(std::fabs(y - std::min(std::max(x, -448.0f), 448.0f)), ulp / 2 + 1e-6f) << x;
  }
}

TEST(DType, Bf16AndF16) {
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie: even
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(Bf16ToFloat(0xc000), -2.0f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
  for (uint32_t c = 0; c < 65536; ++c) {
    const float f = F16ToFloat(static_cast<uint16_t>(c));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToF16(f), c) << c;
  }
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(FloatToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie: even
  EXPECT_EQ(FloatToF16(1e6f), 0x7c00);                         // overflow: inf
  float buf[3];
  const uint16_t h[3] = {0x3c00, 0xc000, 0x3800};
  ConvertToFloat(DType::kF16, h, 3, buf);
  EXPECT_EQ(buf[1], -2.0f);
  EXPECT_EQ(buf[2], 0.5f);
}

}  // namespace
}  // namespace expertmesh
