// core/workers.h and core::initialShareWeight: the rank list and the
// initial split rule shared by the trainers and the planner's replay.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/shares.h"
#include "archipelago/core/workers.h"

namespace archipelago::core {
namespace {

ClusterSpec twoIslands() {
  ClusterSpec c;
  IslandSpec a;
  a.name = "fast";
  a.device = "h100";
  a.count = 2;
  IslandSpec b;
  b.name = "slow";
  b.count = 3;
  b.slowdown = 2.0;
  b.slowdowns = {4.0};  // first device overridden, the rest use slowdown
  c.islands = {a, b};
  return c;
}

TEST(Workers, RanksInIslandOrder) {
  const auto w = workersOf(twoIslands());
  ASSERT_EQ(w.size(), 5u);
  for (size_t r = 0; r < w.size(); ++r) EXPECT_EQ(w[r].rank, static_cast<int>(r));
  EXPECT_EQ(w[1].island, "fast");
  EXPECT_EQ(w[1].device, "h100");
  EXPECT_EQ(w[1].local_index, 1);
  EXPECT_EQ(w[2].island, "slow");
  EXPECT_EQ(w[2].island_index, 1);
  EXPECT_EQ(w[2].local_index, 0);
  EXPECT_EQ(w[2].device, "cpu");
  EXPECT_DOUBLE_EQ(w[2].slowdown, 4.0);
  EXPECT_DOUBLE_EQ(w[4].slowdown, 2.0);
  EXPECT_TRUE(workersOf(ClusterSpec{}).empty());
}

TEST(Workers, InitialShareWeight) {
  const auto w = workersOf(twoIslands());
  TrainConfig tc;
  // No fixed shares: 1 / slowdown, so the emulated 4x slower rank gets a quarter.
  EXPECT_DOUBLE_EQ(initialShareWeight(tc, w[0]), 1.0);
  EXPECT_DOUBLE_EQ(initialShareWeight(tc, w[2]), 0.25);
  EXPECT_DOUBLE_EQ(initialShareWeight(tc, w[3]), 0.5);
  std::vector<double> weights;
  for (const auto& x : w) weights.push_back(initialShareWeight(tc, x));
  EXPECT_EQ(*sharesFromWeights(weights, 13), (std::vector<int64_t>{4, 4, 1, 2, 2}));
  // Fixed shares win over slowdowns.
  tc.shares = {1, 1, 3, 1, 1};
  EXPECT_DOUBLE_EQ(initialShareWeight(tc, w[2]), 3.0);
  EXPECT_DOUBLE_EQ(initialShareWeight(tc, w[4]), 1.0);
}

// What is known of a real worker before it runs: its threads, capped by its
// cpu_quota (shares of one core). The two-worker demo of docs/runtime.md
// "Real heterogeneity": a worker under cpu_quota 0.5 next to a free one
// starts at 16/8 of 24 samples instead of 12/12.
TEST(Workers, InitialShareWeightFromThreadsAndCpuQuota) {
  JobConfig job;
  job.train.threads_per_worker = 1;
  IslandSpec free_island, capped, wide;
  free_island.name = "free";
  capped.name = "capped";
  capped.cpu_quota = 0.5;
  wide.name = "wide";
  wide.threads = 2;
  wide.cpu_quota = 1.5;  // two threads, but only one and a half cores' time
  job.cluster.islands = {free_island, capped, wide};
  const auto w = workersOf(job);
  EXPECT_DOUBLE_EQ(initialShareWeight(job.train, w[0]), 1.0);
  EXPECT_DOUBLE_EQ(initialShareWeight(job.train, w[1]), 0.5);
  EXPECT_DOUBLE_EQ(initialShareWeight(job.train, w[2]), 1.5);
  EXPECT_EQ(*sharesFromWeights({initialShareWeight(job.train, w[0]), initialShareWeight(job.train, w[1])}, 24),
            (std::vector<int64_t>{16, 8}));
  // A quota above the threads does not make a worker faster than its threads.
  job.cluster.islands[2].cpu_quota = 4;
  EXPECT_DOUBLE_EQ(initialShareWeight(job.train, workersOf(job)[2]), 2.0);
  // The EMULATED slowdown still divides, and fixed shares still win.
  job.cluster.islands[1].slowdown = 2;
  EXPECT_DOUBLE_EQ(initialShareWeight(job.train, workersOf(job)[1]), 0.25);
  job.train.shares = {1, 1, 1};
  EXPECT_DOUBLE_EQ(initialShareWeight(job.train, workersOf(job)[1]), 1.0);
}

}  // namespace
}  // namespace archipelago::core
