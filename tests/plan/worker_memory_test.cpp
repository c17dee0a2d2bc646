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

TEST(WorkerMemory, UnmodelledLayersAndIncompleteLayoutsAreRefused) {
  ModelSpec m = small();
  WorkerLayout w = whole(m);
  w.layer_end = 0;
  EXPECT_FALSE(predictWorkerMemory(m, w).isOk());
  m.num_experts = 8;
  m.top_k = 2;
  m.expert_hidden = 64;
  auto r = predictWorkerMemory(m, whole(m));
  ASSERT_FALSE(r.isOk());
  EXPECT_NE(r.status().message().find("MoE"), std::string::npos);
}

}  // namespace
}  // namespace archipelago::plan
