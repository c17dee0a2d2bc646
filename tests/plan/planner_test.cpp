// Planner: parameter counts vs published totals, memory accounting vs hand
// computation, rejection reasons, heterogeneous layer split, thin straits,
// catalog and calibration round trips, and the search time bound.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "archipelago/plan/calibration.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/plan/planner.h"
#include "plan_test_util.h"

namespace archipelago::plan {
namespace {

using testing::catalog;
using testing::island;

TEST(ModelPresets, ParameterCountsMatchPublishedTotals) {
  for (const auto& name : presetNames()) {
    auto m = preset(name);
    ASSERT_TRUE(m.isOk());
    if (m->published_total <= 0) continue;
    EXPECT_NEAR(m->totalParams() / m->published_total, 1.0, 0.02) << name << " total " << m->totalParams();
  }
  // Activated parameters of the MoE models (DeepSeek-V3: 37B; Kimi K2: 32B).
  for (const char* name : {"deepseek-v3", "kimi-k2"}) {
    auto m = preset(name);
    ASSERT_TRUE(m.isOk());
    EXPECT_NEAR(m->activeParams() / m->published_active, 1.0, 0.02) << name << " active " << m->activeParams();
  }
  auto k2 = preset("kimi-k2");
  EXPECT_EQ(k2->num_experts, 384);
  EXPECT_EQ(k2->top_k, 8);
  EXPECT_EQ(k2->n_layers, 61);
}

TEST(ModelPresets, Llama8BByHand) {
  // 32 x (attn 4096*4096*2 + 4096*1024*2 + ffn 3*4096*14336 + 2 norms) + 2 * 128256*4096 + norm.
  const double layer = 4096.0 * 4096 * 2 + 4096.0 * 1024 * 2 + 3.0 * 4096 * 14336 + 2 * 4096;
  const double expect = 32 * layer + 2.0 * 128256 * 4096 + 4096;
  EXPECT_DOUBLE_EQ(preset("llama3-8b")->totalParams(), expect);
}

TEST(CostModel, MemoryAccountingByHand) {
  // One dense layer of a small model on an A100, tp 2: weights 2 B, grads 4 B,
  // optimizer 12 B per parameter; ZeRO-1 shards the 12 B over dp.
  ModelSpec m = *preset("tiny-llama");
  TrainSetup su;
  su.seq_len = 256;
  CostModel cm(m, su);
  const DeviceSpec a100 = *catalog().get("a100");
  StageLinks links{300e9, 25e9, 5e-6};
  const ItemCost c = cm.itemCost(1, a100, links, 2, 1, 4, Recompute::kNone);
  const double layer_params = m.attentionParams() + m.denseFfnParams();
  EXPECT_DOUBLE_EQ(c.params, layer_params / 2);
  EXPECT_DOUBLE_EQ(cm.stateBytes(c.params, c.dense_params, 8, 8, 1), c.params * (2 + 4 + 12.0 / 8));
  EXPECT_DOUBLE_EQ(cm.stateBytes(c.params, c.dense_params, 8, 8, 0), c.params * 18);
  EXPECT_DOUBLE_EQ(cm.stateBytes(c.params, c.dense_params, 8, 8, 3), c.params * 18 / 8);
  // Activations (bytes, tp 2 with sequence parallelism): tokens * (11h + ffn + 4h) / 2,
  // ffn = 2h + 8f + h for SwiGLU; full recomputation keeps only the 2-byte input.
  const double tokens = 4 * 256, h = 128, f = 352;
  EXPECT_DOUBLE_EQ(c.act_bytes, tokens * (11 * h + (2 * h + 8 * f + h) + 4 * h) / 2);
  const ItemCost full = cm.itemCost(1, a100, links, 2, 1, 4, Recompute::kFull);
  EXPECT_DOUBLE_EQ(full.act_bytes, tokens * h * 2 / 2);
  EXPECT_GT(full.bwd_s, c.bwd_s);
  // Model FLOPs: 3 x (2 x weights + 4 s h) per token, split over tp.
  const double weights = m.attentionParams() + m.denseFfnParams();
  EXPECT_NEAR(c.model_flops, 3 * tokens * (2 * weights + 4 * 256 * h) / 2, 1e-6 * c.model_flops);
}

TEST(Planner, InfeasiblePlansRejectedWithReasons) {
  core::ClusterSpec c;
  c.name = "small";
  c.islands.push_back(island("a", "l40s", 16));
  PlanOptions o;
  o.setup.seq_len = 4096;
  o.setup.global_batch_tokens = 64 * 4096;
  auto r = searchPlans(c, *preset("llama3-405b"), catalog(), o);
  ASSERT_FALSE(r.isOk());  // 405B does not fit on 16 x 48 GB at all
  EXPECT_NE(r.status().message().find("memory"), std::string::npos) << r.status().toString();
  // A model that fits: rejected layouts are still counted by reason.
  auto ok = searchPlans(c, *preset("llama3-8b"), catalog(), o);
  ASSERT_TRUE(ok.isOk()) << ok.status().toString();
  EXPECT_GT(ok->rejected.counts.count("memory"), 0u);
  EXPECT_FALSE(ok->rejected.examples["memory"].empty());
  EXPECT_NE(ok->rejected.examples["memory"][0].find("GB"), std::string::npos);
  for (const auto& p : ok->plans) {
    for (const auto& k : p.kinds) EXPECT_LE(k.max_memory_bytes, k.memory_capacity);
  }
  // A fixed layout with too much TP is rejected with its reason.
  FixedLayout L;
  L.islands = {0};
  L.tp = {16};
  L.pp = {1};
  auto bad = evaluateLayout(c, *preset("llama3-8b"), catalog(), o, {L});
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.status().message().find("tp exceeds devices per node"), std::string::npos);
}

TEST(Planner, HeterogeneousPipelinePutsMoreLayersOnFasterDevices) {
  core::ClusterSpec c;
  c.name = "het";
  c.islands.push_back(island("fast", "h100", 8));
  c.islands.push_back(island("slow", "a100", 8));
  core::StraitSpec s;
  s.a = "fast";
  s.b = "slow";
  s.bandwidth = 400e9 / 8;
  s.latency = 1e-4;
  c.straits.push_back(s);
  PlanOptions o;
  o.setup.seq_len = 4096;
  o.setup.global_batch_tokens = 256 * 4096;
  FixedLayout L;
  L.islands = {0, 1};
  L.tp = {8, 8};
  L.pp = {1, 1};
  L.dp = 1;
  L.recompute = Recompute::kFull;
  auto p = evaluateLayout(c, *preset("llama3-8b"), catalog(), o, {L});
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  const auto& st = p->groups[0].stages;
  ASSERT_EQ(st.size(), 2u);
  EXPECT_EQ(st[0].device, "h100");
  EXPECT_GT(st[0].num_items, st[1].num_items + 10);  // ~3x the bf16 FLOP/s
  // Stage times end up close (the point of the uneven split).
  const double t0 = st[0].fwd_s + st[0].bwd_s, t1 = st[1].fwd_s + st[1].bwd_s;
  EXPECT_NEAR(t0 / t1, 1.0, 0.15);
}

TEST(Planner, ThinStraitPrefersDilocoOrIslandLocalPipelines) {
  core::ClusterSpec c;
  c.name = "thin";
  c.islands.push_back(island("a", "h100", 64));
  c.islands.push_back(island("b", "a100", 64));
  core::StraitSpec s;
  s.a = "a";
  s.b = "b";
  s.bandwidth = 10e9 / 8;  // 10 Gbit/s
  s.latency = 0.04;
  c.straits.push_back(s);
  PlanOptions o;
  o.setup.seq_len = 4096;
  o.setup.global_batch_tokens = 512 * 4096;
  auto r = searchPlans(c, *preset("llama3-8b"), catalog(), o);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  const Plan& best = r->plans.front();
  EXPECT_EQ(best.strategy, "diloco") << best.summary;
  for (const auto& g : best.groups) EXPECT_EQ(g.islands.size(), 1u) << best.summary;
  // With a fat strait, per-step sync is cheap enough for auto to keep sync.
  c.straits[0].bandwidth = 3.2e12 / 8;
  c.straits[0].latency = 1e-3;
  auto fat = searchPlans(c, *preset("llama3-8b"), catalog(), o);
  ASSERT_TRUE(fat.isOk());
  EXPECT_NE(fat->plans.front().strategy, "diloco") << fat->plans.front().summary;
}

TEST(Planner, TrillionMoeOnTenThousandDevicesIsFast) {
  const core::ClusterSpec c = testing::triDc(0.03);
  PlanOptions o;
  o.setup.seq_len = 4096;
  o.setup.global_batch_tokens = 16 << 20;
  auto r = searchPlans(c, *preset("kimi-k2"), catalog(), o);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  EXPECT_LT(r->search_s, 10.0);
  EXPECT_LE(r->plans.front().devices, 10240);
  EXPECT_GT(r->plans.front().tokens_per_s, 0);
  // The plan survives a JSON round trip.
  auto back = Plan::fromJson(r->plans.front().toJson());
  ASSERT_TRUE(back.isOk()) << back.status().toString();
  EXPECT_EQ(back->summary, r->plans.front().summary);
  EXPECT_EQ(back->groups.size(), r->plans.front().groups.size());
  // The same for a dense 175B.
  auto dense = searchPlans(c, *preset("gpt3-175b"), catalog(), o);
  ASSERT_TRUE(dense.isOk()) << dense.status().toString();
  EXPECT_LT(dense->search_s, 10.0);
  EXPECT_GT(dense->plans.front().tokens_per_s, 0);
}

TEST(Catalog, ShippedFileMatchesCompiledCopyAndCoversVendors) {
  const auto root = std::filesystem::path(__FILE__).parent_path().parent_path().parent_path();
  std::ifstream in(root / "configs/catalog/devices.yaml");
  ASSERT_TRUE(in.good()) << root;
  if (in) {
    std::stringstream ss;
    ss << in.rdbuf();
    EXPECT_EQ(ss.str(), std::string(builtinCatalogYaml()));
  }
  DeviceCatalog c;
  ASSERT_TRUE(c.mergeYaml(builtinCatalogYaml(), "builtin").isOk());
  for (const char* k : {"h100", "h800", "h20", "a100", "a800", "l40s", "mi300x", "ascend910b", "cpu"}) {
    ASSERT_TRUE(c.has(k)) << k;
  }
  EXPECT_DOUBLE_EQ(c.get("h100")->bf16_flops, 989.4e12);
  EXPECT_DOUBLE_EQ(c.get("a100")->peakFlops(Dtype::kFp8), 312e12);  // no fp8: falls back to bf16
  // User extension overrides and adds.
  ASSERT_TRUE(c.mergeYaml("devices:\n  h100: {bf16_tflops: 900}\n  mychip: {bf16_tflops: 100, memory_gb: 32, memory_bw_gbs: 1000}\n", "user").isOk());
  EXPECT_DOUBLE_EQ(c.get("h100")->bf16_flops, 900e12);
  EXPECT_DOUBLE_EQ(c.get("h100")->memory_bytes, 80e9);
  EXPECT_TRUE(c.has("mychip"));
  auto bad = c.mergeYaml("devices:\n  x: {bf16_tflop: 1}\n", "user.yaml");
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.message().find("user.yaml: devices.x.bf16_tflop"), std::string::npos);
}

