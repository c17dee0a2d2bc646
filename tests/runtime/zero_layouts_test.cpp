// ZeRO-1/2 composed with tensor and pipeline parallelism, through the real
// binary against the single-process curve: the state is sharded over the
// ranks that hold the same tensors (a tensor-parallel slice's replicas, a
// stage's replicas), with uneven shares; a PP run saved half-way resumes
// unsharded in one process. ZeRO-3 alone: zero3_test.cpp.
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

}  // namespace
}  // namespace archipelago::runtime
