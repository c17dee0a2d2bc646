// Unit tests of the wire format, handshake verification and dtype helpers
// (no sockets).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "archipelago/comm/dtype.h"
#include "archipelago/comm/link_emulator.h"
#include "archipelago/comm/wire.h"
#include "archipelago/core/hash.h"

namespace archipelago::comm {
namespace {

TEST(Wire, HeaderRoundTrip) {
  FrameHeader h;
  h.type = FrameType::kData;
  h.epoch = 7;
  h.length = 100;
  h.tag = 0x123456789abcdefULL;
  h.offset = 400;
  h.total = 1000;
  h.crc = 0xdeadbeef;
  h.deliver_at_lo = 42;
  uint8_t buf[kFrameHeaderSize];
  encodeHeader(h, buf);
  EXPECT_EQ(std::memcmp(buf, "ARCH", 4), 0);  // magic is readable in a hex dump
  auto r = decodeHeader(buf);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  EXPECT_EQ(r->epoch, 7u);
  EXPECT_EQ(r->tag, h.tag);
  EXPECT_EQ(r->offset, 400u);
  EXPECT_EQ(r->total, 1000u);
  EXPECT_EQ(r->crc, 0xdeadbeefu);
  EXPECT_EQ(r->deliver_at_lo, 42u);
}

TEST(Wire, RejectsGarbageOversizeAndOutOfRange) {
  FrameHeader h;
  h.type = FrameType::kData;
  h.length = 10;
  h.total = 10;
  uint8_t buf[kFrameHeaderSize];
  encodeHeader(h, buf);
  buf[0] ^= 1;
  EXPECT_EQ(decodeHeader(buf).status().code(), core::StatusCode::kDataLoss);
  buf[0] ^= 1;
  EXPECT_EQ(decodeHeader(std::span<const uint8_t>(buf, 10)).status().code(), core::StatusCode::kDataLoss);
  h.length = kMaxFramePayload + 1;
  h.total = h.length;
  encodeHeader(h, buf);
  EXPECT_EQ(decodeHeader(buf).status().code(), core::StatusCode::kResourceExhausted);
  h.length = 100;
  h.offset = 950;
  h.total = 1000;  // [950, 1050) lies outside the message
  encodeHeader(h, buf);
  EXPECT_EQ(decodeHeader(buf).status().code(), core::StatusCode::kDataLoss);
  h.offset = UINT64_MAX - 10;  // overflow must not wrap around the check
  h.total = UINT64_MAX;
  h.length = 100;
  encodeHeader(h, buf);
  EXPECT_EQ(decodeHeader(buf).status().code(), core::StatusCode::kDataLoss);
  buf[6] = 99;  // unknown type
  EXPECT_EQ(decodeHeader(buf).status().code(), core::StatusCode::kDataLoss);
}

TEST(Wire, PayloadCrcMismatchIsDataLoss) {
  std::vector<uint8_t> p(1000, 7);
  FrameHeader h;
  h.length = 1000;
  h.total = 1000;
  h.crc = core::crc32c(p.data(), p.size());
  EXPECT_TRUE(checkPayload(h, p).isOk());
  p[500] ^= 0x10;
  EXPECT_EQ(checkPayload(h, p).code(), core::StatusCode::kDataLoss);
}

// The frame checksum's fast paths (carry-less multiplication folding with
// AVX-512, or three crc32 lanes combined with a shift table) must equal the textbook bit-at-a-time CRC32C (Castagnoli,
// reflected 0x82F63B78) for every length around its block boundaries, any
// alignment and any chaining seed.
uint32_t crc32cBitwise(const uint8_t* p, size_t n, uint32_t seed) {
  uint32_t c = ~seed;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

TEST(Wire, Crc32cMatchesBitwiseReferenceAcrossBlockBoundaries) {
  std::vector<uint8_t> buf(3 * 3 * 4096 + 64);
  uint64_t x = 0x9e3779b97f4a7c15ULL;
  for (auto& b : buf) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    b = static_cast<uint8_t>(x);
  }
  const size_t block = 3 * 4096;
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{100}, size_t{255}, size_t{256}, size_t{319}, size_t{320},
                   size_t{511}, size_t{513}, block - 1, block, block + 1, block + 9,
                   2 * block - 8, 2 * block, 2 * block + 13, 3 * block}) {
    for (size_t off : {size_t{0}, size_t{3}}) {
      for (uint32_t seed : {0u, 0x12345678u}) {
        ASSERT_LE(off + n, buf.size());
        EXPECT_EQ(core::crc32c(buf.data() + off, n, seed), crc32cBitwise(buf.data() + off, n, seed))
            << "n=" << n << " off=" << off << " seed=" << seed;
      }
    }
  }
}

