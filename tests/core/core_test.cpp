#include <gtest/gtest.h>
#include <poll.h>

#include <string>
#include <thread>

#include "archipelago/core/clock.h"
#include "archipelago/core/hash.h"
#include "archipelago/core/status.h"
#include "archipelago/core/units.h"

namespace archipelago::core {
namespace {

Result<int> half(int x) {
  if (x % 2) return invalidArgument("odd");
  return x / 2;
}
Result<int> quarter(int x) {
  ARCH_ASSIGN_OR_RETURN(int h, half(x));
  return half(h);
}

TEST(Status, ContextAndMacros) {
  Status s = unavailable("peer closed").withContext("allreduce rank 2");
  EXPECT_EQ(s.toString(), "UNAVAILABLE: allreduce rank 2: peer closed");
  EXPECT_EQ(*quarter(8), 2);
  auto r = quarter(6);
  ASSERT_FALSE(r.isOk());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

// Known-answer vectors (FIPS 180-2 / RFC 3720 / FNV reference).
TEST(Hash, Sha256KnownAnswers) {
  EXPECT_EQ(sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Hash, Crc32cKnownAnswers) {
  const char* s = "123456789";
  EXPECT_EQ(crc32c(s, 9), 0xE3069283u);
  std::string zeros(32, '\0');
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  // Incremental equals one-shot.
  uint32_t part = crc32c(s, 4);
  EXPECT_EQ(crc32c(s + 4, 5, part), 0xE3069283u);
}

TEST(Hash, Fnv1a) { EXPECT_EQ(fnv1a64("a"), 0xaf63dc4c8601ec8cULL); }

TEST(Units, ParseAndFormat) {
  EXPECT_DOUBLE_EQ(*parseBandwidth("100Mbit/s"), 12.5e6);
  EXPECT_DOUBLE_EQ(*parseBandwidth("1 Gbit/s"), 125e6);
  EXPECT_DOUBLE_EQ(*parseBandwidth("25GB/s"), 25e9);
  EXPECT_FALSE(parseBandwidth("fast").isOk());
  EXPECT_FALSE(parseBandwidth("10 furlongs").isOk());
  EXPECT_DOUBLE_EQ(*parseDuration("20ms"), 0.02);
  EXPECT_DOUBLE_EQ(*parseDuration("1.5s"), 1.5);
  EXPECT_DOUBLE_EQ(*parseDuration("250us"), 250e-6);
  EXPECT_EQ(*parseByteSize("4KiB"), 4096u);
  EXPECT_EQ(*parseByteSize("64MB"), 64000000u);
  EXPECT_EQ(formatBandwidth(125e6), "1Gbit/s");
  EXPECT_EQ(formatDuration(0.02), "20ms");
  EXPECT_DOUBLE_EQ(*parseBandwidth(formatBandwidth(12.5e6)), 12.5e6);
}

TEST(Clock, Deadline) {
  EXPECT_FALSE(Deadline::never().expired());
  EXPECT_TRUE(Deadline::after(Duration::zero()).expired());
  AbortFlag a;
  AbortFlag b = a;
  b.abort();
  EXPECT_TRUE(a.aborted());
}

// poll() on the flag's eventfd: true when it is readable (within `ms`).
bool wakes(const AbortFlag& f, int ms) {
  pollfd p{f.wakeFd(), POLLIN, 0};
  return ::poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

TEST(Clock, AbortFlagWakesAPollerAtOnceAndResetRearmsIt) {
  AbortFlag a;
  ASSERT_GE(a.wakeFd(), 0);
  EXPECT_EQ(a.wakeFd(), AbortFlag(a).wakeFd());  // copies share one descriptor
  EXPECT_FALSE(wakes(a, 0));
  // A poller asleep without a timeout is woken by abort() from another thread.
  std::thread t([b = a]() mutable { b.abort(); });
  EXPECT_TRUE(wakes(a, -1));
  t.join();
  EXPECT_TRUE(wakes(a, 0));  // and stays readable: every later waiter sees it
  a.reset();
  EXPECT_FALSE(a.aborted());
  EXPECT_FALSE(wakes(a, 0));
  // A flag set before anyone asked for its descriptor: readable from the start.
  AbortFlag early;
  early.abort();
  EXPECT_TRUE(wakes(early, 0));
}

}  // namespace
}  // namespace archipelago::core
