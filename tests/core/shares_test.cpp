// The split of a global batch over ranks of different speed and the
// rebalancer's margin (core/shares.h), shared by the runtime and the planner.
#include <cmath>
#include <numeric>

#include <gtest/gtest.h>

#include "archipelago/core/shares.h"

namespace archipelago::core {
namespace {

TEST(Shares, LargestRemainderSplit) {
  auto eq = [](const std::vector<double>& w, int64_t b) { return *sharesFromWeights(w, b); };
  EXPECT_EQ(eq({1, 1, 1}, 7), (std::vector<int64_t>{3, 2, 2}));           // remainders tie -> lower rank
  EXPECT_EQ(eq({3, 1}, 8), (std::vector<int64_t>{6, 2}));
  EXPECT_EQ(eq({1, 2, 3}, 10), (std::vector<int64_t>{2, 3, 5}));          // quotas 1.67 3.33 5.0
  EXPECT_EQ(eq({1000, 1}, 4), (std::vector<int64_t>{3, 1}));              // floor of one sample
  EXPECT_EQ(eq({1000, 1, 1}, 3), (std::vector<int64_t>{1, 1, 1}));
  EXPECT_EQ(eq({0.5, 0.25, 0.25}, 16), (std::vector<int64_t>{8, 4, 4}));
  for (int64_t b = 5; b < 40; ++b) {
    auto s2 = eq({2.7, 1.1, 0.3, 5.0, 0.9}, b);
    EXPECT_EQ(std::accumulate(s2.begin(), s2.end(), int64_t{0}), b);
    for (auto x : s2) EXPECT_GE(x, 1);
  }
  EXPECT_FALSE(sharesFromWeights({1, 1, 1}, 2).isOk());
  EXPECT_FALSE(sharesFromWeights({1, -1}, 4).isOk());
  EXPECT_FALSE(sharesFromWeights({}, 4).isOk());
  EXPECT_FALSE(sharesFromWeights({1, std::nan("")}, 4).isOk());
}

TEST(Shares, RebalanceOnlyForAClearGain) {
  // Rank 0 takes 20 ms per sample, rank 1 40 ms: 16/8 is 0.32 s per step.
  const std::vector<double> sps{0.020, 0.040};
  EXPECT_DOUBLE_EQ(shareStepTime({16, 8}, sps), 0.32);
  EXPECT_DOUBLE_EQ(shareStepTime({12, 12}, sps), 0.48);
  // From an even split the speed-aware one is 33% faster: move.
  EXPECT_TRUE(worthRebalancing({12, 12}, {16, 8}, sps, 0.05));
  // A noisy measurement proposing 15/9 (0.36 s) over 16/8 (0.32 s): stay;
  // and 17/7 (0.34 s) is slower too.
  EXPECT_FALSE(worthRebalancing({16, 8}, {15, 9}, sps, 0.05));
  EXPECT_FALSE(worthRebalancing({16, 8}, {17, 7}, sps, 0.05));
  // A gain below the margin: stay; above it: move.
  const std::vector<double> near{0.020, 0.0385};  // 16/8: 0.32 s; 15/9: 0.3465 s (8% slower)
  EXPECT_FALSE(worthRebalancing({15, 9}, {16, 8}, near, 0.15));
  EXPECT_TRUE(worthRebalancing({15, 9}, {16, 8}, near, 0.05));
  EXPECT_FALSE(worthRebalancing({16, 8}, {16, 8}, sps, 0.0));
  // A membership change (other sum or size, a rank without a share) always moves.
  EXPECT_TRUE(worthRebalancing({24, 0}, {16, 8}, sps, 0.05));
  EXPECT_TRUE(worthRebalancing({24}, {16, 8}, sps, 0.05));
  // A rank without a measurement yet (the rebalancer skips each worker's
  // first step): nothing to predict with, keep the split.
  EXPECT_FALSE(worthRebalancing({15, 9}, {16, 8}, {0.020, 0.0}, 0.05));
  EXPECT_TRUE(worthRebalancing({24, 0}, {16, 8}, {0.020, 0.0}, 0.05));
  // The default margin is the trainer's and the planner's.
  EXPECT_TRUE(worthRebalancing({15, 9}, {16, 8}, near));
  EXPECT_FALSE(worthRebalancing({16, 8}, {15, 9}, sps));
}

TEST(Shares, RebalancerDecision) {
  // Measured 20 ms / 40 ms per sample from an even split: move to 16/8.
  EXPECT_EQ(*rebalancedShares({12, 12}, {0.020, 0.040}, 24), (std::vector<int64_t>{16, 8}));
  // 15/9 -> 16/8 at 20 / 38.5 ms is 8% faster (margin 5%): move. At 20 / 36
  // ms the proposal from 16/8 is 15/9, which is slower: stay.
  EXPECT_EQ(*rebalancedShares({15, 9}, {0.020, 0.0385}, 24), (std::vector<int64_t>{16, 8}));
  EXPECT_EQ(*rebalancedShares({16, 8}, {0.020, 0.036}, 24), (std::vector<int64_t>{16, 8}));
  // A rank not measured yet: the split stays; after a membership change
  // (a rank without a share) the unmeasured rank counts as weight 1.
  EXPECT_EQ(*rebalancedShares({15, 9}, {0.020, 0.0}, 24), (std::vector<int64_t>{15, 9}));
  EXPECT_EQ(*rebalancedShares({24, 0}, {0.5, 0.0}, 24), (std::vector<int64_t>{16, 8}));
  EXPECT_FALSE(rebalancedShares({12, 12}, {0.02, 0.04}, 1).isOk());

}

TEST(Shares, RebalanceInterval) {
  EXPECT_EQ(rebalanceInterval(true, 3, false, 10), kRebalanceInterval);  // sync: every 5th step
  EXPECT_EQ(rebalanceInterval(true, 3, true, 10), 10);                   // DiLoCo: every outer step
  EXPECT_EQ(rebalanceInterval(false, 3, false, 10), 0);                  // off
  EXPECT_EQ(rebalanceInterval(true, 1, true, 10), 0);                    // one worker: nothing to split
}

TEST(Shares, SpeedEstimateEmaOrPeriodMean) {
  // Synchronous: EMA of seconds per sample, 0.3 on the newest step.
  SpeedEstimate ema;
  EXPECT_EQ(ema.value(), 0.0);
  ema.observe(5.0, 10);  // 0.5 s per sample
  EXPECT_EQ(ema.value(), 0.5);
  ema.observe(10.0, 5);  // 2.0
  EXPECT_DOUBLE_EQ(ema.value(), 0.7 * 0.5 + 0.3 * 2.0);
  ema.endPeriod();  // the EMA carries on
  EXPECT_DOUBLE_EQ(ema.value(), 0.7 * 0.5 + 0.3 * 2.0);
  ema.observe(1.0, 0);  // no samples: not a speed
  EXPECT_DOUBLE_EQ(ema.value(), 0.7 * 0.5 + 0.3 * 2.0);

  // Outer-step strategies: the whole period, seconds over samples. A slow
  // island's steps of 0.2, 0.3, 0.25 s then two 0.1 s steps (run while the
  // others wait at the outer step), 5 samples each: 0.95 s / 25 samples =
  // 38 ms per sample; the EMA would say 33.3 ms (weighted to the fast end).
  SpeedEstimate period(true);
  SpeedEstimate recent;
  for (double t : {0.2, 0.3, 0.25, 0.1, 0.1}) {
    period.observe(t, 5);
    recent.observe(t, 5);
  }
  EXPECT_DOUBLE_EQ(period.value(), 0.95 / 25);
  EXPECT_NEAR(recent.value(), 0.033328, 1e-6);
  period.endPeriod();  // a new period starts unmeasured (the split is kept)
  EXPECT_EQ(period.value(), 0.0);
  period.observe(0.4, 4);
  EXPECT_DOUBLE_EQ(period.value(), 0.1);
}

}  // namespace
}  // namespace archipelago::core
