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

// ---- SSE2 helpers (x86-64 baseline, so every x86-64 host runs them) --------
// Each kernel below has a scalar twin that handles tails and non-x86 hosts;
// the two compute the same function bit for bit (tests run lengths that use
// both, and the build with __SSE2__ undefined gives the same digest).
#if defined(__SSE2__)
namespace sse {
inline __m128i set1(uint32_t v) { return _mm_set1_epi32(static_cast<int>(v)); }
// m ? a : b, lane-wise (m all-ones or all-zeros per lane)
inline __m128i sel(__m128i m, __m128i a, __m128i b) {
  return _mm_or_si128(_mm_and_si128(m, a), _mm_andnot_si128(m, b));
}
// min for lanes in [0, 2^31) (signed compare is exact there)
inline __m128i min31(__m128i a, __m128i b) { return sel(_mm_cmpgt_epi32(a, b), b, a); }
// Packs eight 16-bit codes held in the low halves of two int32 vectors.
inline __m128i pack16(__m128i a, __m128i b) {
  a = _mm_srai_epi32(_mm_slli_epi32(a, 16), 16);  // sign-extend so packs does not saturate
  b = _mm_srai_epi32(_mm_slli_epi32(b, 16), 16);
  return _mm_packs_epi32(a, b);
}
}  // namespace sse
#endif

// Largest |x| over the finite elements (0 if none). Integer max on the
// magnitude bits: for non-negative floats integer order is float order, and
// an integer reduction vectorises without fast-math and is order-independent.
float finiteAbsMax(const float* x, size_t n) {
  uint32_t m = 0;
  size_t i = 0;
#if defined(__SSE2__)
  const __m128i mag = sse::set1(0x7FFFFFFFu), inf = sse::set1(0x7F800000u);
  __m128i vm0 = _mm_setzero_si128(), vm1 = _mm_setzero_si128();
  for (; i + 8 <= n; i += 8) {
    __m128i a0 = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(x + i)), mag);
    __m128i a1 = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(x + i + 4)), mag);
    a0 = _mm_and_si128(a0, _mm_cmpgt_epi32(inf, a0));  // Inf/NaN -> 0
    a1 = _mm_and_si128(a1, _mm_cmpgt_epi32(inf, a1));
    vm0 = sse::sel(_mm_cmpgt_epi32(a0, vm0), a0, vm0);
    vm1 = sse::sel(_mm_cmpgt_epi32(a1, vm1), a1, vm1);
  }
  vm0 = sse::sel(_mm_cmpgt_epi32(vm1, vm0), vm1, vm0);
  alignas(16) uint32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), vm0);
  for (uint32_t v : lanes) m = m > v ? m : v;
#endif
  for (; i < n; ++i) {
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

// Packs len int8 codes (finite in [-7, 7], -128 = non-finite) two per byte:
// element 2j in the low nibble, 2j+1 in the high one; -128 -> nibble 8.
// q must have room for one more element (zeroed here for an odd tail).
void packInt4(int8_t* q, size_t len, uint8_t* dst) {
  q[len] = 0;
  const size_t bytes = (len + 1) / 2;
  size_t j = 0;
#if defined(__SSE2__)
  const __m128i marker = _mm_set1_epi8(-128), low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  const __m128i lo_mask = _mm_set1_epi16(0x000F), hi_mask = _mm_set1_epi16(0x00F0);
  for (; 2 * j + 32 <= len; j += 16) {
    __m128i v[2];
    for (int h = 0; h < 2; ++h) {
      const __m128i qv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 2 * j + 16 * h));
      const __m128i nib = sse::sel(_mm_cmpeq_epi8(qv, marker), eight, _mm_and_si128(qv, low4));
      // 16-bit lane = nib[2i] | nib[2i+1] << 8  ->  nib[2i] | nib[2i+1] << 4
      v[h] = _mm_or_si128(_mm_and_si128(nib, lo_mask), _mm_and_si128(_mm_srli_epi16(nib, 4), hi_mask));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm_packus_epi16(v[0], v[1]));
  }
