// Per-island layouts (core/island_layout.h, runtime/parallel/island_bridge.h)
// through the real binary against the same job trained by one process:
// island a runs TP=2 and island b PP=2 in one synchronous job (and b with
// two pipelines, so the bridge hands its sum to a second replica), clipped
// every step so a tensor counted twice or missed in the sum across the
// islands leaves the curve; saved half-way and resumed by one process and
// by the islands' layouts swapped (with ZeRO-1 over island a's two
// pipelines); and the two islands under DiLoCo, whose
// outer step averages by tensor name; and a MoE model on the two layouts.
// The exchange plan itself is checked element by element below.
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/core/config.h"
#include "archipelago/core/island_layout.h"
#include "archipelago/runtime/parallel/island_bridge.h"
#include "archipelago/runtime/parallel/layout.h"
#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using parallel::BridgePlan;
using parallel::FlatRun;
using testutil::expectCurve;
using testutil::jobYaml;
using testutil::kSteps;
using testutil::kTol;
using testutil::loadJobText;
using testutil::outputOf;
using testutil::scratchRoot;

// The elements of `runs` in order, as global indices.
std::vector<int64_t> globalsOf(const std::vector<FlatRun>& runs) {
  std::vector<int64_t> out;
  for (const auto& r : runs) {
    for (int64_t i = 0; i < r.n; ++i) out.push_back(r.global + i);
  }
  return out;
}

TEST(IslandBridge, EachElementComesOnceFromEveryOtherIslandAndBothEndsListItAlike) {
  // Island 0: one rank holding the whole model [0, 10) in two runs with
  // another local order. Island 1: two ranks (a TP pair) holding [0, 6)
  // and [4, 10): [4, 6) is replicated between them.
  const std::vector<std::vector<FlatRun>> runs = {
      {{0, 4, 6}, {6, 0, 4}},
      {{0, 0, 6}},
      {{4, 0, 6}},
  };
  const std::vector<int> island = {0, 1, 1};
  std::vector<BridgePlan> plans;
  for (int m = 0; m < 3; ++m) {
    auto p = parallel::bridgePlan(runs, island, m);
    ASSERT_TRUE(p.isOk()) << p.status().toString();
    plans.push_back(std::move(p).value());
  }
  // Rank 0 takes [0, 6) from rank 1 and only [6, 10) from rank 2 (the
  // replicated [4, 6) is rank 1's to contribute); it sends each what it holds.
  EXPECT_EQ(globalsOf(plans[0].recv[1]), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(globalsOf(plans[0].recv[2]), (std::vector<int64_t>{6, 7, 8, 9}));
  EXPECT_EQ(globalsOf(plans[0].send[2]), (std::vector<int64_t>{4, 5, 6, 7, 8, 9}));
  // Local offsets follow rank 0's own buffer: global 6 sits at local 0.
  EXPECT_EQ(plans[0].recv[2].front().local, 0);
  // Every send is the receiver's receive, element for element; nothing
  // moves inside an island.
  for (int a = 0; a < 3; ++a) {
    for (int b = 0; b < 3; ++b) {
      EXPECT_EQ(globalsOf(plans[static_cast<size_t>(a)].send[static_cast<size_t>(b)]),
                globalsOf(plans[static_cast<size_t>(b)].recv[static_cast<size_t>(a)]))
          << a << " -> " << b;
      if (island[static_cast<size_t>(a)] == island[static_cast<size_t>(b)]) {
        EXPECT_TRUE(plans[static_cast<size_t>(a)].send[static_cast<size_t>(b)].empty());
      }
    }
  }
  // An island that does not hold the whole model is refused.
  auto bad = parallel::bridgePlan({{{0, 0, 10}}, {{0, 0, 6}}}, {0, 1}, 0);
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("whole model"));
}

