// ZeRO-3 through the real binary (launcher, coordinator, worker processes,
// comm over 127.0.0.1) against the same job trained by one process: three
// workers in two islands with uneven shares 5/2/1 (micro-batch counts 3/1/1,
// so two of them run idle passes), killed half-way, and the checkpoint the
// shards assembled resumed by one process and by four ZeRO-3 workers with
// other shares and other slice boundaries, both evaluating; and ZeRO-3 over
// the replicas of each pipeline stage (PP=2 x 2 replicas, uneven shares, so
// one pipeline runs idle operations in its 1F1B schedule) and over the
// replicas of each tensor-parallel slice, with sequence parallelism too. Resumed at
// ZeRO-3 x PP=2 from a TP=2 x PP=2 checkpoint: tensor_parallel_test.cpp. The mechanics
// of one rank (gradients of its slice, weights held only where used) are
// in sharded_params_test.cpp.
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/core/config.h"
#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testutil::checkpointModel;
using testutil::expectCurve;
using testutil::jobYaml;
using testutil::kTol;
using testutil::outputOf;
using testutil::reference;
using testutil::scratchRoot;

TEST(ZeroThree, UnevenSharesMatchSingleProcessAndTheCheckpointResumesUnderOtherLayouts) {
  const int steps = 12, k = 6;
  auto ref = reference("z3_ref", steps, "");
  const std::string islands =
      "    - {name: east, count: 2}\n    - {name: west, count: 1}\n"
      "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  fs::path cut = scratchRoot() / "z3";
  std::string yaml = jobYaml(cut, islands, steps, "", "{kind: sync}", ", shares: [5, 2, 1], zero: 3");
  yaml.replace(yaml.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(yaml, "z3", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(cut / "checkpoints" / checkpointDirName(k))) << outputOf("z3");
  EXPECT_THAT(testutil::rank0Log(cut), HasSubstr("optimizer shard (ZeRO-3)"));
  expectCurve(cut, ref, 1, k, kTol, "ZeRO-3 before the cut");
  EXPECT_EQ(testutil::samplesByRank(cut), (std::map<int, int64_t>{{0, 5}, {1, 2}, {2, 1}}));
  // Assembled from three slices: every tensor whole, by name.
  auto ck = loadCheckpoint((cut / "checkpoints" / checkpointDirName(k)).string());
  ASSERT_TRUE(ck.isOk()) << ck.status().toString();
  auto full = model::buildModel(checkpointModel(*ck), 0);
  ASSERT_TRUE(full.isOk()) << full.status().toString();
  std::map<std::string, std::vector<int64_t>> want, got;
  for (auto& [n, t] : (*full)->namedParameters()) want[n] = t.sizes().vec();
  for (auto& [n, t] : ck->weights) got[n] = t.sizes().vec();
  EXPECT_EQ(got, want);
  // Resumed by one process and by four ZeRO-3 workers (shares 1/3/3/1),
  // both evaluating at the end: the same validation loss.
  std::map<std::string, double> val;
  for (const auto& [count, extra, name] : std::vector<std::tuple<int, std::string, std::string>>{
           {1, "", "z3_rs1"}, {4, ", shares: [1, 3, 3, 1], zero: 3", "z3_rs4"}}) {
    fs::path run = scratchRoot() / name;
    fs::create_directories(run);
    fs::copy(cut / "checkpoints", run / "checkpoints", fs::copy_options::recursive);
    std::string y = jobYaml(run, "    - {name: a, count: " + std::to_string(count) + "}", steps, "", "{kind: sync}", extra);
    y.replace(y.find("eval_every: 0"), 13, "eval_every: " + std::to_string(steps));
    ASSERT_EQ(testutil::runTrain(y, name, {"--resume"}), 0) << outputOf(name);
    expectCurve(run, ref, k + 1, steps, kTol, name);
    const auto evals = testutil::metricLines(run, "eval");
    ASSERT_FALSE(evals.empty()) << outputOf(name);
    val[name] = evals.back()["val_loss"].get<double>();
  }
  EXPECT_EQ(testutil::samplesByRank(scratchRoot() / "z3_rs4"), (std::map<int, int64_t>{{0, 1}, {1, 3}, {2, 3}, {3, 1}}));
  EXPECT_NEAR(val["z3_rs4"], val["z3_rs1"], kTol * ref[0]);
}

TEST(ZeroThree, PipelineStagesShardOverTheirReplicasWithUnevenShares) {
  const int steps = 10;
  // Each stage's slices count in the global norm once (checked against the
  // single process's norm; clipping at every step makes the curve depend on it).
  auto ref = testutil::clippedReference("z3_pp_ref", steps, "");
  fs::path run = scratchRoot() / "z3_pp";
  // Pipelines of 6 and 2 samples in micro-batches of 2: 3 and 1, so each
  // stage of the second runs two idle forwards and backwards to meet the
  // first's gathers and reduce-scatters.
  std::string y = testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, "",
                                            "{pipeline_stages: 2, stage_layers: [3, 1]}", ", shares: [3, 3, 1, 1], zero: 3"));
  y.replace(y.find("eval_every: 0"), 13, "eval_every: " + std::to_string(steps));
  ASSERT_EQ(testutil::runTrain(y, "z3_pp"), 0) << outputOf("z3_pp");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("optimizer shard (ZeRO-3)"));
  expectCurve(run, ref, 1, steps, kTol, "PP=2 x 2 replicas, ZeRO-3");
  testutil::expectGradNorms(run, scratchRoot() / "z3_pp_ref", 1e-5, "PP=2 x 2 replicas, ZeRO-3");
  EXPECT_EQ(testutil::samplesByRank(run), (std::map<int, int64_t>{{0, 6}, {1, 6}, {2, 2}, {3, 2}}));
  testutil::expectPredictedStateMatches(run, 4, "PP=2 (3 + 1 layers) x 2 replicas, ZeRO-3");
  EXPECT_FALSE(testutil::metricLines(run, "eval").empty()) << outputOf("z3_pp");
}

