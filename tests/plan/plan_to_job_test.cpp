// From plan to run (plan/plan_to_job.h): the overrides a plan turns into,
// checked against the plan's own fields, and the job they make passes the
// job check (or, for what the runtime cannot run, the refusal names why).
// A plan run end to end through the binary is in
// tests/runtime/plan_run_test.cpp.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/core/config.h"
#include "archipelago/plan/plan_to_job.h"

namespace archipelago::plan {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;

// One group: `dp` replicas of `tp` x pipelines whose stages hold
// `layers[s]` decoder layers (the embedding on the first, the head on the last).
GroupPlan group(std::vector<int> islands, int64_t tp, const std::vector<int64_t>& layers, int64_t dp, int zero = 1) {
  GroupPlan g;
  g.islands = islands;
  g.tp.assign(islands.size(), tp);
  g.pp = {static_cast<int64_t>(layers.size())};
  if (islands.size() > 1) g.pp.assign(islands.size(), static_cast<int64_t>(layers.size()) / 2);
  g.dp = dp;
  g.micro_batch = 2;
  g.zero = zero;
  int64_t item = 0;
  for (size_t s = 0; s < layers.size(); ++s) {
    StagePlan st;
    st.first_item = item;
    st.num_items = layers[s] + (s == 0 ? 1 : 0) + (s + 1 == layers.size() ? 1 : 0);
    item += st.num_items;
    g.stages.push_back(st);
  }
  return g;
}

core::JobConfig job(int workers, int64_t n_layers = 4) {
  core::JobConfig j;
  core::IslandSpec isl;
  isl.name = "a";
  isl.count = workers;
  j.cluster.islands = {isl};
  j.model.n_layers = n_layers;
  j.train.global_batch = 8;
  j.data.seq_len = 32;
  return j;
}

// A small job over `islands` (YAML flow list) loaded with `sets` as --set
// overrides: what `archipelago train JOB --plan` would run.
core::Result<core::LoadedJob> loadWith(const std::string& islands, const std::vector<std::string>& sets) {
  const auto file = std::filesystem::temp_directory_path() / "plan_to_job_test.yaml";
  std::ofstream(file) << "cluster: {islands: " << islands << "}\n"
                      << "model: {dim: 32, n_layers: 4, n_heads: 2, max_seq_len: 32}\n"
                         "data: {dir: /nonexistent, seq_len: 32}\n"
                         "train: {steps: 2, global_batch: 8}\n";
  core::LoadOptions lo;
  lo.sets = sets;
  lo.use_process_env = false;
  auto loaded = core::loadJob(file.string(), lo);
  std::filesystem::remove(file);
  return loaded;
}

Plan planOf(std::vector<GroupPlan> groups) {
  Plan p;
  p.groups = std::move(groups);
  p.setup.global_batch_tokens = 8 * 32;
  return p;
}

TEST(PlanToJob, TensorAndPipelineParallelismBecomeTheJobsStrategy) {
  auto ov = jobOverrides(planOf({group({0}, 2, {3, 1}, 1)}), job(4));
  ASSERT_TRUE(ov.isOk()) << ov.status().toString();
  for (const char* want : {"strategy.tensor_parallel=2", "strategy.pipeline_stages=2", "strategy.stage_layers=3,1",
                           "strategy.expert_parallel=1", "strategy.sequence_parallel=true", "train.micro_batch=2",
                           "train.zero=1", "strategy.kind=sync"}) {
    EXPECT_THAT(ov->sets, Contains(std::string(want)));
  }
  EXPECT_TRUE(ov->notes.empty());
  // ZeRO-3 runs as planned with tensor and sequence parallelism, and over
  // the replicas of pipeline stages.
  auto z3 = jobOverrides(planOf({group({0}, 2, {3, 1}, 1, 3)}), job(4));
  ASSERT_TRUE(z3.isOk());
  EXPECT_THAT(z3->sets, Contains(std::string("train.zero=3")));
  EXPECT_THAT(z3->sets, Contains(std::string("strategy.sequence_parallel=true")));
  EXPECT_TRUE(z3->notes.empty());
  auto z3pp = jobOverrides(planOf({group({0}, 1, {3, 1}, 2, 3)}), job(4));
  ASSERT_TRUE(z3pp.isOk()) << z3pp.status().toString();
  EXPECT_THAT(z3pp->sets, Contains(std::string("train.zero=3")));
  EXPECT_THAT(z3pp->sets, Contains(std::string("strategy.pipeline_stages=2")));
  EXPECT_TRUE(z3pp->notes.empty());
  // Expert parallelism shards optimizer state and gradients (ZeRO-1/2) and
  // parameters (ZeRO-3) as planned.
  GroupPlan ep1 = group({0}, 1, {4}, 2, 1), ep3 = group({0}, 1, {4}, 2, 3);  // 2 x EP2: 4 devices
  ep1.ep = ep3.ep = 2;
  auto zep1 = jobOverrides(planOf({ep1}), job(4));
  ASSERT_TRUE(zep1.isOk()) << zep1.status().toString();
  EXPECT_THAT(zep1->sets, Contains(std::string("train.zero=1")));
  EXPECT_TRUE(zep1->notes.empty());
  auto zep3 = jobOverrides(planOf({ep3}), job(4));
  ASSERT_TRUE(zep3.isOk()) << zep3.status().toString();
  EXPECT_THAT(zep3->sets, Contains(std::string("train.zero=3")));
  EXPECT_TRUE(zep3->notes.empty());
  // A MoE model under TP x EP: sequence parallelism as priced, except with
  // ZeRO-3 (said).
  core::JobConfig moe = job(8);
  moe.model.moe.num_experts = 4;
  GroupPlan tpep2 = group({0}, 2, {4}, 2, 2), tpep3 = group({0}, 2, {4}, 2, 3);  // 2 x EP2 x TP2: 8 devices
  tpep2.ep = tpep3.ep = 2;
  auto sp2 = jobOverrides(planOf({tpep2}), moe);
  ASSERT_TRUE(sp2.isOk()) << sp2.status().toString();
  EXPECT_THAT(sp2->sets, Contains(std::string("strategy.sequence_parallel=true")));
  EXPECT_TRUE(sp2->notes.empty());
  auto sp3 = jobOverrides(planOf({tpep3}), moe);
  ASSERT_TRUE(sp3.isOk()) << sp3.status().toString();
  EXPECT_THAT(sp3->sets, ::testing::Not(Contains(std::string("strategy.sequence_parallel=true"))));
  EXPECT_THAT(sp3->notes, Contains(HasSubstr("sequence parallelism is off")));

  // The job those overrides make passes the job check.
  auto loaded = loadWith("[{name: a, count: 4}]", ov->sets);
  ASSERT_TRUE(loaded.isOk()) << loaded.status().toString();
  EXPECT_EQ(loaded->job.strategy.tensor_parallel, 2);
  EXPECT_EQ(loaded->job.strategy.stage_layers, (std::vector<int64_t>{3, 1}));
}

TEST(PlanToJob, DataParallelPlansKeepTheirZeroStageAndCrossIslandStrategy) {
  auto sync = jobOverrides(planOf({group({0}, 1, {4}, 4, 3)}), job(4));
  ASSERT_TRUE(sync.isOk()) << sync.status().toString();
  EXPECT_THAT(sync->sets, Contains(std::string("train.zero=3")));
  EXPECT_THAT(sync->sets, Contains(std::string("strategy.pipeline_stages=1")));
  EXPECT_TRUE(sync->notes.empty());

  Plan diloco = planOf({group({0}, 1, {4}, 2, 0), group({1}, 1, {4}, 2, 0)});
  diloco.strategy = "diloco";
  diloco.diloco_h = 25;
  diloco.codec = "int8";
  auto d = jobOverrides(diloco, job(4));
  ASSERT_TRUE(d.isOk()) << d.status().toString();
  for (const char* want : {"strategy.kind=diloco", "strategy.inner_steps=25", "strategy.codec=int8"}) {
    EXPECT_THAT(d->sets, Contains(std::string(want)));
  }
  // Another batch than the job's: the job keeps its own, and says so.
  diloco.setup.global_batch_tokens = 1 << 20;
  auto b = jobOverrides(diloco, job(4));
  ASSERT_TRUE(b.isOk());
  EXPECT_THAT(b->notes, Contains(HasSubstr("priced at 1048576 tokens")));
}

// Two islands of 2 workers: a and b.
core::JobConfig twoIslandJob() {
  core::JobConfig j = job(2);
  j.cluster.islands.push_back(j.cluster.islands[0]);
  j.cluster.islands[1].name = "b";
  return j;
}

TEST(PlanToJob, GroupsOfDifferentLayoutsBecomeEachIslandsLayout) {
  Plan p = planOf({group({0}, 2, {4}, 1), group({1}, 1, {3, 1}, 1)});
  p.groups[1].micro_batch = 1;
  p.codec = "int8";
  auto ov = jobOverrides(p, twoIslandJob());
  ASSERT_TRUE(ov.isOk()) << ov.status().toString();
  for (const char* want : {"cluster.islands[0].tensor_parallel=2", "cluster.islands[0].pipeline_stages=1",
                           "cluster.islands[1].tensor_parallel=1", "cluster.islands[1].pipeline_stages=2",
                           "cluster.islands[1].stage_layers=3,1", "strategy.tensor_parallel=1",
                           "strategy.sequence_parallel=true", "train.micro_batch=1", "train.zero=1",
                           "strategy.kind=sync", "strategy.codec=none"}) {
    EXPECT_THAT(ov->sets, Contains(std::string(want)));
  }
  EXPECT_THAT(ov->notes, Contains(HasSubstr("micro-batches differ")));
  EXPECT_TRUE(std::none_of(ov->notes.begin(), ov->notes.end(), [](const std::string& n) { return n.find("zero=") == 0; }));
  EXPECT_THAT(ov->notes, Contains(HasSubstr("fp32")));
  // The job those overrides make passes the job check with each island's layout.
  auto loaded = loadWith("[{name: a, count: 2}, {name: b, count: 2}]", ov->sets);
  ASSERT_TRUE(loaded.isOk()) << loaded.status().toString();
  EXPECT_EQ(loaded->job.cluster.islands[0].tensor_parallel, 2);
  EXPECT_EQ(loaded->job.cluster.islands[1].stage_layers, (std::vector<int64_t>{3, 1}));
  // Under DiLoCo: its H, and no codec.
  p.strategy = "diloco";
  p.diloco_h = 20;
  auto dl = jobOverrides(p, twoIslandJob());
  ASSERT_TRUE(dl.isOk()) << dl.status().toString();
  EXPECT_THAT(dl->sets, Contains(std::string("strategy.kind=diloco")));
  EXPECT_THAT(dl->sets, Contains(std::string("strategy.inner_steps=20")));
  EXPECT_THAT(dl->notes, Contains(HasSubstr("pseudo-gradient mean")));
  // ZeRO: at most 2 (optimizer state and gradients), and only as far as every group shards, said.
  p.groups[0].zero = 3;
  auto z = jobOverrides(p, twoIslandJob());
  ASSERT_TRUE(z.isOk());
  EXPECT_THAT(z->sets, Contains(std::string("train.zero=1")));  // the other group shards only the optimizer state
  EXPECT_THAT(z->notes, Contains(HasSubstr("zero=3 runs as 1")));
  p.groups[1].zero = 2;
  auto z2 = jobOverrides(p, twoIslandJob());
  ASSERT_TRUE(z2.isOk());
  EXPECT_THAT(z2->sets, Contains(std::string("train.zero=2")));
  EXPECT_THAT(z2->notes, Contains(HasSubstr("zero=3 runs as 2")));
  p.groups[1].zero = 1;
  // DiLoCo's mean crosses in an element-wise codec as planned, a scaled one in fp32 (said).
  p.codec = "bf16";
  auto bf = jobOverrides(p, twoIslandJob());
  ASSERT_TRUE(bf.isOk());
  EXPECT_THAT(bf->sets, Contains(std::string("strategy.codec=bf16")));
  p.codec = "int8";
  // A MoE model: each island's layout replicates the MoE layers, with
  // sequence parallelism, and the job passes the job check.
  core::JobConfig moe = twoIslandJob();
  moe.model.moe.num_experts = 4;
  p.strategy = "sync";
  p.groups[0].zero = 1;
  auto m = jobOverrides(p, moe);
  ASSERT_TRUE(m.isOk()) << m.status().toString();
  EXPECT_THAT(m->sets, Contains(std::string("strategy.sequence_parallel=true")));
  EXPECT_THAT(m->notes, ::testing::Not(Contains(HasSubstr("sequence parallelism is off"))));
  // Expert groups inside each island (one degree for the job): ZeRO-1 at most.
  Plan pe = planOf({group({0}, 2, {4}, 1, 2), group({1}, 1, {4}, 2, 2)});  // 2 x TP2 ... and 4 plain, each ep=2
  pe.groups[0].ep = pe.groups[1].ep = 2;
  core::JobConfig eight = moe;
  eight.cluster.islands[0].count = 4;
  eight.cluster.islands[1].count = 4;
  auto e = jobOverrides(pe, eight);
  ASSERT_TRUE(e.isOk()) << e.status().toString();
  EXPECT_THAT(e->sets, Contains(std::string("strategy.expert_parallel=2")));
  EXPECT_THAT(e->sets, Contains(std::string("train.zero=1")));
  std::vector<std::string> ep_sets = e->sets;
  ep_sets.push_back("model.moe.num_experts=4");
  auto ep_loaded = loadWith("[{name: a, count: 4}, {name: b, count: 4}]", ep_sets);
  ASSERT_TRUE(ep_loaded.isOk()) << ep_loaded.status().toString();
  EXPECT_EQ(ep_loaded->job.strategy.expert_parallel, 2);
  std::vector<std::string> moe_sets = m->sets;
  moe_sets.push_back("model.moe.num_experts=4");
  auto moe_loaded = loadWith("[{name: a, count: 2}, {name: b, count: 2}]", moe_sets);
  ASSERT_TRUE(moe_loaded.isOk()) << moe_loaded.status().toString();
  EXPECT_EQ(moe_loaded->job.model.moe.num_experts, 4);
}

TEST(PlanToJob, RefusesWhatTheRuntimeCannotRunNamingWhy) {
  auto msg = [](const Plan& p, const core::JobConfig& j) {
    auto r = jobOverrides(p, j);
    return r.isOk() ? std::string() : r.status().message();
  };
  // Per-island layouts: an island the job lacks, another device count, EP.
  EXPECT_THAT(msg(planOf({group({0}, 2, {4}, 1), group({1}, 1, {2, 2}, 1)}), job(4)), HasSubstr("another cluster"));
  EXPECT_THAT(msg(planOf({group({0}, 2, {4}, 1), group({1}, 1, {2, 2}, 2)}), twoIslandJob()),
              HasSubstr("cluster.islands[1].count"));
  GroupPlan ep = group({1}, 1, {2, 2}, 1);
  ep.ep = 2;
  EXPECT_THAT(msg(planOf({group({0}, 2, {4}, 1), ep}), twoIslandJob()), HasSubstr("one expert-parallel degree"));
  GroupPlan mixed_tp = group({0, 1}, 2, {2, 2}, 1);
  mixed_tp.tp = {2, 1};
  EXPECT_THAT(msg(planOf({mixed_tp}), job(4)), HasSubstr("per-island layouts"));
  // Another cluster, another model, an interleaved schedule.
  EXPECT_THAT(msg(planOf({group({0}, 1, {4}, 4)}), job(3)), HasSubstr("cluster.islands[*].count"));
  EXPECT_THAT(msg(planOf({group({0}, 1, {4}, 4)}), job(4, 6)), HasSubstr("model.n_layers"));
  GroupPlan vs = group({0}, 1, {2, 2}, 2);
  vs.virtual_stages = 2;
  EXPECT_THAT(msg(planOf({vs}), job(4)), HasSubstr("virtual stages"));
}

}  // namespace
}  // namespace archipelago::plan