TEST(IslandLayouts, EachIslandGetsItsOwnSpanAndTheJobCheckNamesTheIslandField) {
  const std::string islands =
      "    - {name: a, count: 2, tensor_parallel: 2}\n    - {name: b, count: 4, pipeline_stages: 2, stage_layers: [3, 1]}";
  auto job = loadJobText(jobYaml(scratchRoot() / "il_lay", islands, 2, "", "{kind: sync}"), "il_lay");
  job.model.vocab_size = 64;
  EXPECT_TRUE(core::perIslandLayouts(job));
  auto lay = parallel::jobLayout(job);
  ASSERT_TRUE(lay.isOk()) << lay.status().toString();
  ASSERT_EQ(lay->spans.size(), 2u);
  EXPECT_EQ(lay->replicas(), 3);  // one TP pair, two pipelines
  const auto& b = lay->of(4);
  EXPECT_EQ(b.base, 2);
  EXPECT_EQ(b.stageOf(4), 0);
  EXPECT_EQ(b.stageOf(5), 1);
  EXPECT_EQ(b.replicaOf(5), 2);
  EXPECT_EQ(b.firstRankOf(2), 4);
  EXPECT_EQ(lay->of(1).tpRankOf(1), 1);
  for (const auto& [cluster, extra, field] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"    - {name: a, count: 2, tensor_parallel: 2}\n    - {name: b, count: 3, pipeline_stages: 2}", "{kind: sync}",
            "cluster.islands[1].pipeline_stages"},
           {"    - {name: a, count: 2, tensor_parallel: 2}\n    - {name: b, count: 2, stage_layers: [3, 1]}", "{kind: sync}",
            "cluster.islands[1].stage_layers"},
           {islands, "{kind: streaming, codec: int4}", "strategy.codec"},
           {islands, "{kind: diloco, codec: int8}", "strategy.codec"},
           {islands, "{kind: sync, codec: fp8_e4m3}", "strategy.codec"},
           {islands, "{kind: sync, expert_parallel: 2}", "island 'a' runs 1"},
           {"    - {name: a, count: 4, tensor_parallel: 2}\n    - {name: b, count: 4}",
            "{kind: streaming, fragments: 2, expert_parallel: 2}", "strategy.fragments"}}) {
    const fs::path file = scratchRoot() / "il_bad.yaml";
    std::ofstream(file) << jobYaml(scratchRoot() / "il_bad", cluster, 2, "", extra);
    auto parsed = core::loadJob(file.string());
    ASSERT_FALSE(parsed.isOk()) << extra;
    EXPECT_THAT(parsed.status().message(), HasSubstr(field)) << extra;
  }
}

TEST(IslandLayouts, TensorParallelIslandAndPipelineIslandMatchSingleProcessAndResumeElsewhere) {
  const int steps = 12, k = 6;  // cut half-way
  auto ref = testutil::clippedReference("il_ref", steps, "");
  ASSERT_EQ(ref.size(), static_cast<size_t>(steps));
  // Island a: one TP=2 replica (SP on); island b: two PP=2 pipelines, so
  // the bridge's sum also goes on to b's second pipeline. Shares follow
  // the replicas: 8 samples over 3.
  fs::path run = scratchRoot() / "il_tp_pp";
  std::string yaml = testutil::clipped(jobYaml(
      run, "    - {name: a, count: 2, tensor_parallel: 2}\n    - {name: b, count: 4, pipeline_stages: 2, stage_layers: [3, 1]}",
      steps, "", "{kind: sync, sequence_parallel: true}"));
  yaml.replace(yaml.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(yaml, "il_tp_pp", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(run / "checkpoints" / checkpointDirName(k))) << outputOf("il_tp_pp");
  expectCurve(run, ref, 1, k, kTol, "a TP=2, b PP=2 x 2");
  testutil::expectGradNorms(run, scratchRoot() / "il_ref", 1e-5, "a TP=2, b PP=2 x 2", k);
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("gradients summed across islands by tensor name"));
  // Resumed by one process, and by the layouts swapped between the islands.
  for (const auto& [islands, strategy, name] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"    - {name: a, count: 1}", "{kind: sync}", "il_one"},
           {"    - {name: a, count: 4, pipeline_stages: 2, stage_layers: [2, 2]}\n    - {name: b, count: 2, "
            "tensor_parallel: 2}",
            "{kind: sync}", "il_swapped"},
           {"    - {name: a, count: 2, tensor_parallel: 2}\n    - {name: b, count: 4, pipeline_stages: 2, "
            "stage_layers: [2, 2]}",
            "{kind: sync, sequence_parallel: true}", "il_zero2"}}) {
    fs::path again = scratchRoot() / name;
    fs::create_directories(again);
    fs::copy(run / "checkpoints", again / "checkpoints", fs::copy_options::recursive);
    // The swapped layouts with ZeRO-1: island a's two pipelines shard AdamW's state per stage; with
    // ZeRO-2 island b's two pipelines also reduce-scatter their gradients, and every rank sums its
    // slice with the other island's elements of it.
    const std::string zero = name == "il_swapped" ? ", zero: 1" : name == "il_zero2" ? ", zero: 2" : "";
    ASSERT_EQ(testutil::runTrain(testutil::clipped(jobYaml(again, islands, steps, "", strategy, zero)), name, {"--resume"}),
              0)
        << outputOf(name);
    expectCurve(again, ref, k + 1, steps, kTol, name);
    if (name == "il_swapped") {
      EXPECT_THAT(testutil::rank0Log(again), HasSubstr("(ZeRO-1)"));
    }
    // Under ZeRO-2 island b's ranks hold half their stage's optimizer state each (island a's one
    // replica has nobody to shard with): every rank's state as the memory model counts it.
    if (name == "il_zero2") testutil::expectPredictedStateMatches(again, 6, "a TP=2 + b PP=2 x 2, ZeRO-2");
    if (name != "il_one") {
      EXPECT_THAT(testutil::rank0Log(again), HasSubstr("every island holds the same model"));
    }
  }
}

