// Shared helpers of the comm multi-process tests: deterministic inputs that
// every rank can regenerate (so each rank checks its result against an fp64
// reference of all ranks' data), and a wrapper around the fork fixture.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "archipelago/core/hash.h"
#include "comm/launch_local.h"

namespace archipelago::comm::testing {

// One second on the membership table's clock (microseconds).
inline constexpr int64_t kSec = 1000000;

// Unit tests do not time the product: a wall-clock bound here only tells a
// working mechanism from a broken one (a wait that never ends, a shaper that
// does not shape), so upper bounds are several times the expected value and
// the precise figures live in `archipelago bench comm` (docs/comm.md,
// section 7). Lower bounds are what a mechanism guarantees (a shaped link is
// never faster than its rate) and are never stretched. Sanitizer builds
// check every memory access (ThreadSanitizer: 5-15x slower), so their upper
// bounds stretch a further 8x.
#ifdef ARCHIPELAGO_SANITIZED
inline constexpr double kTimeSlack = 8.0 * 4.0;
#else
inline constexpr double kTimeSlack = 4.0;
#endif

// Waits until another rank stores `value` into `slot` of the shared block
// (an event between forked ranks); false after `seconds`.
inline bool awaitSlot(const std::atomic<int64_t>& slot, int64_t value, double seconds = 30) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (slot.load() != value) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

inline double inputValue(int rank, size_t i, uint64_t seed = 1) {
  uint64_t h = core::mix64(seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(rank) * 1000003ULL + i);
  return static_cast<double>(h >> 40) / static_cast<double>(1ULL << 24) * 2.0 - 1.0;
}

// Runs fn on `world` forked ranks and expects every rank to report "".
inline void runAll(int world, const LocalRankFn& fn, double timeout_s = 60, std::set<int> expendable = {},
                   std::vector<RankOutcome>* outcomes = nullptr, SharedBlock** shared = nullptr) {
  LocalLaunchOptions o;
  o.world = world;
  o.timeout_s = timeout_s;
  o.expendable = std::move(expendable);
  auto r = launchLocal(o, fn, shared);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  for (int i = 0; i < world; ++i) {
    const auto& oc = (*r)[static_cast<size_t>(i)];
    if (o.expendable.count(i)) continue;
    EXPECT_TRUE(oc.reported) << "rank " << i << " did not report (signal " << oc.signal << ")";
    EXPECT_EQ(oc.message, "") << "rank " << i << " of " << world;
  }
  if (outcomes) *outcomes = *r;
}

// A cluster of two islands named `a` and `b` joined by one strait (returned
// for the caller to shape; bandwidth 0 = unshaped).
inline core::StraitSpec& twoIslandCluster(core::ClusterSpec& cl, const std::string& a, const std::string& b) {
  core::IslandSpec ia, ib;
  ia.name = a;
  ib.name = b;
  cl.islands = {ia, ib};
  core::StraitSpec s;
  s.a = a;
  s.b = b;
  s.bandwidth = 0;
  cl.straits = {s};
  return cl.straits.front();
}

inline CommConfig testConfig() {
  CommConfig c;
  c.options.streams = 2;
  c.options.chunk_bytes = 64 << 10;         // several pipeline pieces even for small buffers
  c.options.ring_max_pieces = 64;           // up to the tag's limit (the default, 4, in CollectivesOverTcp)
  c.options.small_message_bytes = 4 << 10;  // exercise both algorithms
  c.options.stripe_min_bytes = 32 << 10;
  return c;
}

#define RANK_CHECK(cond, msg)                                  \
  do {                                                          \
    if (!(cond)) {                                              \
      std::ostringstream os_;                                   \
      os_ << __LINE__ << ": " << msg;                           \
      return os_.str();                                         \
    }                                                           \
  } while (0)

#define RANK_OK(expr)                                                     \
  do {                                                                    \
    ::archipelago::core::Status st_ = (expr);                             \
    if (!st_.isOk()) return std::to_string(__LINE__) + ": " + st_.toString(); \
  } while (0)

}  // namespace archipelago::comm::testing
