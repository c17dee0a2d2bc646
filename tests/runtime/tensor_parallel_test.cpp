// Tensor parallelism through the real binary (launcher, coordinator, worker
// processes, comm over 127.0.0.1) against the same job trained by one
// process: TP=2 with and without sequence parallelism, and TP=2 x PP=2 with
// sequence parallelism saved half-way and resumed by one process, by
// TP=2 x two data-parallel replicas with uneven shares and by ZeRO-3 over
// two replicas of PP=2; TP=2 x EP=2 and TP=2 x PP=2 x EP=2 (MoE); and a
// TP=2 group on each of two islands under DiLoCo. The
// model-level check (every gradient of every slice, fp64) is
// tests/model/tensor_parallel_test.cpp.
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/core/config.h"
#include "archipelago/runtime/parallel/layout.h"
#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testutil::checkpointModel;
using testutil::expectCurve;
using testutil::jobYaml;
using testutil::kSteps;
using testutil::kTol;
using testutil::loadJobText;
using testutil::outputOf;
using testutil::reference;
using testutil::scratchRoot;

TEST(TensorParallel, LayoutKeepsGroupsOnOneIslandAndRefusesWhatIsNotBuilt) {
  const std::string two_islands = "    - {name: a, count: 3}\n    - {name: b, count: 1}";
  auto job = loadJobText(jobYaml(scratchRoot() / "tp_lay", "    - {name: a, count: 4}", 2, "", "{tensor_parallel: 2}"),
                         "tp_lay");
  job.model.vocab_size = 64;  // the trainer takes it from the data
  auto lay = parallel::parallelLayout(job);
  ASSERT_TRUE(lay.isOk()) << lay.status().toString();
  EXPECT_EQ(lay->replicas, 2);
  EXPECT_EQ(lay->tpRankOf(3), 1);
  EXPECT_EQ(lay->replicaOf(3), 1);
  EXPECT_EQ(lay->firstRankOf(1), 2);
  // Ranks 2 and 3 would form a group across the strait.
  job.cluster.islands.push_back(job.cluster.islands[0]);
  job.cluster.islands[0].count = 3;
  job.cluster.islands[1].count = 1;
  job.cluster.islands[1].name = "b";
  auto bad = parallel::parallelLayout(job);
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("one island"));
  // Refused by the job check, naming the field (not silently ignored).
  for (const auto& [strategy, field] : std::vector<std::pair<std::string, std::string>>{
           {"{tensor_parallel: 2, pipeline_stages: 4}", "every stage is one tensor-parallel group"},
           {"{tensor_parallel: 4}", "model.n_kv_heads"},
           {"{tensor_parallel: 3}", "divisor of the number of workers"},
           {"{sequence_parallel: true}", "strategy.sequence_parallel"}}) {
    const fs::path file = scratchRoot() / "tp_bad.yaml";
    std::ofstream(file) << jobYaml(scratchRoot() / "tp_bad", "    - {name: a, count: 4}", 2, "", strategy);
    auto parsed = core::loadJob(file.string());
    ASSERT_FALSE(parsed.isOk()) << strategy;
    EXPECT_THAT(parsed.status().message(), HasSubstr(field)) << strategy;
  }
}

TEST(TensorParallel, TwoRanksWithAndWithoutSequenceParallelismMatchSingleProcess) {
  auto ref = reference("tp_ref", kSteps, "");
  ASSERT_EQ(ref.size(), static_cast<size_t>(kSteps));
  fs::path run = scratchRoot() / "tp2";
  ASSERT_EQ(testutil::runTrain(jobYaml(run, "    - {name: a, count: 2}", kSteps, "", "{tensor_parallel: 2}"), "tp2"), 0)
      << outputOf("tp2");
  expectCurve(run, ref, 1, kSteps, kTol, "TP=2");
  auto par = testutil::metricLines(run, "parallel");
  ASSERT_FALSE(par.empty());
  EXPECT_EQ(par.back()["tensor_parallel"].get<int>(), 2);
  // Both ranks computed every sample of the step (one TP group, one replica).
  EXPECT_EQ(testutil::samplesByRank(run), (std::map<int, int64_t>{{0, 8}, {1, 8}}));
  // Sequence parallelism: the norms see half of each sequence per rank, their
  // gradients are summed over the pair.
  fs::path sp = scratchRoot() / "tp2_sp";
  ASSERT_EQ(testutil::runTrain(jobYaml(sp, "    - {name: a, count: 2}", kSteps, "",
                                       "{tensor_parallel: 2, sequence_parallel: true}"),
                               "tp2_sp"),
            0)
      << outputOf("tp2_sp");
  expectCurve(sp, ref, 1, kSteps, kTol, "TP=2 with SP");
}

