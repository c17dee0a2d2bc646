// Local step-time prediction (plan::predictStepTime): the replay of steps
// on a host whose cores the workers share (placed per core or processor
// sharing, with per-step commits and measured co-run factors; DiLoCo's
// islands on their own clocks), against timelines worked out by hand;
// measured model parts interpolate linearly and survive the profile's JSON
// round trip.
#include <algorithm>
#include <cmath>

#include <gtest/gtest.h>

#include "archipelago/plan/calibration.h"
#include "archipelago/plan/local_predict.h"
#include "archipelago/plan/model_spec.h"
#include "plan_test_util.h"

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

// A profile where one sample costs exactly `a` seconds (the whole model,
// forward 0.4a + backward 0.6a), the host has `cores` cores, comm and
// optimizer ~0.
CalibrationProfile profileFor(const core::JobConfig& j, double a, double cores) {
  CalibrationProfile p;
  auto spec = fromModelConfig(j.model);
  EXPECT_TRUE(spec.isOk());
  const double tokens = static_cast<double>(kSeq);
  p.addItemTiming("cpu", localPartKey("model", *spec, kSeq, "fp32"), tokens, 0.4 * a, 0.6 * a);
  auto& dc = p.device("cpu");
  dc.host_cores = cores;
  dc.loopback_bandwidth = 1e15;
  dc.optimizer_s_per_param = 1e-15;
  return p;
}

using testing::catalog;

// One step's compute phase by processor sharing (every running worker the
// same share of the cores, HostModel::per_core false): replaySegment with
// one step and nothing after it.
std::vector<WorkerTimes> sharedPhase(const std::vector<double>& pre, const std::vector<double>& work,
                                     const std::vector<double>& slowdown, double cores,
                                     const std::vector<DeviceCalibration::Corun>& corun) {
  HostModel host;
  host.cores = cores;
  host.corun = corun;
  auto t = replaySegment(pre, work, slowdown, std::vector<int>(work.size(), 0), 1, host,
                         [](int64_t, const std::vector<size_t>& members, const std::vector<WorkerTimes>& w) {
                           double last = 0;
                           for (size_t j : members) last = std::max(last, w[j].done);
                           return last;
                         });
  return t.at(0);
}

TEST(LocalPredict, ThreeWorkersOnTwoCoresByHand) {
  // Shares 10/9/5 (weights 1/1/0.5, largest remainder). On 2 cores the
  // kernel puts ranks 0 and 1 on a core each and rank 2 next to rank 0
  // (HostModel::per_core): ranks 0 and 2 run at half speed, rank 1 at full
  // speed until its 9a end at 9a; rank 2 (the latest arrival) then moves
  // to the idle core: its last 0.5a end at 9.5a and it sleeps its emulated
  // slowdown, (2-1) x 9.5a, until 19a; rank 0's last 5.5a end at 14.5a.
  // The step's compute ends at 19a (processor sharing, all three at 2/3,
  // would say 15a: ReplayComputePhase below).
  const double a = 0.01;
  const auto job = demoJob(false);
  const auto prof = profileFor(job, a, 2);
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  EXPECT_TRUE(p->measured_parts);
  EXPECT_TRUE(p->oversubscribed);
  EXPECT_EQ(p->shares, (std::vector<int64_t>{10, 9, 5}));
  EXPECT_NEAR(p->compute_s, 19 * a, 1e-9);
  EXPECT_NEAR(p->total_s, 19 * a + 4 * 50e-6, 1e-6);  // + the control allreduce: 4 loopback messages
  EXPECT_NE(p->detail.find("oversubscribed"), std::string::npos);

  // Processor sharing (sharedPhase): all three at 2/3 of a core
  // until the slow one has done its 5a (wall 7.5a); the fast ones then
  // have 5a and 4a left at full speed (ends 12.5a and 11.5a); the slow
  // one sleeps until 15a.
  auto ps = sharedPhase({0, 0, 0}, {10 * a, 9 * a, 5 * a}, {1, 1, 2}, 2, {});
  EXPECT_NEAR(ps[0].end, 12.5 * a, 1e-9);
  EXPECT_NEAR(ps[1].end, 11.5 * a, 1e-9);
  EXPECT_NEAR(ps[2].end, 7.5 * a, 1e-9);
  EXPECT_NEAR(ps[2].done, 15 * a, 1e-9);

  // With 4 cores nobody shares: fast ends at 10a, slow computes 5a then
  // sleeps 5a: 10a.
  const auto roomy = profileFor(job, a, 4);
  auto q = predictStepTime(job, 256, catalog(), &roomy);
  ASSERT_TRUE(q.isOk());
  EXPECT_FALSE(q->oversubscribed);
  EXPECT_NEAR(q->compute_s, 10 * a, 1e-9);

  // The same with the gradients' traffic costing CPU: a ring of 3 moves
  // 2 x 2/3 of the gradient bytes through each worker; at a calibrated
  // CPU per byte that makes 1a per worker per step, added to its compute.
  // Fast ends at 11a, rank 1 at 10a, the slow one computes 6a and sleeps
  // 6a: 12a.
  auto costly = roomy;
  auto spec = fromModelConfig(job.model);
  ASSERT_TRUE(spec.isOk());
  costly.device("cpu").loopback_cpu_per_byte = a / (2.0 * 2.0 / 3.0 * spec->totalParams() * 4);
  auto c = predictStepTime(job, 256, catalog(), &costly);
  ASSERT_TRUE(c.isOk());
  EXPECT_NEAR(c->compute_s, 12 * a, 1e-9);
  EXPECT_NE(c->detail.find("10.0 ms of CPU moving its gradients"), std::string::npos) << c->detail;
}