TEST(IslandLayouts, SyncSumCrossesInBf16AndKeepsTheIslandsIdentical) {
  // The gradient sum across a TP=2 island and a PP=2 island in bf16 (error
  // feedback on): each member rounds its island's sum before it crosses, so
  // every holder adds the same bits and the islands stay identical (the run
  // checks it at the end); the curve stays near the fp32 single process's.
  const int steps = 8;
  auto ref = testutil::reference("il_bf16_ref", steps, "");
  fs::path run = scratchRoot() / "il_bf16";
  ASSERT_EQ(testutil::runTrain(jobYaml(run,
                                       "    - {name: a, count: 2, tensor_parallel: 2}\n"
                                       "    - {name: b, count: 2, pipeline_stages: 2, stage_layers: [3, 1]}",
                                       steps, "", "{kind: sync, codec: bf16}"),
                               "il_bf16"),
            0)
      << outputOf("il_bf16");
  expectCurve(run, ref, 1, steps, 2e-3, "a TP=2, b PP=2, sum in bf16");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("every island holds the same model"));
}

// A MoE model: island a TP=2 (its MoE layers replicated in the group; with
// `sequence` each TP rank routes its block of the sequence), island b a
// PP=2 pipeline. Router-bias balancing needs every token's routing: the
// loads meet by layer across the islands, so the biases, the routing and
// the curve are the single process's. Clipped: the experts must count once
// in the norm, not once per TP rank.
void moeIslandsRun(const std::string& name, bool sequence) {
  const int steps = 8;
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  const std::string what = sequence ? "MoE: a TP=2 + SP, b PP=2" : "MoE: a TP=2, b PP=2";
  auto ref = testutil::clippedReference(name + "_ref", steps, moe);
  fs::path run = scratchRoot() / name;
  ASSERT_EQ(testutil::runTrain(testutil::clipped(jobYaml(run,
                                                         "    - {name: a, count: 2, tensor_parallel: 2}\n"
                                                         "    - {name: b, count: 2, pipeline_stages: 2, stage_layers: [3, 1]}",
                                                         steps, moe, sequence ? "{kind: sync, sequence_parallel: true}"
                                                                              : "{kind: sync}")),
                               name),
            0)
      << outputOf(name);
  expectCurve(run, ref, 1, steps, kTol, what);
  testutil::expectGradNorms(run, scratchRoot() / (name + "_ref"), 1e-5, what);
  // The router biases both runs ended with (checkpointed at exit) are the
  // same: every update saw the job's whole load, not an island's.
  auto biases = [&](const fs::path& dir) {
    std::map<std::string, torch::Tensor> out;
    auto ck = loadCheckpoint((dir / "checkpoints" / checkpointDirName(steps)).string());
    EXPECT_TRUE(ck.isOk()) << ck.status().toString();
    if (!ck.isOk()) return out;
    for (const auto& [n, t] : ck->weights) {
      if (n.find("e_score_correction_bias") != std::string::npos) out[n] = t;
    }
    return out;
  };
  const auto want_bias = biases(scratchRoot() / (name + "_ref")), got_bias = biases(run);
  ASSERT_EQ(want_bias.size(), 4u) << "a router bias per MoE layer";
  ASSERT_EQ(got_bias.size(), want_bias.size());
  for (const auto& [n, t] : want_bias) {
    EXPECT_GT(t.abs().sum().item<double>(), 0) << n << ": the balancing moved the bias";
    EXPECT_TRUE(torch::allclose(got_bias.at(n), t, 0, 1e-6)) << n << ": " << got_bias.at(n) << " vs " << t;
  }
  // A MoE record per step and layer, counting the last micro-batch (2
  // samples x 32 tokens, top-2) of each of the two replicas (island a's TP
  // group and island b's pipeline): a TP group counted once, not per rank
  // (under SP each rank its own block).
  std::map<std::pair<int64_t, int64_t>, double> routed;
  for (const auto& j : testutil::metricLines(run, "moe")) {
    double sum = 0;
    for (double v : j["tokens_per_expert"].get<std::vector<double>>()) sum += v;
    routed[{j["step"].get<int64_t>(), j["layer"].get<int64_t>()}] += sum;
  }
  ASSERT_EQ(routed.size(), static_cast<size_t>(steps * 4)) << "a MoE record per step and layer";
  for (const auto& [at, sum] : routed) EXPECT_EQ(sum, 2 * 2 * 32 * 2) << "step " << at.first << " layer " << at.second;
}

