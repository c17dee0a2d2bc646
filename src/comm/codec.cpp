// Codecs for the slow legs: wire layout, per-block scales, encode/decode.
//
// Determinism: every value on the wire is a function of the input bits only.
// Rounding is done by integer code (numeric.h), by IEEE float operations whose
// rounding is fully specified (one multiply, then round-to-nearest-even to an
// integer), or by multiplies by powers of two (exact). No expression here has
// the shape a*b+c with a rounded product, so FMA contraction
// (-ffp-contract=fast with -march=native) cannot change results; no
// reduction depends on summation order (the only reduction is an integer max).
// The SSE2 paths and the scalar tails compute the same functions bit for bit
// (checked by the tests, which use lengths that exercise both).
#include "archipelago/comm/codec.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cctype>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "archipelago/comm/numeric.h"

namespace archipelago::comm {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the codec wire format is little-endian; big-endian hosts need byte swaps here");

constexpr size_t kB = kCodecBlockSize;
constexpr uint8_t kMagic0 = 0x41;  // 'A'
constexpr uint8_t kMagic1 = 0x51;  // 'Q'
constexpr uint8_t kVersion = 1;
// Scales never go below 2^-110 (and fp8 scale exponents never below -110):
// keeps every scale, reciprocal and decoded value a normal float, so results
// do not depend on flush-to-zero / denormals-are-zero modes. Only blocks
// whose absmax is below ~1e-31 are affected (they use part of the range).
constexpr int kMinScaleExp = -110;
constexpr float kMinScale = 0x1p-110f;
constexpr uint32_t kCanonicalNaN = 0x7FC00000u;

constexpr std::array<std::string_view, 7> kNames = {"none",     "bf16",     "fp16", "int8",
                                                    "fp8_e4m3", "fp8_e5m2", "int4"};

bool validKind(CodecKind kind) { return static_cast<size_t>(kind) < kNames.size(); }

bool isScaled(CodecKind kind) {
  return kind == CodecKind::kInt8 || kind == CodecKind::kInt4 || kind == CodecKind::kFP8E4M3 ||
         kind == CodecKind::kFP8E5M2;
}

size_t numBlocks(size_t n) { return (n + kB - 1) / kB; }

size_t payloadBytes(CodecKind kind, size_t n) {
  switch (kind) {
    case CodecKind::kNone: return 4 * n;
    case CodecKind::kBF16:
    case CodecKind::kFP16: return 2 * n;
    case CodecKind::kInt8:
    case CodecKind::kFP8E4M3:
    case CodecKind::kFP8E5M2: return n;
    case CodecKind::kInt4: return (n / kB) * (kB / 2) + ((n % kB) + 1) / 2;
  }
  ARCH_CHECK_MSG(false, "invalid CodecKind");
  return 0;
}

// Offset of the payload of block b inside the payload area.
size_t blockPayloadOffset(CodecKind kind, size_t b) {
  return kind == CodecKind::kInt4 ? b * (kB / 2) : b * kB;
}

void writeHeader(CodecKind kind, size_t n, uint8_t* out) {
  out[0] = kMagic0;
  out[1] = kMagic1;
  out[2] = kVersion;
  out[3] = static_cast<uint8_t>(kind);
  const uint32_t block = static_cast<uint32_t>(kB);
  const uint64_t count = n;
  std::memcpy(out + 4, &block, 4);
  std::memcpy(out + 8, &count, 8);
}

float loadF32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
void storeF32(uint8_t* p, float v) { std::memcpy(p, &v, 4); }

// Largest |x| over the finite elements (0 if none). Integer max on the
// magnitude bits: for non-negative floats integer order is float order, and
// an integer reduction vectorises without fast-math and is order-independent.
template <size_t kN>
uint32_t finiteAbsMaxBitsFixed(const float* x) {
  uint32_t m = 0;
  for (size_t i = 0; i < kN; ++i) {
    uint32_t a = std::bit_cast<uint32_t>(x[i]) & 0x7FFFFFFFu;
    a = a < 0x7F800000u ? a : 0u;
    m = m > a ? m : a;
  }
  return m;
}
float finiteAbsMax(const float* x, size_t n) {
  if (n == kB) return std::bit_cast<float>(finiteAbsMaxBitsFixed<kB>(x));
  uint32_t m = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t a = std::bit_cast<uint32_t>(x[i]) & 0x7FFFFFFFu;
    a = a < 0x7F800000u ? a : 0u;
    m = m > a ? m : a;
  }
  return std::bit_cast<float>(m);
}