TEST(LocalPredict, RebalancerMovesSharesTowardEqualTimes) {
  // On 2 cores the slow worker's sleep is stretched by the sharing, so
  // the rebalancer gives it fewer samples than 1/slowdown; the settled
  // step is shorter than with the fixed 10/9/5 split (19a).
  const double a = 0.01;
  const auto job = demoJob(true);
  const auto prof = profileFor(job, a, 2);
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk());
  EXPECT_LT(p->shares[2], 5);
  EXPECT_LT(p->compute_s, 19 * a);
  // Lower bound: 2 cores must do 24a of real work with the slow worker's
  // share at most 5 samples: at least (24 - 5) a / 2 = 9.5a.
  EXPECT_GT(p->compute_s, 9.5 * a);
}

TEST(LocalPredict, CommitAndCorunFactorsByHand) {
  // The same 10/9/5 split on 2 cores, now with a per-step commit of 2a in
  // every worker before its compute and measured co-run factors 1.1 (2
  // workers at once) and 1.2 (3 at once). Timeline:
  //  * 3 workers running: each gets 2/3 of a core at 1/1.2 efficiency,
  //    rate 5/9. Commits end at 2a / (5/9) = 3.6a (compute starts). The
  //    slow worker's 2a + 5a are done at 7a / (5/9) = 12.6a; its compute
  //    wall is 9a, so it sleeps until 21.6a.
  //  * 2 running: a core each at 1/1.1: rank 1's 4a left end at
  //    12.6a + 4.4a = 17a, rank 0 has done 4a of its 5a.
  //  * rank 0 alone at rate 1: ends at 18a.
  // Rank 0 times its step from the end of its commit: 21.6a - 3.6a = 18a.
  const double a = 0.01;
  const std::vector<DeviceCalibration::Corun> corun = {{2, 1.1, 1.5}, {3, 1.2, 2.0}};
  auto t = sharedPhase({2 * a, 2 * a, 2 * a}, {10 * a, 9 * a, 5 * a}, {1, 1, 2}, 2, corun);
  ASSERT_EQ(t.size(), 3u);
  EXPECT_NEAR(t[0].start, 3.6 * a, 1e-9);
  EXPECT_NEAR(t[2].end, 12.6 * a, 1e-9);
  EXPECT_NEAR(t[2].done, 21.6 * a, 1e-9);
  EXPECT_NEAR(t[1].end, 17 * a, 1e-9);
  EXPECT_NEAR(t[0].end, 18 * a, 1e-9);
  EXPECT_NEAR(t[0].done, 18 * a, 1e-9);

  // Through predictStepTime the workers are placed on cores
  // (HostModel::per_core): ranks 0 and 2 share core 0, rank 1 has core 1.
  //  * 3 running (factor 1.2): ranks 0 and 2 at 0.5/1.2 = 5/12, rank 1 at
  //    5/6. Rank 1's commit ends at 2.4a, ranks 0 and 2's at 4.8a (rank 1
  //    has done 2a of its 9a by then).
  //  * rank 1's last 7a end at 4.8a + 8.4a = 13.2a; ranks 0 and 2 have
  //    done 3.5a each. Rank 2 moves to core 1.
  //  * 2 running (1.1): rank 2's last 1.5a end at 14.85a (compute wall
  //    10.05a: it sleeps until 24.9a); rank 0 has 5a left, alone at rate 1:
  //    ends at 19.85a.
  // Rank 0 times its step from the end of its commit: 24.9a - 4.8a = 20.1a.
  // The optimizer (0.5a alone) runs in all three workers at once on 2
  // cores at co-run factor 2.0: 0.5a x 3/2 x 2 = 1.5a; the control
  // allreduce is 4 loopback messages.
  const auto job = demoJob(false);
  auto prof = profileFor(job, a, 2);
  auto& dc = prof.device("cpu");
  dc.step_overhead_s = 2 * a;
  dc.corun = corun;
  auto spec = fromModelConfig(job.model);
  ASSERT_TRUE(spec.isOk());
  dc.optimizer_s_per_param = 0.5 * a / spec->totalParams();
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  EXPECT_NEAR(p->compute_s, 20.1 * a, 1e-9);
  EXPECT_NEAR(p->optimizer_s, 1.5 * a, 1e-9);
  EXPECT_NEAR(p->total_s, 20.1 * a + 1.5 * a + 4 * 50e-6, 1e-6);
  EXPECT_NEAR(p->corun_compute, 1.2, 1e-12);
  EXPECT_NE(p->detail.find("co-run x1.20 compute"), std::string::npos) << p->detail;

  // Between measured points the factor is linear: 1.1 at 2, 1.2 at 3; one
  // worker alone runs at 1.0 (a 4-worker job uses the last point's 1.2).
  auto one = sharedPhase({0}, {10 * a}, {1}, 2, corun);
  EXPECT_NEAR(one[0].end, 10 * a, 1e-9);
  auto four = sharedPhase({0, 0, 0, 0}, {a, a, a, a}, {1, 1, 1, 1}, 8, corun);
  EXPECT_NEAR(four[0].end, 1.2 * a, 1e-9);
}