TEST(IslandLayouts, MoeLayersRunReplicatedInEachIslandsLayoutAndBalanceOnTheJobsLoad) { moeIslandsRun("ilmoe", false); }

TEST(IslandLayouts, MoeLayersRouteSequenceBlocksOnATensorParallelIsland) { moeIslandsRun("ilmoesp", true); }

TEST(IslandLayouts, ExpertGroupsInsideEachIslandMatchSingleProcess) {
  // Island a: two TP=2 replicas, one expert group; island b: four plain
  // workers, two expert groups (8 workers, experts 3 + 1 everywhere). An
  // island first sums its own replicas (b's experts over its two groups);
  // the bridge is each island's first expert group (its members hold the
  // dense tensors alike and the experts between them); b's second group
  // takes its sums from the member holding the same experts.
  // Router-bias balancing, clipped every step: the experts count once in
  // the norm (island a's group), the curve and the norms are the single
  // process's, and the islands end identical.
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  const fs::path run = testutil::expectClippedRunMatches(
      "ilep", "    - {name: a, count: 4, tensor_parallel: 2}\n    - {name: b, count: 4}", 8, moe,
      "{kind: sync, expert_parallel: 2, expert_counts: [3, 1]}", "MoE: a TP=2 x EP=2, b EP=2 x 2");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("every island holds the same model"));
  auto ml = testutil::metricLines(run, "moe");
  ASSERT_FALSE(ml.empty());
  EXPECT_EQ(ml.back()["expert_parallel"].get<int>(), 2);
  EXPECT_GT(ml.back()["dispatch_bytes"].get<int64_t>(), 0);
}

TEST(IslandLayouts, ExpertGroupsInsideEachIslandUnderDiloco) {
  // The same islands and expert groups under DiLoCo with the identity
  // settings (plain SGD, H = 1, outer lr 1: synchronous SGD): every rank's
  // buffer (dense tensors, then its experts) is one range of the outer
  // step's mean by name, and the curve is the single process's.
  const int steps = 6;
  const std::string moe = ", moe: {num_experts: 4, top_k: 2}";
  auto ref = testutil::sgdDilocoReference("ilepdl_ref", steps, moe);
  fs::path run = scratchRoot() / "ilepdl";
  ASSERT_EQ(testutil::runTrain(testutil::sgdDiloco(jobYaml(run,
                                                           "    - {name: a, count: 4, tensor_parallel: 2}\n"
                                                           "    - {name: b, count: 4}",
                                                           steps, moe,
                                                           "{kind: diloco, inner_steps: 1, outer_lr: 1.0, outer_momentum: "
                                                           "0.0, nesterov: false, expert_parallel: 2, expert_counts: [3, 1]}")),
                               "ilepdl"),
            0)
      << outputOf("ilepdl");
  expectCurve(run, ref, 1, steps, 2e-4, "MoE under DiLoCo H=1: a TP=2 x EP=2, b EP=2 x 2");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("every island holds the same model"));
}