// ---- int8 / int4 ------------------------------------------------------------

// Symmetric scale absmax/qmax, floored, and nudged down if qmax*scale would
// not be a finite float (only for absmax within an ulp or so of FLT_MAX).
float symmetricScale(float absmax, float qmax) {
  float s = absmax / qmax;
  if (!(s >= kMinScale)) s = kMinScale;
  while (static_cast<double>(s) * qmax > static_cast<double>(FLT_MAX)) s = std::nextafter(s, 0.0f);
  return s;
}

// Scalar twin of the SSE2 path: cvtps2dq (round to nearest even; NaN, Inf
// and |y| >= 2^31 give INT32_MIN) followed by the saturating packs.
inline int8_t quantizeOne(float y) {
  if (!(std::fabs(y) < 2147483648.0f)) return -128;
  const long v = std::lrint(y);  // default rounding mode: nearest, ties to even
  return static_cast<int8_t>(v < -128 ? -128 : (v > 127 ? 127 : v));
}

// q[i] = round_half_even(x[i] * inv), saturated to int8; non-finite -> -128.
void quantizeI8(const float* x, size_t n, float inv, int8_t* q) {
  size_t i = 0;
#if defined(__SSE2__)
  const __m128 vinv = _mm_set1_ps(inv);
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i), vinv));
    const __m128i b = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i + 4), vinv));
    const __m128i c = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i + 8), vinv));
    const __m128i d = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i + 12), vinv));
    const __m128i packed = _mm_packs_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), packed);
  }
#endif
  for (; i < n; ++i) q[i] = quantizeOne(x[i] * inv);
}

// out[i] = q[i] * scale, or NaN for the reserved code -128.
void dequantizeI8(const int8_t* q, size_t n, float scale, float* out) {
  size_t i = 0;
#if defined(__SSE2__)
  const __m128 vs = _mm_set1_ps(scale);
  const __m128i marker = _mm_set1_epi32(-128);
  const __m128 nan = _mm_castsi128_ps(_mm_set1_epi32(static_cast<int>(kCanonicalNaN)));
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
    const __m128i lo16 = _mm_srai_epi16(_mm_unpacklo_epi8(v, v), 8);
    const __m128i hi16 = _mm_srai_epi16(_mm_unpackhi_epi8(v, v), 8);
    const __m128i w[4] = {_mm_srai_epi32(_mm_unpacklo_epi16(lo16, lo16), 16),
                          _mm_srai_epi32(_mm_unpackhi_epi16(lo16, lo16), 16),
                          _mm_srai_epi32(_mm_unpacklo_epi16(hi16, hi16), 16),
                          _mm_srai_epi32(_mm_unpackhi_epi16(hi16, hi16), 16)};
    for (int k = 0; k < 4; ++k) {
      const __m128 f = _mm_mul_ps(_mm_cvtepi32_ps(w[k]), vs);
      const __m128 m = _mm_castsi128_ps(_mm_cmpeq_epi32(w[k], marker));
      _mm_storeu_ps(out + i + 4 * k, _mm_or_ps(_mm_andnot_ps(m, f), _mm_and_ps(m, nan)));
    }
  }
#endif
  for (; i < n; ++i) {
    out[i] = q[i] == -128 ? std::bit_cast<float>(kCanonicalNaN) : static_cast<float>(q[i]) * scale;
  }
}

void encodeInt8(std::span<const float> in, uint8_t* scales, uint8_t* payload) {
  const size_t n = in.size();
  for (size_t b = 0, off = 0; off < n; ++b, off += kB) {
    const size_t len = std::min(kB, n - off);
    const float s = symmetricScale(finiteAbsMax(in.data() + off, len), 127.0f);
    storeF32(scales + 4 * b, s);
    quantizeI8(in.data() + off, len, 1.0f / s, reinterpret_cast<int8_t*>(payload + off));
  }
}

