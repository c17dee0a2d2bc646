// Local step-time prediction (plan::predictStepTime): the replay of one step
// on a host whose cores the workers share, against timelines worked out by
// hand; measured model parts interpolate linearly and survive the profile's
// JSON round trip.
#include <gtest/gtest.h>

#include "archipelago/plan/calibration.h"
#include "archipelago/plan/local_predict.h"
#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {
namespace {

constexpr int64_t kSeq = 128;

// The demo job's shape: 3 CPU workers, "fast" x2 and "slow" x1 with an
// EMULATED slowdown of 2, global batch 24, shares fixed (no rebalancer).
core::JobConfig demoJob(bool rebalance) {
  core::JobConfig j;
  core::IslandSpec fast;
  fast.name = "fast";
  fast.count = 2;
  core::IslandSpec slow;
  slow.name = "slow";
  slow.count = 1;
  slow.slowdown = 2.0;
  j.cluster.islands = {fast, slow};
  core::StraitSpec s;
  s.a = "fast";
  s.b = "slow";
  s.bandwidth = 1e15;  // communication negligible: the test is about compute
  s.latency = 0;
  j.cluster.straits = {s};
  j.model.dim = 128;
  j.model.n_layers = 4;
  j.model.n_heads = 4;
  j.model.vocab_size = 256;
  j.data.seq_len = kSeq;
  j.train.global_batch = 24;
  j.train.steps = 50;
  j.train.rebalance = rebalance;
  j.strategy.kind = "sync";
  return j;
}

// A profile where one sample costs exactly `a` seconds (layers + ends,
// forward + backward), the host has `cores` cores, comm and optimizer ~0.
CalibrationProfile profileFor(const core::JobConfig& j, double a, double cores) {
  CalibrationProfile p;
  auto spec = fromModelConfig(j.model);
  EXPECT_TRUE(spec.isOk());
  const double tokens = static_cast<double>(kSeq);
  // 4 layers x (0.1a + 0.1a) + ends (0.1a + 0.1a) = a per sample.
  p.addItemTiming("cpu", localPartKey("layer", *spec, kSeq, "fp32"), tokens, 0.1 * a, 0.1 * a);
  p.addItemTiming("cpu", localPartKey("ends", *spec, kSeq, "fp32"), tokens, 0.1 * a, 0.1 * a);
  auto& dc = p.device("cpu");
  dc.host_cores = cores;
  dc.loopback_bandwidth = 1e15;
  dc.optimizer_s_per_param = 1e-15;
  return p;
}

DeviceCatalog catalog() {
  auto c = DeviceCatalog::builtin();
  EXPECT_TRUE(c.isOk());
  return *c;
}

TEST(LocalPredict, ThreeWorkersOnTwoCoresByHand) {
  // Shares 10/9/5 (weights 1/1/0.5, largest remainder). On 2 cores the
  // three workers run at 2/3 speed until the slow one has done its 5a
  // (wall 7.5a); the fast ones then have 5a and 4a left at full speed
  // (ends 12.5a and 11.5a); the slow one sleeps its emulated slowdown,
  // (2-1) x 7.5a, until 15a. The step's compute ends at 15a.
  const double a = 0.01;
  const auto job = demoJob(false);
  const auto prof = profileFor(job, a, 2);
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  EXPECT_TRUE(p->measured_parts);
  EXPECT_TRUE(p->oversubscribed);
  EXPECT_EQ(p->shares, (std::vector<int64_t>{10, 9, 5}));
  EXPECT_NEAR(p->compute_s, 15 * a, 1e-9);
  EXPECT_NEAR(p->total_s, 15 * a + 4 * 50e-6, 1e-6);  // + the control allreduce: 4 loopback messages
  EXPECT_NE(p->detail.find("oversubscribed"), std::string::npos);

  // With 4 cores nobody shares: fast ends at 10a, slow computes 5a then
  // sleeps 5a: 10a.
  const auto roomy = profileFor(job, a, 4);
  auto q = predictStepTime(job, 256, catalog(), &roomy);
  ASSERT_TRUE(q.isOk());
  EXPECT_FALSE(q->oversubscribed);
  EXPECT_NEAR(q->compute_s, 10 * a, 1e-9);
}

TEST(LocalPredict, RebalancerMovesSharesTowardEqualTimes) {
  // On 2 cores the slow worker's sleep is stretched by the sharing, so
  // the rebalancer gives it fewer samples than 1/slowdown; the settled
  // step is shorter than with the fixed 10/9/5 split (15a).
  const double a = 0.01;
  const auto job = demoJob(true);
  const auto prof = profileFor(job, a, 2);
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk());
  EXPECT_LT(p->shares[2], 5);
  EXPECT_LT(p->compute_s, 15 * a);
  // Lower bound: 2 cores must do 24a of real work with the slow worker's
  // share at most 5 samples: at least (24 - 5) a / 2 = 9.5a.
  EXPECT_GT(p->compute_s, 9.5 * a);
}

TEST(LocalPredict, MeasuredPartsInterpolateAndRoundTrip) {
  CalibrationProfile p;
  p.addItemTiming("cpu", "layer x", 1000, 0.011, 0.021);  // 1 ms fixed + 10 us/token fwd
  p.addItemTiming("cpu", "layer x", 3000, 0.031, 0.061);
  auto mid = p.itemTiming("cpu", "layer x", 2000);
  ASSERT_TRUE(mid.has_value());
  EXPECT_NEAR(mid->fwd_s, 0.021, 1e-12);
  EXPECT_NEAR(mid->bwd_s, 0.041, 1e-12);
  auto beyond = p.itemTiming("cpu", "layer x", 5000);  // extrapolates the last segment
  EXPECT_NEAR(beyond->fwd_s, 0.051, 1e-12);
  EXPECT_FALSE(p.itemTiming("cpu", "layer y", 1000).has_value());
  EXPECT_FALSE(p.itemTiming("h100", "layer x", 1000).has_value());
  p.device("cpu").optimizer_s_per_param = 2e-9;
  p.device("cpu").host_cores = 2;
  auto back = CalibrationProfile::fromJson(p.toJson());
  ASSERT_TRUE(back.isOk()) << back.status().toString();
  EXPECT_NEAR(back->itemTiming("cpu", "layer x", 2000)->fwd_s, 0.021, 1e-12);
  EXPECT_EQ(back->find("cpu")->optimizer_s_per_param, 2e-9);
  EXPECT_EQ(back->find("cpu")->host_cores, 2);
}

}  // namespace
}  // namespace archipelago::plan