TEST(Calibration, ProfileDrivesCostModelAndRoundTrips) {
  CalibrationProfile p;
  // 1 TFLOP/s measured at large shapes, 0.25 TFLOP/s at small ones.
  p.addMatmul("a100", Dtype::kBf16, 4096, 4096, 4096, 2.0 * 4096 * 4096 * 4096 / 1e12);
  p.addMatmul("a100", Dtype::kBf16, 256, 256, 256, 2.0 * 256 * 256 * 256 / 0.25e12);
  auto back = CalibrationProfile::fromJson(p.toJson());
  ASSERT_TRUE(back.isOk());
  EXPECT_NEAR(*back->achievedFlops("a100", Dtype::kBf16, 2.0 * 4096 * 4096 * 4096), 1e12, 1);
  // Geometric interpolation in between (log-log).
  const double mid = std::sqrt(2.0 * 256 * 256 * 256 * 2.0 * 4096 * 4096 * 4096);
  EXPECT_NEAR(*back->achievedFlops("a100", Dtype::kBf16, mid), 0.5e12, 1e6);
  EXPECT_FALSE(back->achievedFlops("h100", Dtype::kBf16, 1e9).has_value());
  ModelSpec m = *preset("tiny-llama");
  TrainSetup su;
  CostModel calibrated(m, su, &*back), plain(m, su);
  const DeviceSpec a100 = *catalog().get("a100");
  EXPECT_NEAR(calibrated.matmulTime(a100, Dtype::kBf16, 2.0 * 4096 * 4096 * 4096, 1), 2.0 * 4096 * 4096 * 4096 / 1e12, 1e-9);
  EXPECT_LT(plain.matmulTime(a100, Dtype::kBf16, 2.0 * 4096 * 4096 * 4096, 1), 1.0);
  EXPECT_FALSE(CalibrationProfile::fromJson("{\"devices\": {\"x\": {\"matmul\": {\"bf17\": []}}}}").isOk());
}

}  // namespace
}  // namespace archipelago::plan