void encodeInt4(std::span<const float> in, uint8_t* scales, uint8_t* payload) {
  const size_t n = in.size();
  alignas(16) int8_t q[kB + 1];
  for (size_t b = 0, off = 0; off < n; ++b, off += kB) {
    const size_t len = std::min(kB, n - off);
    const float s = symmetricScale(finiteAbsMax(in.data() + off, len), 7.0f);
    storeF32(scales + 4 * b, s);
    quantizeI8(in.data() + off, len, 1.0f / s, q);
    q[len] = 0;  // zero padding nibble for an odd tail
    uint8_t* dst = payload + blockPayloadOffset(CodecKind::kInt4, b);
    const size_t bytes = (len + 1) / 2;
    for (size_t j = 0; j < bytes; ++j) {
      // -128 (non-finite) -> reserved nibble 8 (-8); finite codes are in [-7, 7].
      const int lo = q[2 * j] == -128 ? 8 : (std::clamp<int>(q[2 * j], -7, 7) & 0xF);
      const int hi = q[2 * j + 1] == -128 ? 8 : (std::clamp<int>(q[2 * j + 1], -7, 7) & 0xF);
      dst[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

void decodeInt4Block(const uint8_t* src, size_t len, float scale, float* out) {
  alignas(16) int8_t q[kB + 1];
  const size_t bytes = (len + 1) / 2;
  for (size_t j = 0; j < bytes; ++j) {
    // Sign-extend each nibble; the reserved -8 maps to int8 -128 (NaN).
    const int lo = static_cast<int8_t>(static_cast<uint8_t>(src[j] << 4)) >> 4;
    const int hi = static_cast<int8_t>(src[j]) >> 4;
    q[2 * j] = static_cast<int8_t>(lo == -8 ? -128 : lo);
    q[2 * j + 1] = static_cast<int8_t>(hi == -8 ? -128 : hi);
  }
  dequantizeI8(q, len, scale, out);
}

// ---- fp8 --------------------------------------------------------------------

struct Fp8Format {
  double max_value;
  uint32_t max_code;
  const std::array<float, 256>* table;
};

Fp8Format fp8Format(CodecKind kind) {
  if (kind == CodecKind::kFP8E4M3) return {448.0, 0x7E, &detail::kFp8E4M3Table};
  return {57344.0, 0x7B, &detail::kFp8E5M2Table};
}

// Smallest k with absmax <= max_value * 2^k, clamped to [kMinScaleExp, 127]:
// the block absmax lands in (max/2, max] of the format. A power of two keeps
// the scaling itself exact, so the only rounding is the fp8 rounding.
int fp8ScaleExp(float absmax, double max_value) {
  if (absmax == 0.0f) return kMinScaleExp;
  int e = 0;
  const double m = std::frexp(static_cast<double>(absmax) / max_value, &e);  // ratio = m * 2^e
  const int k = m == 0.5 ? e - 1 : e;
  return std::clamp(k, kMinScaleExp, 127);
}

template <CodecKind kKind>
inline uint8_t toFp8(float y, uint32_t max_code) {
  if constexpr (kKind == CodecKind::kFP8E4M3) {
    return detail::floatToFp8<3, 7, 0x3C800000u, 0x46800000u, 0x7Eu, 0x7Fu, 0x7Fu>(y, max_code);
  } else {
    return detail::floatToFp8<2, 15, 0x38800000u, 0x43000000u, 0x7Bu, 0x7Cu, 0x7Eu>(y, max_code);
  }
}

template <CodecKind kKind>
void encodeFp8(std::span<const float> in, uint8_t* scales, uint8_t* payload) {
  const Fp8Format fmt = fp8Format(kKind);
  const size_t n = in.size();
  for (size_t b = 0, off = 0; off < n; ++b, off += kB) {
    const size_t len = std::min(kB, n - off);
    const float* x = in.data() + off;
    const int k = fp8ScaleExp(finiteAbsMax(x, len), fmt.max_value);
    const float scale = std::ldexp(1.0f, k);
    const float inv = std::ldexp(1.0f, -k);
    // Near FLT_MAX the largest codes times 2^k would overflow: saturate lower.
    uint32_t max_code = fmt.max_code;
    while (static_cast<double>((*fmt.table)[max_code]) * scale > static_cast<double>(FLT_MAX)) --max_code;
    storeF32(scales + 4 * b, scale);
    uint8_t* dst = payload + off;
    if (len == kB && max_code == fmt.max_code) {
      for (size_t i = 0; i < kB; ++i) dst[i] = toFp8<kKind>(x[i] * inv, fmt.max_code);
    } else {
      for (size_t i = 0; i < len; ++i) dst[i] = toFp8<kKind>(x[i] * inv, max_code);
    }
  }
}

void decodeFp8Block(const std::array<float, 256>& table, const uint8_t* src, size_t len, float scale,
                    float* out) {
  for (size_t i = 0; i < len; ++i) out[i] = table[src[i]] * scale;
}

// ---- bf16 / fp16 / none -----------------------------------------------------

template <uint16_t (*kConvert)(float)>
void encodeHalfLike(std::span<const float> in, uint8_t* payload) {
  const size_t n = in.size();
  alignas(16) uint16_t tmp[kB];
  size_t off = 0;
  for (; off + kB <= n; off += kB) {
    const float* x = in.data() + off;
    for (size_t i = 0; i < kB; ++i) tmp[i] = kConvert(x[i]);
    std::memcpy(payload + 2 * off, tmp, sizeof(tmp));
  }
  for (size_t i = off; i < n; ++i) {
    const uint16_t h = kConvert(in[i]);
    std::memcpy(payload + 2 * i, &h, 2);
  }
}

template <float (*kConvert)(uint16_t)>
void decodeHalfLike(const uint8_t* payload, std::span<float> out) {
  const size_t n = out.size();
  alignas(16) uint16_t tmp[kB];
  size_t off = 0;
  for (; off + kB <= n; off += kB) {
    std::memcpy(tmp, payload + 2 * off, sizeof(tmp));
    float* y = out.data() + off;
    for (size_t i = 0; i < kB; ++i) y[i] = kConvert(tmp[i]);
  }
  for (size_t i = off; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, payload + 2 * i, 2);
    out[i] = kConvert(h);
  }
}

uint16_t bf16Of(float x) { return floatToBf16Sat(x); }
float bf16From(uint16_t h) { return bf16BitsToFloat(h); }
uint16_t fp16Of(float x) { return floatToFp16Sat(x); }
float fp16From(uint16_t h) { return fp16BitsToFloat(h); }

// Decodes elements [begin, begin + out.size()) of a buffer holding n
// elements whose header and size were already validated (or that we produced
// ourselves, or validate() passed); begin is a multiple of the block size.
void decodeRange(CodecKind kind, const uint8_t* in, size_t n, size_t begin, std::span<float> out) {
  const uint8_t* scales = in + kCodecHeaderBytes;
  const uint8_t* payload = scales + (isScaled(kind) ? 4 * numBlocks(n) : 0);
  const size_t m = out.size();
  switch (kind) {
    case CodecKind::kNone:
      if (m != 0) std::memcpy(out.data(), payload + 4 * begin, 4 * m);
      return;
    case CodecKind::kBF16: decodeHalfLike<bf16From>(payload + 2 * begin, out); return;
    case CodecKind::kFP16: decodeHalfLike<fp16From>(payload + 2 * begin, out); return;
    default: break;
  }
  for (size_t b = begin / kB, off = 0; off < m; ++b, off += kB) {
    const size_t len = std::min(kB, m - off);
    const float s = loadF32(scales + 4 * b);
    const uint8_t* src = payload + blockPayloadOffset(kind, b);
    float* dst = out.data() + off;
    switch (kind) {
      case CodecKind::kInt8: dequantizeI8(reinterpret_cast<const int8_t*>(src), len, s, dst); break;
      case CodecKind::kInt4: decodeInt4Block(src, len, s, dst); break;
      case CodecKind::kFP8E4M3: decodeFp8Block(detail::kFp8E4M3Table, src, len, s, dst); break;
      case CodecKind::kFP8E5M2: decodeFp8Block(detail::kFp8E5M2Table, src, len, s, dst); break;
      default: break;
    }
  }
}

// Checks header and size of an encoded buffer that should hold n elements.
core::Status validate(CodecKind kind, std::span<const uint8_t> in, size_t n) {
  ARCH_CHECK_MSG(validKind(kind), "decode: invalid CodecKind");
  const std::string what = std::string(codecName(kind)) + " decode";
  if (in.size() < kCodecHeaderBytes) {
    return core::dataLoss(what + ": " + std::to_string(in.size()) +
                          " bytes is shorter than the 16-byte header");
  }
  const uint8_t* p = in.data();
  if (p[0] != kMagic0 || p[1] != kMagic1) return core::dataLoss(what + ": bad magic (not a codec buffer)");
  if (p[2] != kVersion) {
    return core::dataLoss(what + ": wire version " + std::to_string(p[2]) + ", this build reads " +
                          std::to_string(kVersion));
  }
  if (p[3] != static_cast<uint8_t>(kind)) {
    const auto got = static_cast<CodecKind>(p[3]);
    return core::dataLoss(what + ": buffer was encoded with codec " +
                          (validKind(got) ? std::string(codecName(got)) : "id " + std::to_string(p[3])));
  }
  uint32_t block = 0;
  uint64_t count = 0;
  std::memcpy(&block, p + 4, 4);
  std::memcpy(&count, p + 8, 8);
  if (block != kB) {
    return core::dataLoss(what + ": block size " + std::to_string(block) + ", expected " +
                          std::to_string(kB));
  }
  if (count != n) {
    return core::dataLoss(what + ": buffer holds " + std::to_string(count) + " elements, caller expects " +
                          std::to_string(n));
  }
  const size_t want = encodedSize(kind, n);
  if (in.size() != want) {
    return core::dataLoss(what + ": " + std::to_string(in.size()) + " bytes, expected " +
                          std::to_string(want) + (in.size() < want ? " (truncated)" : " (trailing bytes)"));
  }
  if (!isScaled(kind)) return core::okStatus();
  const size_t nb = numBlocks(n);
  const uint8_t* scales = p + kCodecHeaderBytes;
  for (size_t b = 0; b < nb; ++b) {
    const float s = loadF32(scales + 4 * b);
    if (!(s > 0.0f) || !std::isfinite(s)) {
      return core::dataLoss(what + ": block " + std::to_string(b) + " has invalid scale " + std::to_string(s) +
                            " (want finite > 0)");
    }
  }
  // Only the last block can be short; an odd int4 tail pads a zero nibble.
  if (kind == CodecKind::kInt4 && (n % 2) == 1 && (p[in.size() - 1] & 0xF0) != 0) {
    return core::dataLoss(what + ": non-zero padding nibble in the last byte");
  }
  return core::okStatus();
}

// Scratch for roundTrip(); one per thread so concurrent callers do not share.
std::vector<uint8_t>& roundTripScratch() {
  thread_local std::vector<uint8_t> scratch;
  return scratch;
}

}  // namespace

std::string codecNameList() {
  std::string s;
  for (size_t i = 0; i < kNames.size(); ++i) {
    if (i != 0) s += ", ";
    s += kNames[i];
  }
  return s;
}

core::Result<CodecKind> parseCodec(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (size_t i = 0; i < kNames.size(); ++i) {
    if (lower == kNames[i]) return static_cast<CodecKind>(i);
  }
  return core::invalidArgument("unknown codec \"" + std::string(name) + "\"; valid codecs: " +
                               codecNameList());
}

std::string_view codecName(CodecKind kind) {
  return validKind(kind) ? kNames[static_cast<size_t>(kind)] : std::string_view("invalid");
}

size_t encodedSize(CodecKind kind, size_t n) {
  ARCH_CHECK_MSG(validKind(kind), "encodedSize: invalid CodecKind");
  return kCodecHeaderBytes + (isScaled(kind) ? 4 * numBlocks(n) : 0) + payloadBytes(kind, n);
}

void encode(CodecKind kind, std::span<const float> in, std::span<uint8_t> out) {
  ARCH_CHECK_MSG(out.size() == encodedSize(kind, in.size()),
                 "encode: out.size() must be encodedSize(kind, in.size())");
  uint8_t* o = out.data();
  writeHeader(kind, in.size(), o);
  uint8_t* scales = o + kCodecHeaderBytes;
  uint8_t* payload = scales + (isScaled(kind) ? 4 * numBlocks(in.size()) : 0);
  switch (kind) {
    case CodecKind::kNone:
      if (!in.empty()) std::memcpy(payload, in.data(), 4 * in.size());
      return;
    case CodecKind::kBF16: encodeHalfLike<bf16Of>(in, payload); return;
    case CodecKind::kFP16: encodeHalfLike<fp16Of>(in, payload); return;
    case CodecKind::kInt8: encodeInt8(in, scales, payload); return;
    case CodecKind::kInt4: encodeInt4(in, scales, payload); return;
    case CodecKind::kFP8E4M3: encodeFp8<CodecKind::kFP8E4M3>(in, scales, payload); return;
    case CodecKind::kFP8E5M2: encodeFp8<CodecKind::kFP8E5M2>(in, scales, payload); return;
  }
}

core::Status decode(CodecKind kind, std::span<const uint8_t> in, std::span<float> out) {
  ARCH_RETURN_IF_ERROR(validate(kind, in, out.size()));
  decodeRange(kind, in.data(), out.size(), 0, out);
  return core::okStatus();
}

core::Status decodeAdd(CodecKind kind, std::span<const uint8_t> in, std::span<float> acc) {
  ARCH_RETURN_IF_ERROR(validate(kind, in, acc.size()));
  // Decode 16 blocks at a time into a stack buffer (stays in L1), then add.
  constexpr size_t kChunk = 16 * kB;
  alignas(64) float tmp[kChunk];
  for (size_t off = 0; off < acc.size(); off += kChunk) {
    const size_t len = std::min(kChunk, acc.size() - off);
    decodeRange(kind, in.data(), acc.size(), off, std::span<float>(tmp, len));
    float* __restrict a = acc.data() + off;
    for (size_t i = 0; i < len; ++i) a[i] += tmp[i];
  }
  return core::okStatus();
}

void roundTrip(CodecKind kind, std::span<float> inout) {
  if (kind == CodecKind::kNone) return;
  std::vector<uint8_t>& wire = roundTripScratch();
  wire.resize(encodedSize(kind, inout.size()));
  encode(kind, inout, wire);
  decodeRange(kind, wire.data(), inout.size(), 0, inout);
}

// ---- ErrorFeedback ----------------------------------------------------------

void ErrorFeedback::ensureSize(size_t n) {
  if (residual_.empty() && n != 0) residual_.assign(n, 0.0f);
  ARCH_CHECK_MSG(residual_.size() == n || n == 0,
                 "ErrorFeedback: buffer size changed (" + std::to_string(residual_.size()) + " -> " +
                     std::to_string(n) + "); call reset() first");
}

void ErrorFeedback::compensate(std::span<float> inout) {
  ensureSize(inout.size());
  const float* __restrict r = residual_.data();
  float* __restrict x = inout.data();
  for (size_t i = 0; i < inout.size(); ++i) x[i] += r[i];
}

void ErrorFeedback::update(std::span<const float> compensated, std::span<const float> decoded) {
  ARCH_CHECK_MSG(compensated.size() == decoded.size(), "ErrorFeedback::update: spans differ in size");
  ensureSize(compensated.size());
  float* __restrict r = residual_.data();
  const float* __restrict c = compensated.data();
  const float* __restrict d = decoded.data();
  for (size_t i = 0; i < compensated.size(); ++i) {
    const float e = c[i] - d[i];
    r[i] = std::fabs(e) < std::numeric_limits<float>::infinity() ? e : 0.0f;  // NaN/Inf -> 0
  }
}

void ErrorFeedback::encode(std::span<const float> in, std::span<uint8_t> out) {
  if (kind_ == CodecKind::kNone) {  // lossless: the residual stays zero
    comm::encode(kind_, in, out);
    return;
  }
  ensureSize(in.size());
  compensated_.assign(in.begin(), in.end());
  compensate(compensated_);
  comm::encode(kind_, compensated_, out);
  decoded_.resize(in.size());
  decodeRange(kind_, out.data(), in.size(), 0, decoded_);
  update(compensated_, decoded_);
}

void ErrorFeedback::roundTrip(std::span<float> inout) {
  if (kind_ == CodecKind::kNone) return;
  ensureSize(inout.size());
  compensate(inout);
  compensated_.assign(inout.begin(), inout.end());
  wire_.resize(encodedSize(kind_, inout.size()));
  comm::encode(kind_, compensated_, wire_);
  decodeRange(kind_, wire_.data(), inout.size(), 0, inout);
  update(compensated_, inout);
}

}  // namespace archipelago::comm
