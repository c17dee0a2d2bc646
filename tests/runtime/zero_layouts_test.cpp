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

// Expert parallelism with ZeRO-2: four workers in two expert groups of two
// members (experts 3 + 1). The dense tensors are reduce-scattered over all
// four, each member's experts over the two ranks holding them; clipped every
// step, so a slice counted twice or not at all in the global norm leaves the
// curve. Cut at step 6, it resumes on two workers (experts 1 + 3) with
// ZeRO-1: the dense state sharded over both, each member's experts whole,
// the moments assembled by name.
TEST(ZeroLayouts, ExpertGroupsShardDenseAndExpertStateOverTheirOwnGroups) {
  const int steps = 12, k = 6;
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  auto ref = testutil::clippedReference("zl_ep_ref", steps, moe);
  fs::path run = scratchRoot() / "zl_ep";
  std::string y = testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, moe,
                                            "{expert_parallel: 2, expert_counts: [3, 1]}", ", shares: [3, 3, 1, 1], zero: 2"));
  y.replace(y.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(y, "zl_ep", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(run / "checkpoints" / checkpointDirName(k))) << outputOf("zl_ep");
  // Rank 0's two slices: the dense range over all four, its experts over two.
  EXPECT_THAT(rank0Log(run), testing::ContainsRegex("optimizer shard \\(ZeRO-2\\): [0-9]+ of [0-9]+ optimizer elements "
                                                    "per rank: \\[0, [0-9]+\\) over 4 ranks, \\[[0-9]+, [0-9]+\\) over 2 ranks"));
  expectCurve(run, ref, 1, k, kTol, "EP=2 x 2 groups, ZeRO-2");
  testutil::expectGradNorms(run, scratchRoot() / "zl_ep_ref", 1e-5, "EP=2 x 2 groups, ZeRO-2", k);
  fs::path two = scratchRoot() / "zl_ep2";
  fs::create_directories(two);
  fs::copy(run / "checkpoints", two / "checkpoints", fs::copy_options::recursive);
  const std::string y2 = testutil::clipped(jobYaml(two, "    - {name: a, count: 2}", steps, moe,
                                                   "{expert_parallel: 2, expert_counts: [1, 3]}", ", zero: 1"));
  ASSERT_EQ(testutil::runTrain(y2, "zl_ep2", {"--resume"}), 0) << outputOf("zl_ep2");
  EXPECT_THAT(rank0Log(two), testing::ContainsRegex("optimizer shard \\(ZeRO-1\\): .* over 2 ranks, \\[[0-9]+, [0-9]+\\) whole"));
  expectCurve(two, ref, k + 1, steps, kTol, "resumed by EP=2 with ZeRO-1");
}

// Expert parallelism with ZeRO-3: the same four workers; each MoE layer is
// gathered from two groups (its dense tensors over all four, this member's
// experts over the two ranks holding them) and its gradients
// reduce-scattered back over both, every member running the micro-batch
// count its expert group agreed on. Clipped: each slice counts once in the
// norm. Cut at step 6, it resumes with ZeRO-3 on two workers (experts
// 1 + 3): the dense tensors sharded over both, each member's experts held
// whole by the one rank holding them.
TEST(ZeroLayouts, ExpertGroupsGatherEachLayerFromTwoGroupsWithZeroThree) {
  const int steps = 12, k = 6;
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  auto ref = testutil::clippedReference("zl_ep3_ref", steps, moe);
  fs::path run = scratchRoot() / "zl_ep3";
  std::string y = testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, moe,
                                            "{expert_parallel: 2, expert_counts: [3, 1]}", ", shares: [3, 3, 1, 1], zero: 3"));
  y.replace(y.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(y, "zl_ep3", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(run / "checkpoints" / checkpointDirName(k))) << outputOf("zl_ep3");
  EXPECT_THAT(rank0Log(run), testing::ContainsRegex("optimizer shard \\(ZeRO-3\\): [0-9]+ of [0-9]+ optimizer elements "
                                                    "per rank: \\[0, [0-9]+\\) over 4 ranks, \\[[0-9]+, [0-9]+\\) over 2 ranks"));
  expectCurve(run, ref, 1, k, kTol, "EP=2 x 2 groups, ZeRO-3");
  testutil::expectGradNorms(run, scratchRoot() / "zl_ep3_ref", 1e-5, "EP=2 x 2 groups, ZeRO-3", k);
  fs::path two = scratchRoot() / "zl_ep3_2";
  fs::create_directories(two);
  fs::copy(run / "checkpoints", two / "checkpoints", fs::copy_options::recursive);
  const std::string y2 = testutil::clipped(jobYaml(two, "    - {name: a, count: 2}", steps, moe,
                                                   "{expert_parallel: 2, expert_counts: [1, 3]}", ", zero: 3"));
  ASSERT_EQ(testutil::runTrain(y2, "zl_ep3_2", {"--resume"}), 0) << outputOf("zl_ep3_2");
  EXPECT_THAT(rank0Log(two), testing::ContainsRegex("optimizer shard \\(ZeRO-3\\): .* over 2 ranks, \\[[0-9]+, [0-9]+\\) whole"));
  expectCurve(two, ref, k + 1, steps, kTol, "resumed by EP=2 with ZeRO-3");
}

}  // namespace
}  // namespace archipelago::runtime
