// Pipeline and expert parallelism. The reference for every split run is the
// same job trained by one process (runTrainer with no communicator, the
// same global batch and micro-batches): PP=2, PP=3 with uneven layers, two
// pipelines with uneven shares, EP=2 with uneven expert placement and
// PP=2 x EP=2 must reproduce its loss curve within fp32 tolerance; a run
// saved at PP=2 must continue at PP=1 and at PP=3 on the same curve. With
// DiLoCo / streaming over two islands of pipelines (or expert groups), the
// identity settings (inner SGD, H=1, outer lr 1, no momentum) must give the
// single-process SGD curve, with bit-identical replicas of every stage. Split runs go through the
// real binary (launcher, coordinator, worker processes, comm over 127.0.0.1).
#include <cmath>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "archipelago/data/dataset.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/parallel/layout.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using namespace parallel;  // NOLINT: the parts under test
using ::testing::HasSubstr;
using testutil::loadJobText;
using testutil::outputOf;
using testutil::scratchRoot;
using testutil::sgdDiloco;
using testutil::tinyDataDir;
using testutil::checkpointModel;
using testutil::expectCurve;
using testutil::jobYaml;
using testutil::kSteps;
using testutil::kTol;
using testutil::reference;

// ---- pure pieces ---------------------------------------------------------------

TEST(Pipeline, OneFOneBScheduleRunsEveryMicroBatchOnceInOrder) {
  for (int p = 1; p <= 4; ++p) {
    for (int64_t m = 1; m <= 6; ++m) {
      for (int s = 0; s < p; ++s) {
        auto ops = oneFOneBSchedule(s, p, m);
        ASSERT_EQ(ops.size(), static_cast<size_t>(2 * m));
        int64_t next_f = 0, next_b = 0, in_flight = 0, max_in_flight = 0;
        for (const auto& op : ops) {
          if (op.forward) {
            EXPECT_EQ(op.micro, next_f++);
            max_in_flight = std::max(max_in_flight, ++in_flight);
          } else {
            EXPECT_EQ(op.micro, next_b++);
            EXPECT_LT(op.micro, next_f) << "backward before its forward";
            --in_flight;
          }
        }
        // 1F1B keeps at most p - s micro-batches' activations alive.
        EXPECT_LE(max_in_flight, std::min<int64_t>(p - s, m));
      }
    }
  }
  EXPECT_DOUBLE_EQ(oneFOneBBubble(4, 8), 3.0 / 11.0);
  EXPECT_DOUBLE_EQ(oneFOneBBubble(1, 8), 0.0);
}

