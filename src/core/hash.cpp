#include "archipelago/core/hash.h"

#include <cstring>
#include <fstream>
#include <vector>

#include <openssl/evp.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <nmmintrin.h>
#endif

namespace archipelago::core {

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  ARCH_CHECK(ctx_ != nullptr);
  ARCH_CHECK(EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(ctx_), EVP_sha256(), nullptr) == 1);
}

Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }

void Sha256::update(const void* data, size_t n) {
  ARCH_CHECK(EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), data, n) == 1);
}

Sha256Digest Sha256::finish() {
  Sha256Digest d{};
  unsigned int len = 0;
  ARCH_CHECK(EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), d.data(), &len) == 1);
  ARCH_CHECK(len == d.size());
  return d;
}

Sha256Digest sha256(const void* data, size_t n) {
  Sha256 h;
  h.update(data, n);
  return h.finish();
}

std::string toHex(std::span<const uint8_t> bytes) {
  static const char* kDigits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 15]);
  }
  return out;
}

std::string sha256Hex(std::string_view data) {
  auto d = sha256(data.data(), data.size());
  return toHex(d);
}

Result<std::string> sha256File(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return notFound("cannot open '" + path.string() + "' for hashing");
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    auto got = in.gcount();
    if (got > 0) h.update(buf.data(), static_cast<size_t>(got));
  }
  if (in.bad()) return dataLoss("read error while hashing '" + path.string() + "'");
  auto d = h.finish();
  return toHex(d);
}

namespace {

uint32_t crc32cSoftware(const uint8_t* p, size_t n, uint32_t crc) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
// The crc32 instruction has a latency of ~3 cycles but a throughput of one
// per cycle, so large inputs are split into three lanes of kCrcLane bytes
// whose CRCs run interleaved and are then combined. The raw CRC register is
// linear over GF(2): crc(c, A|B) = shift_|B|(crc(c, A)) ^ crc(0, B), where
// shift_n(v) = crc(v, n zero bytes) is itself linear in v, so it is a
// 4 x 256 lookup table built once from the 32 basis vectors.
constexpr size_t kCrcLane = 4096;

struct CrcShiftTable {
  uint32_t t[4][256];
  uint32_t operator()(uint32_t v) const {
    return t[0][v & 0xff] ^ t[1][(v >> 8) & 0xff] ^ t[2][(v >> 16) & 0xff] ^ t[3][v >> 24];
  }
};

__attribute__((target("sse4.2"))) CrcShiftTable makeCrcShift(size_t zero_bytes) {
  uint32_t basis[32];
  for (int b = 0; b < 32; ++b) {
    uint64_t c = uint64_t{1} << b;
    for (size_t i = 0; i < zero_bytes / 8; ++i) c = _mm_crc32_u64(c, 0);
    basis[b] = static_cast<uint32_t>(c);
  }
  CrcShiftTable s{};
  for (int k = 0; k < 4; ++k) {
    for (uint32_t v = 0; v < 256; ++v) {
      uint32_t r = 0;
      for (int bit = 0; bit < 8; ++bit) {
        if ((v >> bit) & 1) r ^= basis[8 * k + bit];
      }
      s.t[k][v] = r;
    }
  }
  return s;
}

// Carry-less multiplication folding (CPUs with AVX-512 VPCLMULQDQ): four
// 512-bit accumulators each hold four 16-byte blocks; folding a block F bits
// forward is X.lo * k_lo ^ X.hi * k_hi with k_lo = x^(F+63) mod P and
// k_hi = x^(F-1) mod P (bit-reflected, as the data is). The folded 16 bytes
// have the CRC of everything before them, so the crc32 instruction finishes.
struct CrcFoldConst {
  uint64_t lo, hi;
};

uint64_t crcFoldWord(unsigned n) {  // x^n mod P(CRC32C), reflected into the high half
  uint64_t r = 1;
  for (unsigned i = 0; i < n; ++i) {
    r <<= 1;
    if (r & (uint64_t{1} << 32)) r ^= 0x11EDC6F41ULL;
  }
  uint64_t k = 0;
  for (int d = 0; d < 32; ++d) {
    if ((r >> d) & 1) k |= uint64_t{1} << (63 - d);
  }
  return k;
}

CrcFoldConst crcFoldBy(unsigned bits) { return {crcFoldWord(bits + 63), crcFoldWord(bits - 1)}; }

#define ARCH_CRC_FOLD_TARGET __attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2")))

ARCH_CRC_FOLD_TARGET inline __m512i crcFold512(__m512i x, __m512i k, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11), next,
                                   0x96);
}