TEST(LocalPredict, SynchronousGroupWaitsForItsSlowestMember) {
  // E[max of n standard normals]: 1/sqrt(pi) for two, growing slowly with n.
  EXPECT_EQ(expectedMaxOfNormals(1), 0.0);
  EXPECT_NEAR(expectedMaxOfNormals(2), 1.0 / std::sqrt(M_PI), 1e-4);
  EXPECT_NEAR(expectedMaxOfNormals(3), 1.5 / std::sqrt(M_PI), 1e-4);  // 3 / (2 sqrt(pi))
  for (int64_t n = 2; n < 64; ++n) EXPECT_LT(expectedMaxOfNormals(n), expectedMaxOfNormals(n + 1));
  EXPECT_LT(expectedMaxOfNormals(10000), 4.0);

  // CommitAndCorunFactorsByHand's step, now with a measured compute spread
  // of 10% while 3 workers co-run: the 3 ranks meet every step, so the step
  // grows by E[max of 3] x 0.1 x the longest compute wall (the slow rank's
  // 20.1a incl. its sleep), all of it in the exposed communication.
  const double a = 0.01;
  const auto job = demoJob(false);
  auto prof = profileFor(job, a, 2);
  auto& dc = prof.device("cpu");
  dc.step_overhead_s = 2 * a;
  dc.corun = {{2, 1.1, 1.5, 0.1}, {3, 1.2, 2.0, 0.1}};
  auto spec = fromModelConfig(job.model);
  ASSERT_TRUE(spec.isOk());
  dc.optimizer_s_per_param = 0.5 * a / spec->totalParams();
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  const double straggle = expectedMaxOfNormals(3) * 0.1 * 20.1 * a;
  EXPECT_NEAR(p->compute_s, 20.1 * a, 1e-9);
  EXPECT_NEAR(p->total_s, 20.1 * a + 1.5 * a + 4 * 50e-6 + straggle, 1e-6);
  EXPECT_NEAR(p->compute_cv, 0.1, 1e-12);

  // One worker waits for nobody.
  auto solo = job;
  solo.cluster.islands = {job.cluster.islands[0]};
  solo.cluster.islands[0].count = 1;
  solo.cluster.straits.clear();
  solo.train.global_batch = 8;
  auto one = predictStepTime(solo, 256, catalog(), &prof);
  ASSERT_TRUE(one.isOk()) << one.status().toString();
  EXPECT_NEAR(one->comm_s, 0.0, 1e-9);
}

