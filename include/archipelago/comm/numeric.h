// Scalar and bulk conversions between fp32 and the narrow float formats that
// travel on the wire: bf16, fp16 (IEEE binary16) and the two OCP fp8 formats
// (E4M3 and E5M2).
//
// Why hand-written bit code instead of F16C/hardware casts: every rank must
// produce bit-identical bytes on every machine (x86 with or without F16C,
// ARM, any compiler flags), so the rounding here is integer arithmetic plus,
// for subnormals, one IEEE float addition (no multiply that a compiler could
// fuse into an FMA). The policies are fixed and documented in docs/codecs.md:
//
//   * rounding: round to nearest, ties to even, for every format;
//   * finite overflow SATURATES to the largest finite value of the format
//     (bf16 +-3.3895e38, fp16 +-65504, e4m3 +-448, e5m2 +-57344): a finite
//     gradient never turns into an infinity because of the encoding;
//   * +-Inf stays +-Inf where the format has it (bf16, fp16, e5m2); E4M3 has
//     no infinity, so +-Inf becomes NaN there;
//   * NaN becomes one canonical quiet NaN per format, sign kept
//     (bf16 0x7FC0, fp16 0x7E00, e4m3 0x7F, e5m2 0x7E; | sign bit);
//   * signed zero is kept.
//
// The narrow values are carried as raw bit patterns (uint16_t / uint8_t).
//
// Not to be confused with floatToBf16/floatToFp16 in dtype.h (transport):
// those follow IEEE overflow (finite -> Inf) for reductions of 16-bit
// tensors; the "Sat" encoders here are the codecs' saturating ones. The
// decoders (*BitsToFloat) return the same values as dtype.h's, written
// branch-free so that the codec loops vectorise.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>