#endif
  for (; j < bytes; ++j) {
    const int lo = q[2 * j] == -128 ? 8 : (q[2 * j] & 0xF);
    const int hi = q[2 * j + 1] == -128 ? 8 : (q[2 * j + 1] & 0xF);
    dst[j] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

// Inverse of packInt4 for len elements: nibbles sign-extended, 8 -> -128.
void unpackInt4(const uint8_t* src, size_t len, int8_t* q) {
  const size_t bytes = (len + 1) / 2;
  size_t j = 0;
#if defined(__SSE2__)
  const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  const __m128i minus8 = _mm_set1_epi8(-8), marker = _mm_set1_epi8(-128);
  for (; 2 * j + 32 <= len; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    const __m128i lo = _mm_and_si128(b, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    for (int h = 0; h < 2; ++h) {
      const __m128i n = h == 0 ? _mm_unpacklo_epi8(lo, hi) : _mm_unpackhi_epi8(lo, hi);
      const __m128i sv = _mm_sub_epi8(_mm_xor_si128(n, eight), eight);  // 0..15 -> -8..7
      const __m128i out = sse::sel(_mm_cmpeq_epi8(sv, minus8), marker, sv);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 2 * j + 16 * h), out);
    }
  }
#endif
  for (; j < bytes; ++j) {
    const int lo = static_cast<int8_t>(static_cast<uint8_t>(src[j] << 4)) >> 4;
    const int hi = static_cast<int8_t>(src[j]) >> 4;
    q[2 * j] = static_cast<int8_t>(lo == -8 ? -128 : lo);
    q[2 * j + 1] = static_cast<int8_t>(hi == -8 ? -128 : hi);
  }
}

void encodeInt4(std::span<const float> in, uint8_t* scales, uint8_t* payload) {
  const size_t n = in.size();
  alignas(16) int8_t q[kB + 16];
  for (size_t b = 0, off = 0; off < n; ++b, off += kB) {
    const size_t len = std::min(kB, n - off);
    const float s = symmetricScale(finiteAbsMax(in.data() + off, len), 7.0f);
    storeF32(scales + 4 * b, s);
    // Finite codes land in [-7, 7]: |x| <= absmax and 1/s = 7/absmax up to
    // a few ulps, so |x/s| < 7.5.
    quantizeI8(in.data() + off, len, 1.0f / s, q);
    packInt4(q, len, payload + blockPayloadOffset(CodecKind::kInt4, b));
  }
}