TEST(LocalPredict, IslandsRunOnTheirOwnClocks) {
  // Two workers on one core, each an island of its own (DiLoCo's inner
  // steps), 2a of work per step, worker 1 with an EMULATED slowdown of 2;
  // they meet after the second step. Both run at half speed and end their
  // first compute at 4a; worker 0 meets only itself and starts its second
  // step at once, alone on the core (worker 1 sleeps until 8a): 4a-6a, then
  // waits. Worker 1's second step runs alone, 8a-10a, sleeps until 12a:
  // both leave at 12a.
  const double a = 0.01;
  HostModel host;
  host.cores = 1;
  host.per_core = true;
  auto lastDone = [](int64_t, const std::vector<size_t>& members, const std::vector<WorkerTimes>& t) {
    double last = 0;
    for (size_t j : members) last = std::max(last, t[j].done);
    return last;
  };
  auto t = replaySegment({0, 0}, {2 * a, 2 * a}, {1, 2}, {0, 1}, 2, host, lastDone);
  ASSERT_EQ(t.size(), 2u);
  EXPECT_NEAR(t[0][0].end, 4 * a, 1e-9);
  EXPECT_NEAR(t[0][0].finish, 4 * a, 1e-9);
  EXPECT_NEAR(t[1][0].start, 4 * a, 1e-9);
  EXPECT_NEAR(t[1][0].end, 6 * a, 1e-9);
  EXPECT_NEAR(t[0][1].done, 8 * a, 1e-9);
  EXPECT_NEAR(t[1][1].start, 8 * a, 1e-9);
  EXPECT_NEAR(t[1][1].end, 10 * a, 1e-9);
  EXPECT_NEAR(t[1][1].done, 12 * a, 1e-9);
  EXPECT_NEAR(t[1][0].finish, 12 * a, 1e-9);
  EXPECT_NEAR(t[1][1].finish, 12 * a, 1e-9);
  // Meeting after every step (sync), worker 0 waits for worker 1's sleep
  // each time: the first step leaves at 8a, the second computes 8a-12a at
  // half speed, worker 1 sleeps until 16a.
  auto lock = replaySegment({0, 0}, {2 * a, 2 * a}, {1, 2}, {0, 0}, 2, host, lastDone);
  EXPECT_NEAR(lock[0][0].finish, 8 * a, 1e-9);
  EXPECT_NEAR(lock[1][0].end, 12 * a, 1e-9);
  EXPECT_NEAR(lock[1][1].finish, 16 * a, 1e-9);
}