TEST(TensorParallel, TwoStagesOfTwoRanksSaveAndResumeAtOneProcessAndAtTwoUnevenReplicas) {
  const int steps = 12, k = 6;
  auto ref = reference("tp_pp_ref", steps, "");
  // TP=2 x PP=2 with sequence parallelism (activations cross stages as sequence blocks).
  fs::path cut = scratchRoot() / "tp_pp";
  std::string yaml = jobYaml(cut, "    - {name: a, count: 4}", steps, "",
                             "{tensor_parallel: 2, sequence_parallel: true, pipeline_stages: 2, stage_layers: [3, 1]}");
  yaml.replace(yaml.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(yaml, "tp_pp", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(cut / "checkpoints" / checkpointDirName(k))) << outputOf("tp_pp");
  expectCurve(cut, ref, 1, k, kTol, "TP=2 x PP=2 with SP before the cut");
  auto pl = testutil::metricLines(cut, "pipeline");
  ASSERT_FALSE(pl.empty());
  EXPECT_EQ(pl.back()["busy_s"].size(), 2u);
  // The checkpoint holds the single-process model: every tensor whole, by name.
  auto ck = loadCheckpoint((cut / "checkpoints" / checkpointDirName(k)).string());
  ASSERT_TRUE(ck.isOk()) << ck.status().toString();
  auto full = model::buildModel(checkpointModel(*ck), 0);
  ASSERT_TRUE(full.isOk()) << full.status().toString();
  std::map<std::string, std::vector<int64_t>> want, got;
  for (auto& [n, t] : (*full)->namedParameters()) want[n] = t.sizes().vec();
  for (auto& [n, t] : ck->weights) got[n] = t.sizes().vec();
  EXPECT_EQ(got, want);
  // Resumed by one process, by TP=2 x 2 replicas with shares 6:2, and by
  // ZeRO-3 over the replicas of PP=2 (other stage boundaries, recomputation).
  for (const auto& [count, strategy, name] : std::vector<std::tuple<int, std::string, std::string>>{
           {1, "{kind: sync}", "tp_rs1"},
           {4, "{tensor_parallel: 2}", "tp_rs_dp2"},
           {4, "{pipeline_stages: 2, stage_layers: [2, 2]}", "tp_rs_z3pp"}}) {
    fs::path run = scratchRoot() / name;
    fs::create_directories(run);
    fs::copy(cut / "checkpoints", run / "checkpoints", fs::copy_options::recursive);
    std::string y = jobYaml(run, "    - {name: a, count: " + std::to_string(count) + "}", steps, "", strategy);
    if (count == 4) y.replace(y.find("rebalance: false"), 16, "rebalance: false, shares: [3, 3, 1, 1]");
    if (name == "tp_rs_z3pp") y.replace(y.find("rebalance: false"), 16, "rebalance: false, zero: 3, recompute: true");
    ASSERT_EQ(testutil::runTrain(y, name, {"--resume"}), 0) << outputOf(name);
    expectCurve(run, ref, k + 1, steps, kTol, name);
    if (count == 4) {
      EXPECT_EQ(testutil::samplesByRank(run), (std::map<int, int64_t>{{0, 6}, {1, 6}, {2, 2}, {3, 2}}));
    }
  }
}

TEST(TensorParallel, TwoRanksTimesTwoExpertMembersMatchSingleProcess) {
  // 4 workers: TP groups {0, 1} and {2, 3}, replicating their MoE layers;
  // the ranks at the same TP rank ({0, 2} and {1, 3}) form the expert
  // groups, experts split [3, 1]. Router-bias balancing sums the load over
  // them, so the split run is the single-process run. Clipped every step:
  // the experts must count in the norm once, not once per TP rank.
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  auto ref = testutil::clippedReference("tpep_ref", kSteps, moe);
  fs::path run = scratchRoot() / "tpep";
  ASSERT_EQ(testutil::runTrain(testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", kSteps, moe,
                                                         "{tensor_parallel: 2, expert_parallel: 2, expert_counts: [3, 1]}")),
                               "tpep"),
            0)
      << outputOf("tpep");
  expectCurve(run, ref, 1, kSteps, kTol, "TP=2 x EP=2");
  testutil::expectGradNorms(run, scratchRoot() / "tpep_ref", 1e-5, "TP=2 x EP=2");
  auto ml = testutil::metricLines(run, "moe");
  ASSERT_FALSE(ml.empty());
  EXPECT_GT(ml.back()["dispatch_bytes"].get<int64_t>(), 0);
}