namespace archipelago::comm {

inline constexpr float kBf16Max = 3.38953138925153547590e38f;  // 0x7F7F
inline constexpr float kFp16Max = 65504.0f;                     // 0x7BFF
inline constexpr float kFp8E4M3Max = 448.0f;                    // 0x7E
inline constexpr float kFp8E5M2Max = 57344.0f;                  // 0x7B

// ---- scalar conversions (inline: they sit in the codecs' hot loops) ----
// Written as selects rather than branches so that loops over them
// auto-vectorise; every step is integer arithmetic except the subnormal
// paths, which use one float addition whose IEEE rounding is the
// round-to-nearest-even we want (valid under FTZ/DAZ too: the float operands
// and results there are never subnormal where it matters).

inline uint16_t floatToBf16Sat(float x) {
  const uint32_t f = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7FFFFFFFu;
  uint32_t r = (a + 0x7FFFu + ((a >> 16) & 1u)) >> 16;
  r = r > 0x7F7Fu ? 0x7F7Fu : r;  // finite overflow saturates
  r = a >= 0x7F800000u ? (a == 0x7F800000u ? 0x7F80u : 0x7FC0u) : r;
  return static_cast<uint16_t>(sign | r);
}

inline float bf16BitsToFloat(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t floatToFp16Sat(float x) {
  const uint32_t f = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7FFFFFFFu;
  // Normal half range (|x| >= 2^-14): rebias the exponent (127 -> 15) and
  // round the 13 dropped mantissa bits to nearest even; a carry out of the
  // mantissa correctly bumps the exponent. Clamp first: finite saturates.
  const uint32_t an = a < 0x477FE000u ? a : 0x477FE000u;  // 65504
  const uint32_t hn = (an - 0x38000000u + 0xFFFu + ((an >> 13) & 1u)) >> 13;
  // Subnormal half (|x| < 2^-14): 0.5f has an ulp of 2^-24, the half
  // subnormal quantum, so the float addition rounds to that grid.
  const float s = std::bit_cast<float>(a < 0x38800000u ? a : 0u) + 0.5f;
  const uint32_t hs = std::bit_cast<uint32_t>(s) - 0x3F000000u;
  uint32_t h = a < 0x38800000u ? hs : hn;
  h = a >= 0x7F800000u ? (a == 0x7F800000u ? 0x7C00u : 0x7E00u) : h;
  return static_cast<uint16_t>(sign | h);
}

inline float fp16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  const uint32_t normal = ((e + 112u) << 23) | (m << 13);
  const uint32_t special = 0x7F800000u | (m << 13);  // Inf / NaN (payload kept)
  // m * 2^-24 is exact in float.
  const uint32_t sub = std::bit_cast<uint32_t>(static_cast<float>(m) * 5.9604644775390625e-08f);
  const uint32_t mag = e == 0 ? sub : (e == 31 ? special : normal);
  return std::bit_cast<float>(sign | mag);
}

namespace detail {

// Generic fp32 -> OCP fp8 (1 sign, kExp exponent, kMan mantissa bits).
// kMinNormalBits: fp32 bits of the smallest normal; kSubAdd: fp32 bits of a
// constant whose ulp is the fp8 subnormal quantum; kMaxCode: largest finite
// magnitude code; kInfCode/kNanCode: what +-Inf and NaN become.
template <int kMan, int kBias, uint32_t kMinNormalBits, uint32_t kSubAdd, uint32_t kMaxCode,
          uint32_t kInfCode, uint32_t kNanCode>
inline uint8_t floatToFp8(float x, uint32_t max_code = kMaxCode) {
  constexpr int kShift = 23 - kMan;
  const uint32_t f = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (f >> 24) & 0x80u;
  const uint32_t a = f & 0x7FFFFFFFu;
  const uint32_t an = a < 0x7F000000u ? a : 0x7F000000u;  // keeps the sum below from wrapping
  uint32_t cn = (an - (static_cast<uint32_t>(127 - kBias) << 23) + ((1u << (kShift - 1)) - 1u) +
                 ((an >> kShift) & 1u)) >> kShift;
  const float s = std::bit_cast<float>(a < kMinNormalBits ? a : 0u) + std::bit_cast<float>(kSubAdd);
  const uint32_t cs = std::bit_cast<uint32_t>(s) - kSubAdd;
  uint32_t c = a < kMinNormalBits ? cs : cn;
  c = c > max_code ? max_code : c;  // finite overflow saturates
  c = a >= 0x7F800000u ? (a == 0x7F800000u ? kInfCode : kNanCode) : c;
  return static_cast<uint8_t>(sign | c);
}

// fp8 code -> fp32 bits, from the format definition (used to build tables).
constexpr uint32_t fp8ToFloatBits(uint8_t code, int man_bits, int bias, bool e4m3) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const int exp_bits = 7 - man_bits;
  const uint32_t e = (code >> man_bits) & ((1u << exp_bits) - 1u);
  const uint32_t m = code & ((1u << man_bits) - 1u);
  const uint32_t emax = (1u << exp_bits) - 1u;
  if (e4m3 && e == emax && m == (1u << man_bits) - 1u) return sign | 0x7FC00000u;  // NaN
  if (!e4m3 && e == emax) return sign | (m == 0 ? 0x7F800000u : 0x7FC00000u);     // Inf/NaN
  if (e == 0) {
    if (m == 0) return sign;
    int p = 0;  // position of the leading one of m
    while ((m >> (p + 1)) != 0) ++p;
    const int exponent = p - (bias - 1) - man_bits;  // value = m * 2^(1-bias-man)
    return sign | (static_cast<uint32_t>(exponent + 127) << 23) | ((m - (1u << p)) << (23 - p));
  }
  return sign | (static_cast<uint32_t>(static_cast<int>(e) - bias + 127) << 23) |
         (m << (23 - man_bits));
}

template <int kMan, int kBias, bool kE4M3>
constexpr std::array<float, 256> makeFp8Table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) {
    t[c] = std::bit_cast<float>(fp8ToFloatBits(static_cast<uint8_t>(c), kMan, kBias, kE4M3));
  }
  return t;
}

inline constexpr std::array<float, 256> kFp8E4M3Table = makeFp8Table<3, 7, true>();
inline constexpr std::array<float, 256> kFp8E5M2Table = makeFp8Table<2, 15, false>();

}  // namespace detail

// E4M3 (OCP): bias 7, max 448 (0x7E), no Inf, NaN 0x7F/0xFF, min subnormal 2^-9.
inline uint8_t floatToFp8E4M3Sat(float x) {
  return detail::floatToFp8<3, 7, 0x3C800000u, 0x46800000u, 0x7Eu, 0x7Fu, 0x7Fu>(x);
}
inline float fp8E4M3ToFloat(uint8_t c) { return detail::kFp8E4M3Table[c]; }

// E5M2 (OCP): bias 15, max 57344 (0x7B), Inf 0x7C, NaN 0x7D..0x7F, min subnormal 2^-16.
inline uint8_t floatToFp8E5M2Sat(float x) {
  return detail::floatToFp8<2, 15, 0x38800000u, 0x43000000u, 0x7Bu, 0x7Cu, 0x7Eu>(x);
}
inline float fp8E5M2ToFloat(uint8_t c) { return detail::kFp8E5M2Table[c]; }

// Bulk versions; the spans must have equal sizes (checked, aborts otherwise).
void floatToBf16Sat(std::span<const float> in, std::span<uint16_t> out);
void bf16BitsToFloat(std::span<const uint16_t> in, std::span<float> out);
void floatToFp16Sat(std::span<const float> in, std::span<uint16_t> out);
void fp16BitsToFloat(std::span<const uint16_t> in, std::span<float> out);

}  // namespace archipelago::comm