TEST(LocalPredict, DilocoOuterWaitLandsOnATimedStep) {
  // DiLoCo, H = 5, 10 steps, shares fixed at 4/4/16 on 4 cores (nobody
  // shares a core, communication ~0): the fast island's steps take 4a, the
  // slow worker's 16a x slowdown 2 = 32a. Each outer step the fast island
  // waits for the slow one: a segment takes 160a on every rank. The
  // trainer does not time the first step, which for rank 0 is a 4a step
  // (not a 32a one: a lockstep replay would say 32a a step); the wait
  // lands on the timed fifth step: (160a - 4a + 160a) / 9 steps.
  const double a = 0.01;
  auto job = demoJob(false);
  job.strategy.kind = "diloco";
  job.strategy.inner_steps = 5;
  job.train.steps = 10;
  job.train.shares = {4, 4, 16};
  const auto prof = profileFor(job, a, 4);
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  EXPECT_EQ(p->shares, (std::vector<int64_t>{4, 4, 16}));
  EXPECT_NEAR(p->total_s, 316 * a / 9, 1e-3);
  EXPECT_NEAR(p->settled_s, 32 * a, 1e-3);
  EXPECT_NEAR(p->compute_s, 4 * a, 1e-9);  // rank 0's island computes 4a a step ...
  EXPECT_NEAR(p->comm_s, 28 * a, 1e-3);    // ... and waits at the outer step, 140a / 5 a step
}

TEST(LocalPredict, MeasuredCoreShareSetsTheBackground) {
  // Calibration got half a core on 2 cores: like B = 2/0.5 - 1 = 3 other
  // busy threads, each worker competing with them one to one. Shares
  // 10/9/5: with 3 workers running every thread gets 2/6 of a core; the
  // slow one's 5a end at 15a (sleep until 30a); with 2 running 2/5: rank
  // 1's 4a left end at 25a; rank 0 alone 2/4: its last 1a ends at 27a. The
  // step's compute ends at 30a.
  const double a = 0.01;
  const auto job = demoJob(false);
  auto prof = profileFor(job, a, 2);
  prof.device("cpu").alone_core_share = 0.5;
  auto p = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  EXPECT_NEAR(p->compute_s, 30 * a, 1e-9);
  EXPECT_NEAR(p->background_procs, 3, 1e-12);
  EXPECT_NE(p->detail.find("calibration got 0.50 of a core"), std::string::npos) << p->detail;
  // A full core at calibration: the runnable-process count, at most
  // cores - 1 of them (none counted here: the 19a of the quiet host,
  // workers placed on cores as in ThreeWorkersOnTwoCoresByHand).
  prof.device("cpu").alone_core_share = 1.0;
  auto q = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(q.isOk());
  EXPECT_NEAR(q->compute_s, 19 * a, 1e-9);
  // 5 counted, capped at 1 busy thread (with other load: processor
  // sharing): 3 workers + 1 on 2 cores, 1/2 a
  // core each until the slow one's 5a end at 10a (sleep until 20a); then
  // 2/3 each: rank 1's 4a left end at 16a; rank 0 then has a core for its
  // last 1a: 17a. The step's compute ends at 20a.
  prof.device("cpu").background_procs = 5;
  auto r = predictStepTime(job, 256, catalog(), &prof);
  ASSERT_TRUE(r.isOk());
  EXPECT_NEAR(r->background_procs, 1, 1e-12);
  EXPECT_NEAR(r->compute_s, 20 * a, 1e-9);
  prof.device("cpu").loopback_cpu_per_byte = 4.1e-10;
  auto back = CalibrationProfile::fromJson(prof.toJson());
  ASSERT_TRUE(back.isOk());
  EXPECT_EQ(back->find("cpu")->alone_core_share, 1.0);
  EXPECT_EQ(back->find("cpu")->loopback_cpu_per_byte, 4.1e-10);
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
  p.device("cpu").corun = {{3, 1.25, 1.75}, {2, 1.125, 1.5}};
  auto back = CalibrationProfile::fromJson(p.toJson());
  ASSERT_TRUE(back.isOk()) << back.status().toString();
  EXPECT_NEAR(back->itemTiming("cpu", "layer x", 2000)->fwd_s, 0.021, 1e-12);
  EXPECT_EQ(back->find("cpu")->optimizer_s_per_param, 2e-9);
  EXPECT_EQ(back->find("cpu")->host_cores, 2);
  ASSERT_EQ(back->find("cpu")->corun.size(), 2u);
  EXPECT_EQ(back->find("cpu")->corun[0].threads, 2);  // sorted by threads
  EXPECT_EQ(back->find("cpu")->corun[1].compute_factor, 1.25);
  EXPECT_EQ(back->find("cpu")->corun[1].optimizer_factor, 1.75);
}

}  // namespace
}  // namespace archipelago::plan
