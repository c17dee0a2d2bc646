// Reference checks of the scalar format conversions in numeric.h: every code
// of every narrow format is decoded and compared with the value the format
// definition gives (computed in fp64 from sign/exponent/mantissa), and the
// encoders are compared with a brute-force "nearest representable value,
// ties to the even code, saturate finite overflow" reference on all
// representable values, all midpoints between neighbours, their float
// neighbours and random bit patterns.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "archipelago/comm/numeric.h"

namespace archipelago::comm {
namespace {

// A narrow binary float format: 1 sign bit, e exponent bits, m mantissa bits.
struct Format {
  const char* name;
  int exp_bits;
  int man_bits;
  int bias;
  bool e4m3;             // OCP E4M3: no Inf, only S.1111.111 is NaN
  uint32_t max_code;     // largest finite magnitude code
  uint32_t inf_code;     // what +Inf encodes to (magnitude)
  uint32_t nan_code;     // what NaN encodes to (magnitude)
  int total_bits() const { return 1 + exp_bits + man_bits; }
};

const Format kBf16{"bf16", 8, 7, 127, false, 0x7F7F, 0x7F80, 0x7FC0};
const Format kFp16{"fp16", 5, 10, 15, false, 0x7BFF, 0x7C00, 0x7E00};
const Format kE4M3{"e4m3", 4, 3, 7, true, 0x7E, 0x7F, 0x7F};
const Format kE5M2{"e5m2", 5, 2, 15, false, 0x7B, 0x7C, 0x7E};

// Value of a code from the format definition, in fp64.
double refValue(const Format& f, uint32_t code) {
  const uint32_t sign = code >> (f.total_bits() - 1);
  const uint32_t e = (code >> f.man_bits) & ((1u << f.exp_bits) - 1);
  const uint32_t m = code & ((1u << f.man_bits) - 1);
  const uint32_t emax = (1u << f.exp_bits) - 1;
  const double s = sign ? -1.0 : 1.0;
  if (f.e4m3) {
    if (e == emax && m == (1u << f.man_bits) - 1) return std::numeric_limits<double>::quiet_NaN();
  } else if (e == emax) {
    return m == 0 ? s * std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  }
  const double frac = static_cast<double>(m) / static_cast<double>(1u << f.man_bits);
  if (e == 0) return s * std::ldexp(frac, 1 - f.bias);
  return s * std::ldexp(1.0 + frac, static_cast<int>(e) - f.bias);
}

// Nearest finite magnitude code to a >= 0: ties to the even code, saturating.
uint32_t refNearestCode(const Format& f, double a) {
  // Magnitude codes 0..max_code are increasing in value: binary search.
  uint32_t lo = 0, hi = f.max_code;
  if (a >= refValue(f, f.max_code)) return f.max_code;
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (refValue(f, mid) <= a) lo = mid; else hi = mid;
  }
  const double dl = a - refValue(f, lo), dh = refValue(f, hi) - a;
  if (dl < dh) return lo;
  if (dh < dl) return hi;
  return (lo % 2 == 0) ? lo : hi;
}

uint32_t refEncode(const Format& f, float x) {
  const uint32_t sign_bit = 1u << (f.total_bits() - 1);
  const uint32_t sign = std::signbit(x) ? sign_bit : 0;
  if (std::isnan(x)) return sign | f.nan_code;
  if (std::isinf(x)) return sign | f.inf_code;
  return sign | refNearestCode(f, std::fabs(static_cast<double>(x)));
}

uint32_t encodeWith(const Format& f, float x) {
  if (&f == &kBf16) return floatToBf16Sat(x);
  if (&f == &kFp16) return floatToFp16Sat(x);
  if (&f == &kE4M3) return floatToFp8E4M3Sat(x);
  return floatToFp8E5M2Sat(x);
}

float decodeWith(const Format& f, uint32_t c) {
  if (&f == &kBf16) return bf16BitsToFloat(static_cast<uint16_t>(c));
  if (&f == &kFp16) return fp16BitsToFloat(static_cast<uint16_t>(c));
  if (&f == &kE4M3) return fp8E4M3ToFloat(static_cast<uint8_t>(c));
  return fp8E5M2ToFloat(static_cast<uint8_t>(c));
}

class FormatTest : public ::testing::TestWithParam<const Format*> {};

TEST_P(FormatTest, EveryCodeDecodesToTheDefinedValue) {
  const Format& f = *GetParam();
  const uint32_t codes = 1u << f.total_bits();
  for (uint32_t c = 0; c < codes; ++c) {
    const double want = refValue(f, c);
    const float got = decodeWith(f, c);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << f.name << " code " << c;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << f.name << " code " << c;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << f.name << " code " << c;
    }
  }
}

TEST_P(FormatTest, EncodeMatchesNearestEvenSaturatingReference) {
  const Format& f = *GetParam();
  std::vector<float> inputs;
  const uint32_t sign_bit = 1u << (f.total_bits() - 1);
  for (uint32_t c = 0; c <= f.max_code; ++c) {
    const double v = refValue(f, c);
    inputs.push_back(static_cast<float>(v));
    // Past the largest code: the value the next code would have had if the
    // format went on (its midpoint with max must saturate down to max).
    const double next = c < f.max_code ? refValue(f, c + 1) : 2 * v - refValue(f, c - 1);
    const float mid = static_cast<float>((v + next) / 2);                 // exact in float
    ASSERT_EQ(static_cast<double>(mid), (v + next) / 2);
    inputs.push_back(mid);
    inputs.push_back(std::nextafter(mid, 0.0f));
    inputs.push_back(std::nextafter(mid, std::numeric_limits<float>::infinity()));
  }
  std::mt19937 rng(1234);
  for (int i = 0; i < 200000; ++i) inputs.push_back(std::bit_cast<float>(static_cast<uint32_t>(rng())));
  for (float s : {0.0f, 1.0f, 3.0e38f, std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN()}) {
    inputs.push_back(s);
  }
  const size_t n = inputs.size();
  for (size_t i = 0; i < n; ++i) inputs.push_back(-inputs[i]);
  for (float x : inputs) {
    const uint32_t want = refEncode(f, x);
    const uint32_t got = encodeWith(f, x);
    ASSERT_EQ(got, want) << f.name << " x=" << x << " bits=0x" << std::hex << std::bit_cast<uint32_t>(x);
  }
  (void)sign_bit;
}