TEST(Pipeline, SplitLayersFollowsSpeedAndMemory) {
  EXPECT_EQ(*splitLayers(8, {1, 1}), (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(*splitLayers(6, {2, 1}), (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(*splitLayers(9, {1, 2, 1}), (std::vector<int64_t>{2, 5, 2}));
  // The fast stage would take 4 but its memory holds 3.
  EXPECT_EQ(*splitLayers(6, {2, 1}, {3, 0}), (std::vector<int64_t>{3, 3}));
  // The head costs the last stage one layer's time.
  EXPECT_EQ(*splitLayers(5, {1, 1}, {}, 0.0, 1.0), (std::vector<int64_t>{3, 2}));
  EXPECT_FALSE(splitLayers(2, {1, 1, 1}).isOk());
  EXPECT_FALSE(splitLayers(6, {1, 1}, {2, 2}).isOk());
  EXPECT_EQ(*placeExperts(8, {3, 1}), (std::vector<int64_t>{6, 2}));
  EXPECT_EQ(*placeExperts(4, {1, 1}), (std::vector<int64_t>{2, 2}));
}

core::ModelConfig tinyModel(int64_t experts) {
  core::ModelConfig c;
  c.vocab_size = 50;
  c.dim = 16;
  c.n_layers = 3;
  c.n_heads = 2;
  c.max_seq_len = 8;
  c.moe.num_experts = experts;
  c.moe.every = 2;
  c.moe.balance = "aux_loss";
  return *model::resolveModelConfig(c);
}

TEST(Pipeline, StagesHoldTheFullModelsTensorsAndChainToItsLoss) {
  for (int64_t experts : {0, 4}) {
    auto c = tinyModel(experts);
    model::Transformer full(c, 7);
    // The layout helper lists exactly the full model's parameters.
    auto layout = model::parameterLayout(c);
    auto named = full->namedParameters();
    ASSERT_EQ(layout.size(), named.size());
    for (size_t i = 0; i < named.size(); ++i) {
      EXPECT_EQ(layout[i].first, named[i].first);
      EXPECT_EQ(layout[i].second, named[i].second.sizes().vec());
    }
    // Three stages [1, 1, 1] and an expert split [1, 3) hold the same tensors, same values.
    std::map<std::string, torch::Tensor> ref(named.begin(), named.end());
    std::vector<model::Transformer> stages;
    std::set<std::string> seen;
    for (int64_t s = 0; s < 3; ++s) {
      model::ModelShard sh;
      sh.layer_begin = s;
      sh.layer_end = s + 1;
      stages.emplace_back(c, 7, sh);
      for (auto& [n, t] : stages.back()->namedParameters()) {
        ASSERT_TRUE(ref.count(n)) << n;
        EXPECT_TRUE(torch::equal(t, ref[n])) << n;
        seen.insert(n);
      }
    }
    EXPECT_EQ(seen.size(), ref.size());
    if (experts > 0) {
      model::ModelShard sh;
      sh.expert_begin = 1;
      sh.expert_end = 3;
      model::Transformer part(c, 7, sh);
      for (auto& [n, t] : part->namedParameters()) {
        ASSERT_TRUE(ref.count(n)) << n;
        EXPECT_TRUE(torch::equal(t, ref[n])) << n;
        EXPECT_THAT(n, ::testing::Not(HasSubstr("experts.0.")));
        EXPECT_THAT(n, ::testing::Not(HasSubstr("experts.3.")));
      }
    }
    // Chained stage forwards give the full model's loss (aux included), and
    // backward through the chain gives its gradients.
    auto ids = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
    auto tgt = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
    auto lr = full->lossAndStats(ids, tgt);
    torch::Tensor h = stages[0]->stageForward(ids);
    torch::Tensor aux = stages[0]->localAuxLoss();
    h = stages[1]->stageForward(h);
    aux = aux + stages[1]->localAuxLoss();
    h = stages[2]->stageForward(h);
    auto ls = stages[2]->headLoss(h, tgt);
    aux = aux + ls.aux_loss;
    EXPECT_NEAR(ls.ce_sum.item<double>(), lr.ce_sum.item<double>(), 1e-5 * std::abs(lr.ce_sum.item<double>()));
    EXPECT_NEAR(aux.item<double>(), lr.aux_loss.item<double>(), 1e-6);
    (lr.ce_sum / 16.0 + lr.aux_loss).backward();
    (ls.ce_sum / 16.0 + aux).backward();
    for (auto& st : stages) {
      for (auto& [n, t] : st->namedParameters()) {
        ASSERT_TRUE(t.grad().defined()) << n;
        EXPECT_TRUE(torch::allclose(t.grad(), ref[n].grad(), 1e-4, 1e-6)) << n;
      }
    }
  }
}

TEST(Pipeline, LayoutComputesUnevenSplitFromSpeed) {
  auto job = loadJobText(
      "cluster:\n  islands:\n    - {name: a, count: 1}\n    - {name: b, count: 1, slowdown: 3}\n"
      "model: {vocab_size: 64, dim: 32, n_layers: 8, n_heads: 2, max_seq_len: 32}\n"
      "data: {dir: " + tinyDataDir().string() + ", seq_len: 32}\n"
      "strategy: {pipeline_stages: 2}\nrun_dir: " + (scratchRoot() / "lay").string() + "\n",
      "layout");
  auto lay = parallelLayout(job);
  ASSERT_TRUE(lay.isOk()) << lay.status().toString();
  EXPECT_EQ(lay->stage_layers, (std::vector<int64_t>{6, 2}));  // 3x faster stage, a small head
  EXPECT_EQ(lay->replicas, 1);
}

TEST(Pipeline, BadSplitsAreRejectedNamingTheField) {
  auto bad = [](const std::string& strategy, const std::string& model_extra, const std::string& want) {
    fs::path p = scratchRoot() / "bad_pp.yaml";
    std::ofstream(p) << "cluster:\n  islands:\n    - {name: a, count: 3}\n"
                     << "model: {dim: 32, n_layers: 4, n_heads: 2, max_seq_len: 32" << model_extra << "}\n"
                     << "data: {dir: x, seq_len: 32}\nstrategy: " << strategy << "\nrun_dir: y\n";
    auto j = core::loadJob(p.string());
    ASSERT_FALSE(j.isOk()) << strategy;
    EXPECT_THAT(j.status().message(), HasSubstr(want)) << strategy;
  };
  bad("{pipeline_stages: 2}", "", "strategy.pipeline_stages");                            // 2 does not divide 3
  bad("{pipeline_stages: 3, stage_layers: [2, 1, 2]}", "", "strategy.stage_layers");     // sums to 5
  bad("{pipeline_stages: 3}", ", tie_embeddings: true", "model.tie_embeddings");
  bad("{pipeline_stages: 3, expert_parallel: 2}", ", moe: {num_experts: 2}", "strategy.expert_parallel");  // 1 pipeline
  bad("{expert_parallel: 3}", ", moe: {num_experts: 2}", "strategy.expert_parallel");
  bad("{expert_parallel: 3, expert_counts: [1, 1]}", ", moe: {num_experts: 4}", "strategy.expert_counts");
}

TEST(Pipeline, LayoutPlacesExpertGroupsOverPipelinesAndKeepsDilocoBlocksOnIslands) {
  auto job = loadJobText(
      "cluster:\n  islands:\n    - {name: a, count: 4}\n    - {name: b, count: 4}\n"
      "model: {vocab_size: 64, dim: 32, n_layers: 4, n_heads: 2, max_seq_len: 32, moe: {num_experts: 4}}\n"
      "data: {dir: " + tinyDataDir().string() + ", seq_len: 32}\n"
      "strategy: {pipeline_stages: 2, expert_parallel: 2, kind: diloco}\nrun_dir: " + (scratchRoot() / "lay_ppep").string() + "\n",
      "layout_ppep");
  auto lay = parallelLayout(job);
  ASSERT_TRUE(lay.isOk()) << lay.status().toString();
  EXPECT_EQ(lay->replicas, 4);
  // Rank 5 = stage 1 of pipeline 2 = member 0 of expert group 1.
  EXPECT_EQ(lay->stageOf(5), 1);
  EXPECT_EQ(lay->replicaOf(5), 2);
  EXPECT_EQ(lay->epMemberOf(5), 0);
  EXPECT_EQ(lay->epGroupOf(5), 1);
  EXPECT_EQ(lay->epMemberOf(3), 1);
  EXPECT_EQ(lay->expert_begin, (std::vector<int64_t>{0, 2, 4}));
  // With DiLoCo an expert group of pipelines (4 ranks here) must not straddle two islands.
  job.cluster.islands[0].count = 2;
  job.cluster.islands[1].count = 6;
  auto bad = parallelLayout(job);
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("strategy.kind"));
}

// ---- multi-process runs against the single-process reference -------------------

TEST(Pipeline, TwoAndThreeUnevenStagesMatchSingleProcess) {
  auto ref = reference("pp_ref", kSteps, "");
  ASSERT_EQ(ref.size(), static_cast<size_t>(kSteps));
  // PP=2 (speed-derived split) with activation recomputation.
  fs::path run2 = scratchRoot() / "pp2";
  ASSERT_EQ(testutil::runTrain(jobYaml(run2, "    - {name: a, count: 2}", kSteps, "", "{pipeline_stages: 2}",
                                       ", recompute: true"),
                               "pp2"),
            0)
      << outputOf("pp2");
  expectCurve(run2, ref, 1, kSteps, kTol, "PP=2");
  // PP=3, uneven [2, 1, 1], the last stage on another island behind an emulated strait.
  fs::path run3 = scratchRoot() / "pp3";
  std::string islands3 = "    - {name: a, count: 2}\n    - {name: b, count: 1}\n"
                         "  straits: [{a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}]";
  ASSERT_EQ(testutil::runTrain(jobYaml(run3, islands3, kSteps, "", "{pipeline_stages: 3, stage_layers: [2, 1, 1]}"),
                               "pp3"),
            0)
      << outputOf("pp3");
  expectCurve(run3, ref, 1, kSteps, kTol, "PP=3");
  // The report lines: per-stage busy time and bubble, and the trace shows the schedule.
  auto pl = testutil::metricLines(run3, "pipeline");
  ASSERT_FALSE(pl.empty());
  EXPECT_EQ(pl.back()["busy_s"].size(), 3u);
  EXPECT_EQ(pl.back()["micro_batches"].get<int>(), 4);
  EXPECT_NEAR(pl.back()["bubble_1f1b_theory"].get<double>(), 2.0 / 6.0, 1e-12);
  for (double b : pl.back()["bubble"]) EXPECT_GE(b, 0.0);
  std::ifstream tf(run3 / "trace.json");
  std::string trace((std::istreambuf_iterator<char>(tf)), std::istreambuf_iterator<char>());
  EXPECT_THAT(trace, HasSubstr("\"F3\""));
  EXPECT_THAT(trace, HasSubstr("\"B3\""));
}

TEST(Pipeline, TwoPipelinesWithUnevenSharesMatchSingleProcess) {
  auto ref = reference("pp_dp_ref", kSteps, "");
  // 2 pipelines x 2 stages; shares 6:2 between the pipelines (global batch 8).
  fs::path run = scratchRoot() / "pp_dp";
  std::string yaml = jobYaml(run, "    - {name: a, count: 4}", kSteps, "", "{pipeline_stages: 2}");
  yaml.replace(yaml.find("rebalance: false"), 16, "rebalance: false, shares: [3, 3, 1, 1]");
  ASSERT_EQ(testutil::runTrain(yaml, "pp_dp"), 0) << outputOf("pp_dp");
  expectCurve(run, ref, 1, kSteps, kTol, "2 pipelines");
  EXPECT_EQ(testutil::samplesByRank(run), (std::map<int, int64_t>{{0, 6}, {1, 6}, {2, 2}, {3, 2}}));
}

TEST(ExpertParallel, TwoMembersWithUnevenExpertsMatchSingleProcess) {
  // Router-bias balancing sums the load over ranks, so the split run is the
  // single-process run exactly (an aux loss per rank's micro-batch would not be).
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  auto ref = reference("ep_ref", kSteps, moe);
  fs::path run = scratchRoot() / "ep2";
  ASSERT_EQ(testutil::runTrain(jobYaml(run, "    - {name: a, count: 2}", kSteps, moe,
                                       "{expert_parallel: 2, expert_counts: [3, 1]}"),
                               "ep2"),
            0)
      << outputOf("ep2");
  expectCurve(run, ref, 1, kSteps, kTol, "EP=2");
  auto ml = testutil::metricLines(run, "moe");
  ASSERT_FALSE(ml.empty());
  int64_t sum = 0;
  for (auto c : ml.back()["tokens_per_expert"]) sum += c.get<int64_t>();
  EXPECT_EQ(sum, 2 * 2 * 32 * 2);  // the last micro-batch (2 samples x 32 tokens) of both ranks, top-2
  EXPECT_GT(ml.back()["dispatch_bytes"].get<int64_t>(), 0);
}

TEST(PipelineExpertParallel, TwoStagesTimesTwoExpertMembersMatchSingleProcess) {
  // 4 workers: pipelines {0,1} and {2,3}; in each stage the two pipelines'
  // ranks ({0,2} and {1,3}) form the expert group, experts split [3, 1].
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  auto ref = reference("ppep_ref", kSteps, moe);
  fs::path run = scratchRoot() / "ppep";
  ASSERT_EQ(testutil::runTrain(jobYaml(run, "    - {name: a, count: 4}", kSteps, moe,
                                       "{pipeline_stages: 2, expert_parallel: 2, expert_counts: [3, 1]}"),
                               "ppep"),
            0)
      << outputOf("ppep");
  expectCurve(run, ref, 1, kSteps, kTol, "PP=2 x EP=2");
  auto ml = testutil::metricLines(run, "moe");
  ASSERT_FALSE(ml.empty());
  EXPECT_GT(ml.back()["dispatch_bytes"].get<int64_t>(), 0);
  int64_t sum = 0;
  for (auto c : ml.back()["tokens_per_expert"]) sum += c.get<int64_t>();
  EXPECT_EQ(sum, 2 * 2 * 32 * 2);  // both pipelines' last micro-batch (2 samples x 32 tokens), top-2
}

TEST(Pipeline, DilocoOverTwoIslandsOfPipelinesEqualsSyncAndKeepsStagesIdentical) {
  const char* islands = "    - {name: east, count: 2}\n    - {name: west, count: 2}\n"
                        "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  const auto ref = testutil::sgdDilocoReference("ppdl_ref", kSteps);
  ASSERT_FALSE(ref.empty());
  fs::path run = scratchRoot() / "ppdl";
  ASSERT_EQ(testutil::runTrain(sgdDiloco(jobYaml(run, islands, kSteps, "",
                                                 "{pipeline_stages: 2, kind: diloco, inner_steps: 1, outer_lr: 1.0, "
                                                 "outer_momentum: 0.0, nesterov: false}")),
                               "ppdl"),
            0)
      << outputOf("ppdl");
  expectCurve(run, ref, 1, kSteps, 2e-4, "PP=2 x 2 islands, DiLoCo H=1");
  // Every outer step: stage 0 of both islands (ranks 0, 2) and stage 1
  // (ranks 1, 3) hold bit-identical anchors and momenta.
  testutil::expectOuterDigestsPaired(run, kSteps, {{0, 2}, {1, 3}}, "PP=2 x 2 islands");
}

TEST(Pipeline, StreamingOverTwoIslandsOfPipelinesEqualsSyncAndKeepsStagesIdentical) {
  // Streaming DiLoCo cuts each stage's own tensors into fragments; with
  // H = 1 every fragment is synced after every step (offsets 0), so the
  // identity settings again give synchronous SGD.
  const char* islands = "    - {name: east, count: 2}\n    - {name: west, count: 2}\n"
                        "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  const int steps = 10;
  const auto ref = testutil::sgdDilocoReference("ppst_ref", steps);
  ASSERT_FALSE(ref.empty());
  fs::path run = scratchRoot() / "ppst";
  ASSERT_EQ(testutil::runTrain(sgdDiloco(jobYaml(run, islands, steps, "",
                                                 "{pipeline_stages: 2, kind: streaming, fragments: 2, overlap_steps: 0, "
                                                 "inner_steps: 1, outer_lr: 1.0, outer_momentum: 0.0, nesterov: false}")),
                               "ppst"),
            0)
      << outputOf("ppst");
  expectCurve(run, ref, 1, steps, 2e-4, "PP=2 x 2 islands, streaming H=1");
  std::map<std::pair<int64_t, int>, std::map<int, std::string>> digests;  // (sent_step, fragment) -> rank -> digest
  for (const auto& j : testutil::metricLines(run, "outer")) {
    digests[{j["sent_step"].get<int64_t>(), j["fragment"].get<int>()}][j["rank"].get<int>()] = j["digest"].get<std::string>();
  }
  ASSERT_GE(digests.size(), static_cast<size_t>(steps)) << outputOf("ppst");
  for (const auto& [key, by_rank] : digests) {
    ASSERT_EQ(by_rank.size(), 4u) << "sent_step " << key.first << " fragment " << key.second;
    EXPECT_EQ(by_rank.at(0), by_rank.at(2)) << "stage 0, sent_step " << key.first;
    EXPECT_EQ(by_rank.at(1), by_rank.at(3)) << "stage 1, sent_step " << key.first;
  }
}

TEST(ExpertParallel, DilocoOverTwoIslandsOfExpertGroupsEqualsSync) {
  // EP=2 inside each of two islands: the outer groups are {0, 2} (dense
  // part + experts [0, 3)) and {1, 3} (dense part + expert 3); both must
  // apply the same outer step to the replicated tensors. No balancing term
  // (router biases stay per island under DiLoCo, as with data parallelism).
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: none}";
  const char* islands = "    - {name: east, count: 2}\n    - {name: west, count: 2}\n"
                        "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  const auto ref = testutil::sgdDilocoReference("epdl_ref", kSteps, moe);
  ASSERT_FALSE(ref.empty());
  fs::path run = scratchRoot() / "epdl";
  ASSERT_EQ(testutil::runTrain(sgdDiloco(jobYaml(run, islands, kSteps, moe,
                                                 "{expert_parallel: 2, expert_counts: [3, 1], kind: diloco, inner_steps: 1, "
                                                 "outer_lr: 1.0, outer_momentum: 0.0, nesterov: false}")),
                               "epdl"),
            0)
      << outputOf("epdl");
  expectCurve(run, ref, 1, kSteps, 2e-4, "EP=2 x 2 islands, DiLoCo H=1");
  std::map<int64_t, std::map<int, std::string>> digests;
  for (const auto& j : testutil::metricLines(run, "outer")) {
    digests[j["sent_step"].get<int64_t>()][j["rank"].get<int>()] = j["digest"].get<std::string>();
  }
  ASSERT_EQ(digests.size(), static_cast<size_t>(kSteps)) << outputOf("epdl");
  for (const auto& [step, by_rank] : digests) {
    ASSERT_EQ(by_rank.size(), 4u) << "sent_step " << step;
    EXPECT_EQ(by_rank.at(0), by_rank.at(2)) << "member 0, sent_step " << step;
    EXPECT_EQ(by_rank.at(1), by_rank.at(3)) << "member 1, sent_step " << step;
  }
}

TEST(Pipeline, DilocoOuterStateResumesInTheSingleProcessLayout) {
  // DiLoCo H=2 with outer momentum: PP=2 with layers [3, 1] on each of two
  // islands, cut at step 6 (a round boundary), resumed with layers [1, 3]
  // and by the data-parallel trainer (one worker per island): the anchor and
  // outer momentum are saved in full-model order and loaded by name, so both
  // continue the uninterrupted run's curve.
  // Inner SGD: the inner AdamW moments differ per island under DiLoCo and
  // the checkpoint keeps island 0's (as with data parallelism).
  const int steps = 12, k = 6;
  const char* islands4 = "    - {name: east, count: 2}\n    - {name: west, count: 2}\n"
                         "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  const std::string diloco = "kind: diloco, inner_steps: 2, outer_lr: 0.7, outer_momentum: 0.9";
  fs::path whole = scratchRoot() / "pprs_whole";
  ASSERT_EQ(testutil::runTrain(sgdDiloco(jobYaml(whole, islands4, steps, "", "{pipeline_stages: 2, stage_layers: [3, 1], " + diloco + "}")),
                               "pprs_whole"),
            0)
      << outputOf("pprs_whole");
  auto ref_map = testutil::rank0Losses(whole);
  std::vector<double> ref;
  for (int s = 1; s <= steps; ++s) ref.push_back(ref_map[s]);
  fs::path cut = scratchRoot() / "pprs_cut";
  std::string yaml = sgdDiloco(jobYaml(cut, islands4, steps, "", "{pipeline_stages: 2, stage_layers: [3, 1], " + diloco + "}"));
  yaml.replace(yaml.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(yaml, "pprs_cut", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(cut / "checkpoints" / checkpointDirName(k))) << outputOf("pprs_cut");
  auto ck = loadCheckpoint((cut / "checkpoints" / checkpointDirName(k)).string());
  ASSERT_TRUE(ck.isOk()) << ck.status().toString();
  std::map<std::string, torch::Tensor> opt(ck->optimizer.begin(), ck->optimizer.end());
  ASSERT_TRUE(opt.count("outer.anchor") && opt.count("outer.momentum"));
  EXPECT_EQ(opt["outer.anchor"].numel(), opt["exp_avg"].numel());
  // At a round boundary the parameters are the anchor (full-model order).
  std::map<std::string, torch::Tensor> weights(ck->weights.begin(), ck->weights.end());
  int64_t off = 0;
  for (const auto& [name, shape] : model::parameterLayout(checkpointModel(*ck))) {
    ASSERT_TRUE(weights.count(name)) << name;
    const int64_t n = weights[name].numel();
    EXPECT_TRUE(torch::equal(weights[name].reshape({-1}), opt["outer.anchor"].narrow(0, off, n))) << name;
    off += n;
  }
  EXPECT_EQ(off, opt["outer.anchor"].numel());
  EXPECT_GT(opt["outer.momentum"].abs().max().item<double>(), 0.0);
  fs::path run = scratchRoot() / "pprs_13";
  fs::create_directories(run);
  fs::copy(cut / "checkpoints", run / "checkpoints", fs::copy_options::recursive);
  ASSERT_EQ(testutil::runTrain(sgdDiloco(jobYaml(run, islands4, steps, "", "{pipeline_stages: 2, stage_layers: [1, 3], " + diloco + "}")),
                               "pprs_13", {"--resume"}),
            0)
      << outputOf("pprs_13");
  expectCurve(run, ref, k + 1, steps, kTol, "DiLoCo PP=2 resumed at layers [1, 3]");
  const char* islands2 = "    - {name: east, count: 1}\n    - {name: west, count: 1}\n"
                         "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  fs::path dp = scratchRoot() / "pprs_dp";
  fs::create_directories(dp);
  fs::copy(cut / "checkpoints", dp / "checkpoints", fs::copy_options::recursive);
  ASSERT_EQ(testutil::runTrain(sgdDiloco(jobYaml(dp, islands2, steps, "", "{" + diloco + "}")), "pprs_dp", {"--resume"}), 0)
      << outputOf("pprs_dp");
  expectCurve(dp, ref, k + 1, steps, kTol, "DiLoCo PP=2 resumed by the data-parallel trainer");
}

TEST(ExpertParallel, CapacityDropsAreCountedAndBf16DispatchTrains) {
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, capacity_factor: 0.5}";
  auto ref = reference("ep_cap_ref", 10, moe);
  fs::path run = scratchRoot() / "ep_cap";
  ASSERT_EQ(testutil::runTrain(jobYaml(run, "    - {name: a, count: 2}", 10, moe,
                                       "{expert_parallel: 2, dispatch_codec: bf16}"),
                               "ep_cap"),
            0)
      << outputOf("ep_cap");
  auto ml = testutil::metricLines(run, "moe");
  ASSERT_FALSE(ml.empty());
  EXPECT_GT(ml.back()["dropped"].get<int64_t>(), 0);
  // Capacity per rank's micro-batch and bf16 rows change the numbers a little, not the curve.
  auto losses = testutil::rank0Losses(run);
  ASSERT_EQ(losses.size(), 10u);
  EXPECT_NEAR(losses[10], ref[9], 0.03 * ref[9]);
}

TEST(Pipeline, SavedAtTwoStagesResumesAtOneAndThree) {
  const int steps = 12, k = 6;  // cut half-way
  auto ref = reference("rs_ref", steps, "");
  fs::path cut = scratchRoot() / "rs_pp2";
  std::string yaml = jobYaml(cut, "    - {name: a, count: 2}", steps, "", "{pipeline_stages: 2, stage_layers: [3, 1]}");
  yaml.replace(yaml.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(yaml, "rs_pp2", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(cut / "checkpoints" / checkpointDirName(k))) << outputOf("rs_pp2");
  expectCurve(cut, ref, 1, k, kTol, "PP=2 before the cut");
  // The checkpoint is in the single-process layout.
  auto ck = loadCheckpoint((cut / "checkpoints" / checkpointDirName(k)).string());
  ASSERT_TRUE(ck.isOk()) << ck.status().toString();
  // The model the job describes (the checkpoint's state.json keeps the job file).
  const core::ModelConfig mc = checkpointModel(*ck);
  auto full = model::buildModel(mc, 0);
  ASSERT_TRUE(full.isOk()) << full.status().toString();
  std::set<std::string> want, got;
  for (auto& [n, t] : (*full)->namedParameters()) want.insert(n);
  for (auto& [n, t] : ck->weights) got.insert(n);
  EXPECT_EQ(got, want);
  std::map<std::string, torch::Tensor> opt(ck->optimizer.begin(), ck->optimizer.end());
  EXPECT_EQ(opt["exp_avg"].numel(), (*full)->numParameters());
  for (const auto& [islands, strategy, name] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"    - {name: a, count: 1}", "{kind: sync}", "rs_pp1"},
           {"    - {name: a, count: 3}", "{pipeline_stages: 3, stage_layers: [1, 2, 1]}", "rs_pp3"}}) {
    fs::path run = scratchRoot() / name;
    fs::create_directories(run);
    fs::copy(cut / "checkpoints", run / "checkpoints", fs::copy_options::recursive);
    ASSERT_EQ(testutil::runTrain(jobYaml(run, islands, steps, "", strategy), name, {"--resume"}), 0) << outputOf(name);
    expectCurve(run, ref, k + 1, steps, kTol, name);
  }
}

}  // namespace
}  // namespace archipelago::runtime