TEST(ZeroThree, TensorParallelSlicesShardOverTheirReplicas) {
  const int steps = 10;
  auto ref = testutil::clippedReference("z3_tp_ref", steps, "");
  fs::path run = scratchRoot() / "z3_tp";
  // TP groups {0, 1} and {2, 3}: ranks 0 and 2 shard slice 0, ranks 1 and 3
  // slice 1; the norms (whole on both TP ranks) count in the global norm
  // once: the norm equals the single process's, and clipping at every step
  // makes the curve depend on it.
  const std::string y = testutil::clipped(
      jobYaml(run, "    - {name: a, count: 4}", steps, "", "{tensor_parallel: 2}", ", shares: [3, 3, 1, 1], zero: 3"));
  ASSERT_EQ(testutil::runTrain(y, "z3_tp"), 0) << outputOf("z3_tp");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("optimizer shard (ZeRO-3)"));
  expectCurve(run, ref, 1, steps, kTol, "TP=2 x 2 replicas, ZeRO-3");
  testutil::expectGradNorms(run, scratchRoot() / "z3_tp_ref", 1e-5, "TP=2 x 2 replicas, ZeRO-3");
  testutil::expectPredictedStateMatches(run, 4, "TP=2 x 2 replicas, ZeRO-3");
}

// Sequence parallelism: each TP rank's norms see half of every sequence, so
// their gradients must be summed over the TP group too. ZeRO-3 has already
// reduce-scattered them over the replicas, into slices cut at other offsets
// on the two TP ranks; the tensor part sums the owned pieces by name over
// all four ranks. Clipped every step: a norm gradient left unsummed moves
// the global norm and the curve.
TEST(ZeroThree, SequenceParallelNormsAreSummedAfterTheReduceScatter) {
  const int steps = 10;
  auto ref = testutil::clippedReference("z3_sp_ref", steps, "");
  fs::path run = scratchRoot() / "z3_sp";
  const std::string y = testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, "",
                                                  "{tensor_parallel: 2, sequence_parallel: true}",
                                                  ", shares: [3, 3, 1, 1], zero: 3"));
  ASSERT_EQ(testutil::runTrain(y, "z3_sp"), 0) << outputOf("z3_sp");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("optimizer shard (ZeRO-3)"));
  expectCurve(run, ref, 1, steps, kTol, "TP=2 + SP x 2 replicas, ZeRO-3");
  testutil::expectGradNorms(run, scratchRoot() / "z3_sp_ref", 1e-5, "TP=2 + SP x 2 replicas, ZeRO-3");
  testutil::expectPredictedStateMatches(run, 4, "TP=2 + SP x 2 replicas, ZeRO-3");
}