TEST(Handshake, RightSecretPassesWrongSecretAndStaleEpochAreRefused) {
  Hello hello;
  hello.client_rank = 1;
  hello.server_rank = 0;
  hello.epoch = 3;
  randomBytes(hello.nonce);
  auto enc = decodeHello(encodeHello(hello));
  ASSERT_TRUE(enc.isOk());
  EXPECT_EQ(enc->client_rank, 1);
  EXPECT_EQ(enc->epoch, 3u);
  Challenge ch;
  randomBytes(ch.nonce);
  ch.mac = handshakeMac("job-secret", 'S', hello, ch.nonce);
  Mac good = handshakeMac("job-secret", 'C', hello, ch.nonce);
  Mac bad = handshakeMac("wrong-secret", 'C', hello, ch.nonce);
  EXPECT_TRUE(verifyClient("job-secret", hello, ch, good, 3, 0).isOk());
  EXPECT_EQ(verifyClient("job-secret", hello, ch, bad, 3, 0).code(), core::StatusCode::kPermissionDenied);
  // The server's own proof differs from the client's (no reflection).
  EXPECT_EQ(verifyClient("job-secret", hello, ch, ch.mac, 3, 0).code(), core::StatusCode::kPermissionDenied);
  EXPECT_EQ(verifyClient("job-secret", hello, ch, good, 4, 0).code(), core::StatusCode::kFailedPrecondition);
  EXPECT_EQ(verifyClient("job-secret", hello, ch, good, 3, 5).code(), core::StatusCode::kInvalidArgument);
  EXPECT_EQ(decodeHello(std::vector<uint8_t>(5)).status().code(), core::StatusCode::kDataLoss);
}

TEST(DType, SixteenBitConversionsMatchKnownValues) {
  EXPECT_EQ(floatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(floatToBf16(-2.0f), 0xc000);
  EXPECT_EQ(bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(floatToBf16(1.00390625f), 0x3f80);  // tie (1 + 2^-8) rounds to even
  EXPECT_EQ(floatToFp16(1.0f), 0x3c00);
  EXPECT_EQ(floatToFp16(65504.0f), 0x7bff);
  EXPECT_EQ(floatToFp16(1e6f), 0x7c00);  // overflow -> inf
  EXPECT_EQ(fp16ToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(floatToFp16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(fp16ToFloat(0xc000), -2.0f);
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite positive fp16 survives a round trip
    ASSERT_EQ(floatToFp16(fp16ToFloat(static_cast<uint16_t>(h))), h);
  }
}

TEST(DType, ReduceAccumulatesSixteenBitInFp32) {
  std::vector<uint16_t> a = {floatToBf16(1.5f), floatToBf16(-3.0f)};
  std::vector<uint16_t> b = {floatToBf16(2.25f), floatToBf16(1.0f)};
  reduceInto(DType::kBF16, ReduceOp::kSum, a.data(), b.data(), 2);
  EXPECT_EQ(bf16ToFloat(a[0]), 3.75f);
  EXPECT_EQ(bf16ToFloat(a[1]), -2.0f);
  std::vector<int32_t> x = {1, 9}, y = {5, 2};
  reduceInto(DType::kI32, ReduceOp::kMax, x.data(), y.data(), 2);
  EXPECT_EQ(x, (std::vector<int32_t>{5, 9}));
}

TEST(LinkShaper, DeliveryTimeCoversLatencyAndStaysOrdered) {
  LinkParams p;
  p.latency = 0.05;
  LinkShaper s(p, "", 1);
  int64_t before = core::nowMicros();
  int64_t t1 = s.send(100, 0, nullptr);
  EXPECT_GE(t1 - before, 50000);
  p.jitter = 0.04;
  LinkShaper j(p, "", 2);
  int64_t last = 0;
  for (int i = 0; i < 100; ++i) {
    int64_t t = j.send(10, last, nullptr);
    EXPECT_GE(t, last);  // jitter never reorders one stream (TCP cannot)
    last = t;
  }
}

}  // namespace
}  // namespace archipelago::comm