void decodeInt4Block(const uint8_t* src, size_t len, float scale, float* out) {
  alignas(16) int8_t q[kB + 16];
  unpackInt4(src, len, q);
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
struct Fp8Traits;
template <>
struct Fp8Traits<CodecKind::kFP8E4M3> {
  static constexpr int kMan = 3, kBias = 7;
  static constexpr uint32_t kMinNormal = 0x3C800000u;  // 2^-6
  static constexpr uint32_t kSubAdd = 0x46800000u;     // 2^14: ulp 2^-9
  static constexpr uint32_t kMaxCode = 0x7E, kInfCode = 0x7F, kNanCode = 0x7F;
};
template <>
struct Fp8Traits<CodecKind::kFP8E5M2> {
  static constexpr int kMan = 2, kBias = 15;
  static constexpr uint32_t kMinNormal = 0x38800000u;  // 2^-14
  static constexpr uint32_t kSubAdd = 0x43000000u;     // 2^7: ulp 2^-16
  static constexpr uint32_t kMaxCode = 0x7B, kInfCode = 0x7C, kNanCode = 0x7E;
};

template <CodecKind kKind>
inline uint8_t toFp8(float y, uint32_t max_code) {
  using T = Fp8Traits<kKind>;
  return detail::floatToFp8<T::kMan, T::kBias, T::kMinNormal, T::kSubAdd, T::kMaxCode, T::kInfCode,
                            T::kNanCode>(y, max_code);
}

#if defined(__SSE2__)
// SSE2 twin of detail::floatToFp8 on four lanes; returns codes in int32 lanes.
template <CodecKind kKind>
inline __m128i toFp8x4(__m128 y, __m128i max_code) {
  using T = Fp8Traits<kKind>;
  constexpr int kShift = 23 - T::kMan;
  const __m128i f = _mm_castps_si128(y);
  const __m128i a = _mm_and_si128(f, sse::set1(0x7FFFFFFFu));
  const __m128i sign = _mm_and_si128(_mm_srli_epi32(f, 24), sse::set1(0x80u));
  const __m128i an = sse::min31(a, sse::set1(0x7F000000u));
  __m128i cn = _mm_sub_epi32(an, sse::set1(static_cast<uint32_t>(127 - T::kBias) << 23));
  cn = _mm_add_epi32(cn, sse::set1((1u << (kShift - 1)) - 1u));
  cn = _mm_add_epi32(cn, _mm_and_si128(_mm_srli_epi32(an, kShift), sse::set1(1u)));
  cn = _mm_srli_epi32(cn, kShift);
  const __m128i is_sub = _mm_cmpgt_epi32(sse::set1(T::kMinNormal), a);
  const __m128 s = _mm_add_ps(_mm_castsi128_ps(_mm_and_si128(a, is_sub)),
                              _mm_castsi128_ps(sse::set1(T::kSubAdd)));
  const __m128i cs = _mm_sub_epi32(_mm_castps_si128(s), sse::set1(T::kSubAdd));
  __m128i c = sse::min31(sse::sel(is_sub, cs, cn), max_code);
  const __m128i special = _mm_cmpgt_epi32(a, sse::set1(0x7F7FFFFFu));
  const __m128i is_inf = _mm_cmpeq_epi32(a, sse::set1(0x7F800000u));
  c = sse::sel(special, sse::sel(is_inf, sse::set1(T::kInfCode), sse::set1(T::kNanCode)), c);
  return _mm_or_si128(c, sign);
}
#endif

// dst[i] = fp8(x[i] * inv), saturating at max_code.
template <CodecKind kKind>
void fp8EncodeRun(const float* x, size_t len, float inv, uint32_t max_code, uint8_t* dst) {
  size_t i = 0;
#if defined(__SSE2__)
  const __m128 vinv = _mm_set1_ps(inv);
  const __m128i vmax = sse::set1(max_code);
  for (; i + 16 <= len; i += 16) {
    __m128i c[4];
    for (int k = 0; k < 4; ++k) c[k] = toFp8x4<kKind>(_mm_mul_ps(_mm_loadu_ps(x + i + 4 * k), vinv), vmax);
    const __m128i packed = _mm_packus_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
#endif
  for (; i < len; ++i) dst[i] = toFp8<kKind>(x[i] * inv, max_code);
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
    fp8EncodeRun<kKind>(x, len, inv, max_code, payload + off);
  }
}

void decodeFp8Block(const std::array<float, 256>& table, const uint8_t* src, size_t len, float scale,
                    float* out) {
  for (size_t i = 0; i < len; ++i) out[i] = table[src[i]] * scale;
}

// ---- bf16 / fp16 / none -----------------------------------------------------

#if defined(__SSE2__)
// SSE2 twins of floatToBf16Sat / floatToFp16Sat / fp16BitsToFloat (numeric.h).
inline __m128i bf16x4(__m128 x) {
  const __m128i f = _mm_castps_si128(x);
  const __m128i a = _mm_and_si128(f, sse::set1(0x7FFFFFFFu));
  const __m128i sign = _mm_and_si128(_mm_srli_epi32(f, 16), sse::set1(0x8000u));
  __m128i r = _mm_add_epi32(_mm_add_epi32(a, sse::set1(0x7FFFu)),
                            _mm_and_si128(_mm_srli_epi32(a, 16), sse::set1(1u)));
  r = sse::min31(_mm_srli_epi32(r, 16), sse::set1(0x7F7Fu));
  const __m128i special = _mm_cmpgt_epi32(a, sse::set1(0x7F7FFFFFu));
  const __m128i is_inf = _mm_cmpeq_epi32(a, sse::set1(0x7F800000u));
  r = sse::sel(special, sse::sel(is_inf, sse::set1(0x7F80u), sse::set1(0x7FC0u)), r);
  return _mm_or_si128(r, sign);
}

inline __m128i fp16x4(__m128 x) {
  const __m128i f = _mm_castps_si128(x);
  const __m128i a = _mm_and_si128(f, sse::set1(0x7FFFFFFFu));
  const __m128i sign = _mm_and_si128(_mm_srli_epi32(f, 16), sse::set1(0x8000u));
  const __m128i an = sse::min31(a, sse::set1(0x477FE000u));
  __m128i hn = _mm_add_epi32(_mm_sub_epi32(an, sse::set1(0x38000000u)), sse::set1(0xFFFu));
  hn = _mm_srli_epi32(_mm_add_epi32(hn, _mm_and_si128(_mm_srli_epi32(an, 13), sse::set1(1u))), 13);
  const __m128i is_sub = _mm_cmpgt_epi32(sse::set1(0x38800000u), a);
  const __m128 s = _mm_add_ps(_mm_castsi128_ps(_mm_and_si128(a, is_sub)), _mm_set1_ps(0.5f));
  const __m128i hs = _mm_sub_epi32(_mm_castps_si128(s), sse::set1(0x3F000000u));
  __m128i h = sse::sel(is_sub, hs, hn);
  const __m128i special = _mm_cmpgt_epi32(a, sse::set1(0x7F7FFFFFu));
  const __m128i is_inf = _mm_cmpeq_epi32(a, sse::set1(0x7F800000u));
  h = sse::sel(special, sse::sel(is_inf, sse::set1(0x7C00u), sse::set1(0x7E00u)), h);
  return _mm_or_si128(h, sign);
}

// h: fp16 codes zero-extended into int32 lanes.
inline __m128 fp16ToFloatx4(__m128i h) {
  const __m128i sign = _mm_slli_epi32(_mm_and_si128(h, sse::set1(0x8000u)), 16);
  const __m128i e = _mm_and_si128(_mm_srli_epi32(h, 10), sse::set1(0x1Fu));
  const __m128i m = _mm_and_si128(h, sse::set1(0x3FFu));
  const __m128i normal = _mm_add_epi32(_mm_slli_epi32(_mm_and_si128(h, sse::set1(0x7FFFu)), 13),
                                       sse::set1(112u << 23));
  const __m128i special = _mm_or_si128(sse::set1(0x7F800000u), _mm_slli_epi32(m, 13));
  const __m128i sub =
      _mm_castps_si128(_mm_mul_ps(_mm_cvtepi32_ps(m), _mm_set1_ps(5.9604644775390625e-08f)));
  const __m128i mag = sse::sel(_mm_cmpeq_epi32(e, _mm_setzero_si128()), sub,
                               sse::sel(_mm_cmpeq_epi32(e, sse::set1(31u)), special, normal));
  return _mm_castsi128_ps(_mm_or_si128(sign, mag));
}
#endif

template <uint16_t (*kConvert)(float), bool kIsFp16>
void encodeHalfLike(std::span<const float> in, uint8_t* payload) {
  const size_t n = in.size();
  const float* x = in.data();
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 8 <= n; i += 8) {
    const __m128 a = _mm_loadu_ps(x + i), b = _mm_loadu_ps(x + i + 4);
    const __m128i packed = kIsFp16 ? sse::pack16(fp16x4(a), fp16x4(b)) : sse::pack16(bf16x4(a), bf16x4(b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(payload + 2 * i), packed);
  }
#endif
  for (; i < n; ++i) {
    const uint16_t h = kConvert(x[i]);
    std::memcpy(payload + 2 * i, &h, 2);
  }
}

template <float (*kConvert)(uint16_t), bool kIsFp16>
void decodeHalfLike(const uint8_t* payload, std::span<float> out) {
  const size_t n = out.size();
  float* y = out.data();
  size_t i = 0;
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + 2 * i));
    if constexpr (kIsFp16) {
      _mm_storeu_ps(y + i, fp16ToFloatx4(_mm_unpacklo_epi16(v, zero)));
      _mm_storeu_ps(y + i + 4, fp16ToFloatx4(_mm_unpackhi_epi16(v, zero)));
    } else {  // bf16: the code is the top half of the float
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm_unpacklo_epi16(zero, v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i + 4), _mm_unpackhi_epi16(zero, v));
    }
  }
#endif
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, payload + 2 * i, 2);
    y[i] = kConvert(h);
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
    case CodecKind::kBF16: decodeHalfLike<bf16From, false>(payload + 2 * begin, out); return;
    case CodecKind::kFP16: decodeHalfLike<fp16From, true>(payload + 2 * begin, out); return;
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
    case CodecKind::kBF16: encodeHalfLike<bf16Of, false>(in, payload); return;
    case CodecKind::kFP16: encodeHalfLike<fp16Of, true>(in, payload); return;
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
    ensureSize(in.size());
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
  ensureSize(inout.size());
  if (kind_ == CodecKind::kNone) return;
  compensate(inout);
  compensated_.assign(inout.begin(), inout.end());
  wire_.resize(encodedSize(kind_, inout.size()));
  comm::encode(kind_, compensated_, wire_);
  decodeRange(kind_, wire_.data(), inout.size(), 0, inout);
  update(compensated_, inout);
}

}  // namespace archipelago::comm