TEST(TensorParallel, SequenceBlocksThroughTwoExpertMembersMatchSingleProcess) {
  // TP=2 with sequence parallelism x EP=2, 4 workers: each TP rank routes
  // its half of every sequence through its expert group; the capacity
  // (which drops here) is decided in the whole micro-batch's order, and the
  // router-bias loads are summed over the TP group before the replicas'.
  // Clipped every step: the experts' and router's partial gradients must be
  // summed over the TP group exactly once.
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01, "
                          "capacity_factor: 1.0}";
  const fs::path run = testutil::expectClippedRunMatches(
      "tpspep", "    - {name: a, count: 4}", kSteps, moe,
      "{tensor_parallel: 2, sequence_parallel: true, expert_parallel: 2, expert_counts: [3, 1]}", "TP=2 + SP x EP=2");
  testutil::expectPredictedStateMatches(run, 4, "TP=2 + SP x EP=2");
  // Every TP rank counts its block: the records hold each step's 2 micro-batches' last
  // forwards (2 x 2 x 32 tokens, 2 choices each) on the two replicas, with drops.
  double dropped = 0;
  for (const auto& j : testutil::metricLines(run, "moe")) {
    double assigned = 0;
    for (double v : j["tokens_per_expert"].get<std::vector<double>>()) assigned += v;
    EXPECT_EQ(assigned, 2 * 2 * 32 * 2) << j.dump();
    dropped += j["dropped"].get<double>();
  }
  EXPECT_GT(dropped, 0);
}

TEST(TensorParallel, TwoRanksTimesTwoStagesTimesTwoExpertMembersMatchSingleProcess) {
  // The three together, 8 workers: rank ((d * 2 + s) * 2 + t) is TP rank t
  // of stage s of pipeline d; pipelines 0 and 1 form the expert group, so
  // the expert exchanges are the ranks at the same stage and TP rank:
  // {0, 4}, {1, 5}, {2, 6}, {3, 7}.
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  testutil::expectClippedRunMatches("tpppep", "    - {name: a, count: 8}", 8, moe,
                                    "{tensor_parallel: 2, pipeline_stages: 2, expert_parallel: 2, expert_counts: [3, 1]}",
                                    "TP=2 x PP=2 x EP=2");
}

TEST(TensorParallel, DilocoOverTwoIslandsOfTensorGroupsEqualsSyncAndKeepsSlicesIdentical) {
  // A TP=2 group with sequence parallelism on each of two islands: each
  // slice's outer sync is over the ranks holding it ({0, 2} and {1, 3}).
  // With the identity settings (plain SGD, H = 1, outer lr 1, no momentum)
  // DiLoCo is synchronous SGD, so the curve is the single-process one.
  const int steps = 10;
  const char* islands = "    - {name: east, count: 2}\n    - {name: west, count: 2}\n"
                        "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  auto ref = testutil::sgdDilocoReference("tpdl_ref", steps);
  fs::path run = scratchRoot() / "tpdl";
  ASSERT_EQ(testutil::runTrain(testutil::sgdDiloco(jobYaml(run, islands, steps, "",
                                                           "{tensor_parallel: 2, sequence_parallel: true, kind: diloco, "
                                                           "inner_steps: 1, outer_lr: 1.0, outer_momentum: 0.0, "
                                                           "nesterov: false}")),
                               "tpdl"),
            0)
      << outputOf("tpdl");
  expectCurve(run, ref, 1, steps, 2e-4, "TP=2 + SP x 2 islands, DiLoCo H=1");
  // Every outer step: slice 0 in both islands (ranks 0, 2) and slice 1
  // (ranks 1, 3) hold bit-identical anchors and momenta.
  testutil::expectOuterDigestsPaired(run, steps, {{0, 2}, {1, 3}}, "TP=2 x 2 islands");
}

}  // namespace
}  // namespace archipelago::runtime
