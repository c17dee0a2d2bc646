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

}  // namespace
}  // namespace archipelago::core