TEST(IslandLayouts, DilocoAveragesTheIslandsByTensorName) {
  // Island a: TP=2 with SP; island b: a PP=2 pipeline. With the identity
  // settings (plain SGD, H = 1, outer lr 1, no momentum) DiLoCo is
  // synchronous SGD, so the curve is the single-process one; the outer
  // step's mean pairs no ranks by position: it goes by tensor name.
  const int steps = 10;
  auto ref = testutil::sgdDilocoReference("ildl_ref", steps);
  fs::path run = scratchRoot() / "ildl";
  const char* islands = "    - {name: a, count: 2, tensor_parallel: 2}\n    - {name: b, count: 2, pipeline_stages: 2}\n"
                        "  straits: [{a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}]";
  ASSERT_EQ(testutil::runTrain(testutil::sgdDiloco(jobYaml(run, islands, steps, "",
                                                           "{sequence_parallel: true, kind: diloco, inner_steps: 1, "
                                                           "outer_lr: 1.0, outer_momentum: 0.0, nesterov: false}")),
                               "ildl"),
            0)
      << outputOf("ildl");
  expectCurve(run, ref, 1, steps, 2e-4, "a TP=2, b PP=2, DiLoCo H=1");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("pseudo-gradients by tensor name"));
}

// Streaming DiLoCo (3 fragments over H = 4, one step of overlap, outer
// momentum; `codec` across the straits) with island a TP=2 + SP and island
// b a PP=2 pipeline, against the same job with both islands two plain
// data-parallel workers: the fragments are cut in the single-process
// layout, so each outer step averages the same tensors at the same step,
// and an element-wise codec rounds every element as the plain layout's
// does, so the two runs are one run up to summation order. (A fragment the
// pipeline's stage does not hold is empty there, and that rank still takes
// part in its exchange.) Returns the payload bytes the per-island run's
// ranks put on the straits.
double streamingRun(const std::string& name, const std::string& codec) {
  const int steps = 12;
  const std::string streaming = "kind: streaming, inner_steps: 4, fragments: 3, overlap_steps: 1, outer_lr: 0.7, "
                                "outer_momentum: 0.5, codec: " + codec + ", error_feedback: " +
                                (codec == "none" ? "false" : "true");
  const std::string strait = "\n  straits: [{a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}]";
  fs::path plain = scratchRoot() / (name + "_plain");
  EXPECT_EQ(testutil::runTrain(jobYaml(plain, "    - {name: a, count: 2}\n    - {name: b, count: 2}" + strait, steps,
                                       "", "{" + streaming + "}"),
                               name + "_plain"),
            0)
      << outputOf(name + "_plain");
  std::vector<double> ref;
  for (const auto& [step, loss] : testutil::rank0Losses(plain)) ref.push_back(loss);
  EXPECT_EQ(ref.size(), static_cast<size_t>(steps));
  fs::path run = scratchRoot() / name;
  EXPECT_EQ(testutil::runTrain(jobYaml(run,
                                       "    - {name: a, count: 2, tensor_parallel: 2}\n"
                                       "    - {name: b, count: 2, pipeline_stages: 2, stage_layers: [3, 1]}" + strait,
                                       steps, "", "{sequence_parallel: true, " + streaming + "}"),
                               name),
            0)
      << outputOf(name);
  if (ref.size() != static_cast<size_t>(steps)) return 0;
  expectCurve(run, ref, 1, steps, 2e-4, "streaming, codec " + codec + ": a TP=2 + SP, b PP=2 against plain islands");
  // The islands end with the same bits of every tensor (the run checks it, or fails).
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("every island holds the same model"));
  // Every fragment was synced (3 fragments, 12 steps of H = 4: 3 rounds each).
  std::set<int64_t> fragments;
  double bytes = 0;
  for (const auto& j : testutil::metricLines(run, "outer")) {
    if (j.contains("fragment")) fragments.insert(j["fragment"].get<int64_t>());
    if (j.contains("bytes_strait")) bytes += j["bytes_strait"].get<double>();
  }
  EXPECT_EQ(fragments.size(), 3u);
  return bytes;
}

TEST(IslandLayouts, StreamingSyncsTheSameFragmentsAsAPlainLayoutAndCompressesElementWise) {
  const double fp32 = streamingRun("ilst", "none");
  const double bf16 = streamingRun("ilst_bf16", "bf16");
  EXPECT_GT(fp32, 0);
  // Two bytes an element instead of four (and a 16-byte header a block).
  EXPECT_NEAR(bf16 / fp32, 0.5, 0.02) << bf16 << " vs " << fp32;
}

}  // namespace
}  // namespace archipelago::runtime