INSTANTIATE_TEST_SUITE_P(AllFormats, FormatTest, ::testing::Values(&kBf16, &kFp16, &kE4M3, &kE5M2),
                         [](const auto& info) { return std::string(info.param->name); });

TEST(NumericKnownValues, Fp16) {
  EXPECT_EQ(floatToFp16Sat(1.0f), 0x3C00);
  EXPECT_EQ(floatToFp16Sat(-2.0f), 0xC000);
  EXPECT_EQ(floatToFp16Sat(65504.0f), 0x7BFF);
  EXPECT_EQ(floatToFp16Sat(65520.0f), 0x7BFF);  // IEEE would give Inf; we saturate
  EXPECT_EQ(floatToFp16Sat(1e9f), 0x7BFF);
  EXPECT_EQ(floatToFp16Sat(-1e9f), 0xFBFF);
  EXPECT_EQ(floatToFp16Sat(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(floatToFp16Sat(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(floatToFp16Sat(std::ldexp(1.0f, -25)), 0x0000);  // tie 0 / 2^-24 -> even (0)
  EXPECT_EQ(floatToFp16Sat(std::ldexp(3.0f, -25)), 0x0002);  // tie 1 / 2 ulps -> even (2)
  EXPECT_EQ(floatToFp16Sat(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // tie -> even mantissa
  EXPECT_EQ(floatToFp16Sat(1.0f + std::ldexp(3.0f, -11)), 0x3C02);
  EXPECT_EQ(floatToFp16Sat(-0.0f), 0x8000);
  EXPECT_EQ(floatToFp16Sat(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(floatToFp16Sat(-std::numeric_limits<float>::quiet_NaN()), 0xFE00);
  EXPECT_EQ(fp16BitsToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16BitsToFloat(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(fp16BitsToFloat(0x7BFF), 65504.0f);
}

TEST(NumericKnownValues, Bf16) {
  EXPECT_EQ(floatToBf16Sat(1.0f), 0x3F80);
  EXPECT_EQ(floatToBf16Sat(1.0f + std::ldexp(1.0f, -8)), 0x3F80);  // tie -> even
  EXPECT_EQ(floatToBf16Sat(1.0f + std::ldexp(3.0f, -8)), 0x3F82);  // tie -> even
  EXPECT_EQ(floatToBf16Sat(std::numeric_limits<float>::max()), 0x7F7F);  // saturates, not Inf
  EXPECT_EQ(floatToBf16Sat(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(floatToBf16Sat(std::ldexp(1.0f, -133)), 0x0001);  // smallest bf16 subnormal
  EXPECT_EQ(floatToBf16Sat(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(floatToBf16Sat(std::numeric_limits<float>::quiet_NaN()), 0x7FC0);
  EXPECT_EQ(bf16BitsToFloat(0x7F7F), kBf16Max);
}

TEST(NumericKnownValues, Fp8) {
  EXPECT_EQ(fp8E4M3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(fp8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(fp8E4M3ToFloat(0xFF)));
  EXPECT_EQ(fp8E4M3ToFloat(0x80), 0.0f);  // -0 is a zero in OCP E4M3, not NaN
  EXPECT_EQ(fp8E5M2ToFloat(0x7B), 57344.0f);
  EXPECT_EQ(fp8E5M2ToFloat(0x01), std::ldexp(1.0f, -16));
  EXPECT_TRUE(std::isinf(fp8E5M2ToFloat(0x7C)));
  EXPECT_EQ(floatToFp8E4M3Sat(1000.0f), 0x7E);
  EXPECT_EQ(floatToFp8E4M3Sat(std::numeric_limits<float>::infinity()), 0x7F);  // no Inf: NaN
  EXPECT_EQ(floatToFp8E5M2Sat(1e6f), 0x7B);
  EXPECT_EQ(floatToFp8E5M2Sat(-std::numeric_limits<float>::infinity()), 0xFC);
  EXPECT_EQ(floatToFp8E4M3Sat(std::ldexp(1.0f, -10)), 0x00);  // tie 0 / 2^-9 -> even
  EXPECT_EQ(floatToFp8E4M3Sat(std::ldexp(3.0f, -10)), 0x02);
}

TEST(NumericBulk, MatchesScalar) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 100.0f);
  std::vector<float> x(1000);
  for (float& v : x) v = nd(rng);
  std::vector<uint16_t> h(x.size());
  std::vector<float> y(x.size());
  floatToFp16Sat(x, h);
  fp16BitsToFloat(h, y);
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(h[i], floatToFp16Sat(x[i]));
    ASSERT_EQ(y[i], static_cast<float>(refValue(kFp16, h[i])));
  }
  floatToBf16Sat(x, h);
  bf16BitsToFloat(h, y);
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(h[i], refEncode(kBf16, x[i]));
    ASSERT_EQ(y[i], static_cast<float>(refValue(kBf16, h[i])));
  }
}

}  // namespace
}  // namespace archipelago::comm