ARCH_CRC_FOLD_TARGET inline __m128i crcFold128(__m128i x, CrcFoldConst k) {
  const __m128i kk = _mm_set_epi64x(static_cast<long long>(k.hi), static_cast<long long>(k.lo));
  return _mm_xor_si128(_mm_clmulepi64_si128(x, kk, 0x00), _mm_clmulepi64_si128(x, kk, 0x11));
}

ARCH_CRC_FOLD_TARGET inline __m512i crcFoldLanes(CrcFoldConst k) {
  const auto lo = static_cast<long long>(k.lo), hi = static_cast<long long>(k.hi);
  return _mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo);
}

// n >= 256. Returns the raw register after the whole 64-byte-multiple prefix
// and advances p/n past it.
ARCH_CRC_FOLD_TARGET uint32_t crc32cFold(const uint8_t*& p, size_t& n, uint32_t crc) {
  static const CrcFoldConst k2048 = crcFoldBy(2048), k512 = crcFoldBy(512), k384 = crcFoldBy(384),
                            k256 = crcFoldBy(256), k128 = crcFoldBy(128);
  const __m512i K2048 = crcFoldLanes(k2048), K512 = crcFoldLanes(k512);
  __m512i x0 = _mm512_loadu_si512(p), x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128),
          x3 = _mm512_loadu_si512(p + 192);
  // crc(c, M) == crc(0, M with c xored into its first four bytes).
  x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  p += 256;
  n -= 256;
  while (n >= 256) {
    x0 = crcFold512(x0, K2048, _mm512_loadu_si512(p));
    x1 = crcFold512(x1, K2048, _mm512_loadu_si512(p + 64));
    x2 = crcFold512(x2, K2048, _mm512_loadu_si512(p + 128));
    x3 = crcFold512(x3, K2048, _mm512_loadu_si512(p + 192));
    p += 256;
    n -= 256;
  }
  __m512i x = crcFold512(crcFold512(crcFold512(x0, K512, x1), K512, x2), K512, x3);
  while (n >= 64) {
    x = crcFold512(x, K512, _mm512_loadu_si512(p));
    p += 64;
    n -= 64;
  }
  alignas(64) __m128i b[4];
  _mm512_store_si512(b, x);
  const __m128i a = _mm_xor_si128(_mm_xor_si128(crcFold128(b[0], k384), crcFold128(b[1], k256)),
                                  _mm_xor_si128(crcFold128(b[2], k128), b[3]));
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(a)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(a, 1)));
  return static_cast<uint32_t>(c);
}

__attribute__((target("sse4.2"))) uint32_t crc32cHardware(const uint8_t* p, size_t n, uint32_t crc) {
  static const bool fold = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("pclmul");
  if (fold && n >= 256) crc = crc32cFold(p, n, crc);
  uint64_t c = crc;
  if (n >= 3 * kCrcLane) {
    static const CrcShiftTable shift = makeCrcShift(kCrcLane);
    while (n >= 3 * kCrcLane) {
      uint64_t c1 = 0, c2 = 0;
      for (size_t i = 0; i < kCrcLane; i += 8) {
        uint64_t v0, v1, v2;
        std::memcpy(&v0, p + i, 8);
        std::memcpy(&v1, p + kCrcLane + i, 8);
        std::memcpy(&v2, p + 2 * kCrcLane + i, 8);
        c = _mm_crc32_u64(c, v0);
        c1 = _mm_crc32_u64(c1, v1);
        c2 = _mm_crc32_u64(c2, v2);
      }
      c = shift(shift(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c1)) ^ static_cast<uint32_t>(c2);
      p += 3 * kCrcLane;
      n -= 3 * kCrcLane;
    }
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t crc = ~seed;
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  crc = hw ? crc32cHardware(p, n, crc) : crc32cSoftware(p, n, crc);
#else
  crc = crc32cSoftware(p, n, crc);
#endif
  return ~crc;
}

uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace archipelago::core
