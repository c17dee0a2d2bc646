// ZeRO-1/2 composed with tensor and pipeline parallelism, through the real
// binary against the single-process curve: the state is sharded over the
// ranks that hold the same tensors (a tensor-parallel slice's replicas, a
// stage's replicas), with uneven shares; a PP run saved half-way resumes
// unsharded in one process; with expert parallelism the dense tensors are
// sharded over the stage's replicas and the experts over the ranks holding
// the same experts, and with ZeRO-3 each MoE layer gathered from both
// groups. ZeRO-3 alone: zero3_test.cpp.
#include <filesystem>
#include <map>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testutil::expectCurve;
using testutil::jobYaml;
using testutil::kSteps;
using testutil::kTol;
using testutil::outputOf;
using testutil::rank0Log;
using testutil::reference;
using testutil::scratchRoot;

TEST(ZeroLayouts, TensorParallelReplicasReduceScatterTheirSlicesWithZeroTwo) {
  auto ref = reference("zl_tp_ref", kSteps, "");
  fs::path run = scratchRoot() / "zl_tp";
  const std::string y = jobYaml(run, "    - {name: a, count: 4}", kSteps, "", "{tensor_parallel: 2}",
                                ", shares: [3, 3, 1, 1], zero: 2");
  ASSERT_EQ(testutil::runTrain(y, "zl_tp"), 0) << outputOf("zl_tp");
  EXPECT_THAT(rank0Log(run), HasSubstr("optimizer shard (ZeRO-2)"));
  expectCurve(run, ref, 1, kSteps, kTol, "TP=2 x 2 replicas, ZeRO-2");
  testutil::expectPredictedStateMatches(run, 4, "TP=2 x 2 replicas, ZeRO-2");
}

TEST(ZeroLayouts, PipelineReplicasShardTheirStageAndResumeUnshardedInOneProcess) {
  const int steps = 12, k = 6;
  auto ref = reference("zl_pp_ref", steps, "");
  fs::path run = scratchRoot() / "zl_pp";
  std::string y = jobYaml(run, "    - {name: a, count: 4}", steps, "", "{pipeline_stages: 2, stage_layers: [3, 1]}",
                          ", shares: [3, 3, 1, 1], zero: 1");
  y.replace(y.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(y, "zl_pp", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(run / "checkpoints" / checkpointDirName(k))) << outputOf("zl_pp");
  EXPECT_THAT(rank0Log(run), HasSubstr("optimizer shard (ZeRO-1)"));
  expectCurve(run, ref, 1, k, kTol, "PP=2 x 2 replicas, ZeRO-1");
  testutil::expectPredictedStateMatches(run, 4, "PP=2 (3 + 1 layers) x 2 replicas, ZeRO-1");
  fs::path one = scratchRoot() / "zl_pp1";
  fs::create_directories(one);
  fs::copy(run / "checkpoints", one / "checkpoints", fs::copy_options::recursive);
  ASSERT_EQ(testutil::runTrain(jobYaml(one, "    - {name: a, count: 1}", steps, "", "{kind: sync}"), "zl_pp1", {"--resume"}),
            0)
      << outputOf("zl_pp1");
  expectCurve(one, ref, k + 1, steps, kTol, "resumed in one process");
}

// Four workers in two expert groups of two members (experts 3 + 1) with
// ZeRO stage `zero`, uneven shares, clipped every step, so a slice counted
// twice or not at all in the global norm leaves the curve; rank 0 shards
// the dense range over all four and its experts over two. Cut at step 6, it
// resumes on two workers (experts 1 + 3) with stage `resumed`: the dense
// state sharded over both, each member's experts whole, assembled by name.
void expertGroupsRun(const std::string& name, int zero, int resumed) {
  const int steps = 12, k = 6;
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  const std::string what = "EP=2 x 2 groups, ZeRO-" + std::to_string(zero);
  auto ref = testutil::clippedReference(name + "_ref", steps, moe);
  fs::path run = scratchRoot() / name;
  std::string y = testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, moe,
                                            "{expert_parallel: 2, expert_counts: [3, 1]}",
                                            ", shares: [3, 3, 1, 1], zero: " + std::to_string(zero)));
  y.replace(y.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(y, name, {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(run / "checkpoints" / checkpointDirName(k))) << outputOf(name);
  EXPECT_THAT(rank0Log(run), testing::ContainsRegex("optimizer shard \\(ZeRO-" + std::to_string(zero) +
                                                    "\\): [0-9]+ of [0-9]+ optimizer elements per rank: \\[0, "
                                                    "[0-9]+\\) over 4 ranks, \\[[0-9]+, [0-9]+\\) over 2 ranks"));
  expectCurve(run, ref, 1, k, kTol, what);
  testutil::expectGradNorms(run, scratchRoot() / (name + "_ref"), 1e-5, what, k);
  testutil::expectPredictedStateMatches(run, 4, what);
  const std::string again = name + "_resumed";
  fs::path two = scratchRoot() / again;
  fs::create_directories(two);
  fs::copy(run / "checkpoints", two / "checkpoints", fs::copy_options::recursive);
  const std::string y2 = testutil::clipped(jobYaml(two, "    - {name: a, count: 2}", steps, moe,
                                                   "{expert_parallel: 2, expert_counts: [1, 3]}",
                                                   ", zero: " + std::to_string(resumed)));
  ASSERT_EQ(testutil::runTrain(y2, again, {"--resume"}), 0) << outputOf(again);
  EXPECT_THAT(rank0Log(two), testing::ContainsRegex("optimizer shard \\(ZeRO-" + std::to_string(resumed) +
                                                    "\\): .* over 2 ranks, \\[[0-9]+, [0-9]+\\) whole"));
  expectCurve(two, ref, k + 1, steps, kTol, "resumed by EP=2 with ZeRO-" + std::to_string(resumed));
  testutil::expectPredictedStateMatches(two, 2, "EP=2 (experts 1 + 3), ZeRO-" + std::to_string(resumed));
}

// ZeRO-2: the dense gradients reduce-scattered over all four, each
// member's experts over the two ranks holding them; resumed with ZeRO-1.
TEST(ZeroLayouts, ExpertGroupsShardDenseAndExpertStateOverTheirOwnGroups) { expertGroupsRun("zl_ep", 2, 1); }

// ZeRO-3: each MoE layer gathered from two groups and its gradients
// reduce-scattered back over both, every member running the micro-batch
// count its expert group agreed on; resumed with ZeRO-3, each member's
// experts held whole by the one rank holding them.
TEST(ZeroLayouts, ExpertGroupsGatherEachLayerFromTwoGroupsWithZeroThree) { expertGroupsRun("zl_ep3", 3, 3); }

}  // namespace
}  // namespace archipelago::runtime
