// The planner's per-worker memory model (plan/worker_memory.h): how each
// layout choice moves each part. Its state part is checked against the
// runtime's own tensors in tests/runtime/zero_layouts_test.cpp and the whole
// against the measured peak by bench/memory.sh.
#include <gtest/gtest.h>

#include "archipelago/plan/worker_memory.h"

namespace archipelago::plan {
namespace {

ModelSpec small() {
  ModelSpec m;
  m.vocab = 256;
  m.dim = 64;
  m.n_layers = 4;
  m.n_heads = 4;
  m.n_kv_heads = 4;
  m.head_dim = 16;
  m.ffn_hidden = 176;
  return m;
}

WorkerLayout whole(const ModelSpec& m) {
  WorkerLayout w;
  w.seq_len = 32;
  w.micro_batch = 4;
  w.layer_end = m.n_layers;
  return w;
}

WorkerMemory predict(const ModelSpec& m, const WorkerLayout& w) {
  auto r = predictWorkerMemory(m, w);
  EXPECT_TRUE(r.isOk()) << r.status().toString();
  return r.isOk() ? *r : WorkerMemory{};
}

TEST(WorkerMemory, UnshardedStateIsTwentyFourBytesPerParameterAndTheRollbackTwelve) {
  const ModelSpec m = small();
  WorkerLayout w = whole(m);
  w.elastic = true;
  const WorkerMemory p = predict(m, w);
  EXPECT_DOUBLE_EQ(p.state_bytes, 24 * m.totalParams());
  EXPECT_DOUBLE_EQ(p.rollback_bytes, 12 * m.totalParams());
  EXPECT_GT(p.activation_bytes, 0);
  EXPECT_DOUBLE_EQ(p.total(), p.state_bytes + p.rollback_bytes + p.activation_bytes);
}

TEST(WorkerMemory, ZeroShardsTheOptimizerThenEverything) {
  const ModelSpec m = small();
  WorkerLayout w = whole(m);
  w.zero_group = 4;
  const double P = m.totalParams();
  w.zero = 1;
  EXPECT_DOUBLE_EQ(predict(m, w).state_bytes, 12 * P + 12 * P / 4);
  w.zero = 2;  // the gradient buffer stays whole (reduce-scattered in place)
  EXPECT_DOUBLE_EQ(predict(m, w).state_bytes, 12 * P + 12 * P / 4);
  w.zero = 3;
  const double z3 = predict(m, w).state_bytes;
  EXPECT_GT(z3, 24 * P / 4);             // plus the gathered layers
  EXPECT_LT(z3, 12 * P + 12 * P / 4);    // less than ZeRO-2 holds
}

TEST(WorkerMemory, ActivationsScaleWithTokensAndTensorParallelismSplitsTheInside) {
  const ModelSpec m = small();
  WorkerLayout w = whole(m);
  const double a = predict(m, w).activation_bytes;
  w.micro_batch = 8;
  EXPECT_NEAR(predict(m, w).activation_bytes, 2 * a, 1e-9 * a);
  w.micro_batch = 4;
  w.tp = 2;
  const double tp = predict(m, w).activation_bytes;
  EXPECT_LT(tp, a);
  EXPECT_GT(tp, a / 2);  // norms and residuals stay whole
  w.sequence_parallel = true;
  EXPECT_NEAR(predict(m, w).activation_bytes, a / 2, 1e-9 * a);  // everything split
}

TEST(WorkerMemory, PipelineStagesKeepTheirMicroBatchesInFlightUnlessRecomputed) {
  const ModelSpec m = small();
  WorkerLayout w = whole(m);
  w.stages = 2;
  w.micro_batches = 4;
  w.layer_end = 2;  // stage 0: embedding + layers 0-1
  const double s0 = predict(m, w).activation_bytes;
  w.stage = 1;
  w.layer_begin = 2;
  w.layer_end = 4;  // stage 1: layers 2-3 + head, one micro-batch in flight
  const double s1 = predict(m, w).activation_bytes;
  EXPECT_GT(s0, 1.5 * s1);  // two in flight against one (the head's logits are small here)
  w.stage = 0;
  w.layer_begin = 0;
  w.layer_end = 2;
  w.recompute = true;
  EXPECT_LT(predict(m, w).activation_bytes, 0.75 * s0);
}

ModelSpec smallMoe() {
  ModelSpec m = small();
  m.num_experts = 8;
  m.top_k = 2;
  m.expert_hidden = 64;
  m.shared_experts = 1;
  m.first_dense = 1;  // layers 1 and 3 are MoE layers
  m.moe_every = 2;
  return m;
}

TEST(WorkerMemory, MoeLayersHoldRouterSharedAndRoutedExperts) {
  const ModelSpec m = smallMoe();
  WorkerLayout w = whole(m);
  EXPECT_DOUBLE_EQ(predict(m, w).state_bytes, 24 * m.totalParams());
  // Without EP the experts are replicated: ZeRO shards them with the rest.
  WorkerLayout z = whole(m);
  z.zero = 1;
  z.zero_group = 4;
  EXPECT_DOUBLE_EQ(predict(m, z).state_bytes, 12 * m.totalParams() + 12 * m.totalParams() / 4);
  // Expert parallelism: this member holds 3 of the 8 routed experts of each MoE layer.
  w.ep = 2;
  w.experts_held = 3;
  const double gone = 2 * 5 * m.expertParams();
  const double P = m.totalParams() - gone;
  EXPECT_DOUBLE_EQ(predict(m, w).state_bytes, 24 * P);
  // ZeRO-1: the dense tensors' state over 8 replicas, the experts' over the 2 holding them.
  w.zero = 1;
  w.zero_group = 8;
  w.expert_zero_group = 2;
  const double experts = 2 * 3 * m.expertParams();
  const double dense = (P - experts) / 8;
  EXPECT_GT(experts / 2, dense);  // AdamW's scratch: the larger slice
  EXPECT_DOUBLE_EQ(predict(m, w).state_bytes, 12 * P + 8 * (dense + experts / 2) + 4 * experts / 2);
  // TP replicates the MoE layers: only the attention projections and the dense FFNs split.
  WorkerLayout t = whole(m);
  t.tp = 2;
  const double h = static_cast<double>(m.dim);
  const double split = 4 * (m.attentionParams() - h) / 2 + 2 * (m.denseFfnParams() - h) / 2 +
                       static_cast<double>(m.vocab * m.dim);  // embedding and head rows
  EXPECT_DOUBLE_EQ(predict(m, t).state_bytes, 24 * (m.totalParams() - split));
}

TEST(WorkerMemory, MoeActivationsFollowTheRowsEachMemberRuns) {
  const ModelSpec m = smallMoe();
  WorkerLayout w = whole(m);
  const double local = predict(m, w).activation_bytes;
  ModelSpec dense = small();
  EXPECT_GT(local, predict(dense, whole(dense)).activation_bytes);  // k = 2 rows per token plus a shared expert
  // An even split runs as many rows per member as one process: only the
  // two int64 permutations per row are added (2 MoE layers, 2 rows per token).
  w.ep = 2;
  w.experts_held = 4;
  const double tokens = static_cast<double>(w.micro_batch * w.seq_len);
  EXPECT_NEAR(predict(m, w).activation_bytes, local + tokens * 2 * 2 * 16, 1e-9 * local);
  // Experts 6 + 2: the member holding 6 runs three times the other's rows.
  w.experts_held = 6;
  const double big = predict(m, w).activation_bytes;
  w.experts_held = 2;
  const double small_share = predict(m, w).activation_bytes;
  const double row = static_cast<double>(m.dim + 4 * m.expert_hidden) * w.compute_bytes + 16;
  EXPECT_NEAR(big - small_share, tokens * 2 * 2 * (1.5 - 0.5) * row, 1e-9 * local);
  // TP replicates the MoE layers: every rank routes every token, unless
  // sequence parallelism gives each its block.
  WorkerLayout t = whole(m);
  t.tp = 2;
  EXPECT_GT(predict(m, t).activation_bytes, local / 2);
  t.sequence_parallel = true;
  EXPECT_NEAR(predict(m, t).activation_bytes, local / 2, 1e-9 * local);
}

TEST(WorkerMemory, ModelConfigMoeLayersAreTheRuntimes) {
  core::ModelConfig c;
  c.dim = 64;
  c.n_layers = 4;
  c.n_heads = 4;
  c.moe.num_experts = 4;
  c.moe.top_k = 1;
  c.moe.every = 2;
  auto m = fromModelConfig(c);
  ASSERT_TRUE(m.isOk()) << m.status().toString();
  // model::isMoeLayer: (l + 1) % every == 0.
  EXPECT_FALSE(m->isMoeLayer(0));
  EXPECT_TRUE(m->isMoeLayer(1));
  EXPECT_FALSE(m->isMoeLayer(2));
  EXPECT_TRUE(m->isMoeLayer(3));
}

TEST(WorkerMemory, UnmodelledLayersAndIncompleteLayoutsAreRefused) {
  ModelSpec m = small();
  WorkerLayout w = whole(m);
  w.layer_end = 0;
  EXPECT_FALSE(predictWorkerMemory(m, w).isOk());
  ModelSpec moe = smallMoe();
  WorkerLayout e = whole(moe);
  e.experts_held = 9;  // more than the 8 experts
  EXPECT_FALSE(predictWorkerMemory(moe, e).isOk());
  m.kv_lora_rank = 64;
  m.qk_rope_dim = 16;
  m.qk_nope_dim = 16;
  m.v_head_dim = 16;
  auto r = predictWorkerMemory(m, whole(m));
  ASSERT_FALSE(r.isOk());
  EXPECT_NE(r.status().message().find("latent attention"), std::string::npos);
}

}  // namespace
}  // namespace archipelago::plan