// The same with MoE layers: each TP rank routes its block through the
// replicated experts, whose partial gradients are summed with the norms'
// after the reduce-scatter (the owned vector now holds the experts too).
TEST(ZeroThree, SequenceParallelMoeLayersAreSummedAfterTheReduceScatter) {
  const int steps = 8;
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  auto ref = testutil::clippedReference("z3_spmoe_ref", steps, moe);
  fs::path run = scratchRoot() / "z3_spmoe";
  const std::string y = testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, moe,
                                                  "{tensor_parallel: 2, sequence_parallel: true}",
                                                  ", shares: [3, 3, 1, 1], zero: 3"));
  ASSERT_EQ(testutil::runTrain(y, "z3_spmoe"), 0) << outputOf("z3_spmoe");
  expectCurve(run, ref, 1, steps, kTol, "MoE, TP=2 + SP x 2 replicas, ZeRO-3");
  testutil::expectGradNorms(run, scratchRoot() / "z3_spmoe_ref", 1e-5, "MoE, TP=2 + SP x 2 replicas, ZeRO-3");
  testutil::expectPredictedStateMatches(run, 4, "MoE, TP=2 + SP x 2 replicas, ZeRO-3");
}

TEST(ZeroThree, RefusesWhatItCannotReduce) {
  auto msg = [](const std::string& strategy, const std::string& train_extra, const std::string& model_extra = "",
                int workers = 2) {
    const fs::path file = scratchRoot() / "z3_refuse.yaml";
    std::ofstream(file) << jobYaml(scratchRoot() / "z3_refuse",
                                   "    - {name: a, count: " + std::to_string(workers) + "}", 2, model_extra, strategy,
                                   train_extra);
    auto job = core::loadJob(file.string());
    return job.isOk() ? std::string() : job.status().message();
  };
  EXPECT_THAT(msg("{kind: sync}", ", zero: 3, reduce_dtype: bf16"), HasSubstr("train.reduce_dtype"));
  EXPECT_EQ(msg("{tensor_parallel: 2, sequence_parallel: true}", ", zero: 3"), "");
  EXPECT_EQ(msg("{kind: sync}", ", zero: 3"), "");
  EXPECT_EQ(msg("{tensor_parallel: 2}", ", zero: 3"), "");
  EXPECT_EQ(msg("{pipeline_stages: 2}", ", zero: 3"), "");
  // Expert groups lay their replicated tensors out differently: not with SP.
  const std::string moe = ", moe: {num_experts: 4, top_k: 2}";
  EXPECT_THAT(msg("{tensor_parallel: 2, sequence_parallel: true, expert_parallel: 2}", ", zero: 3", moe, 4),
              HasSubstr("strategy.sequence_parallel"));
  EXPECT_EQ(msg("{tensor_parallel: 2, sequence_parallel: true, expert_parallel: 2}", ", zero: 2", moe, 4), "");
}

}  // namespace
}  // namespace archipelago::runtime
