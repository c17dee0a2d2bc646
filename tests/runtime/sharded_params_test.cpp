// ZeRO-3's sharded parameters alone, without sockets
// (runtime/parallel/sharded_params.h): one rank of a two-rank group whose
// peer is simulated from the reference model's flat buffers. Its gradients
// after the reduce-scatters must be the group's sum of the same gradients
// the whole model computes, its full weights must be in memory only around
// their use, and an idle pass must make the same collectives as a real one.
// The multi-process runs against the single-process curve are in
// zero3_test.cpp.
#include <algorithm>
#include <cmath>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "archipelago/data/sampler.h"
#include "archipelago/model/torch_compat.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/parallel/micro_batches.h"
#include "archipelago/runtime/parallel/optimizer_shard.h"
#include "archipelago/runtime/parallel/sharded_params.h"
#include "model/test_util.h"
#include "runtime/random_batch.h"

namespace archipelago::runtime::parallel {
namespace {

// Rank `me` of `copies` identical ranks. A gather fills the other ranks'
// slices of the unit it is handed from the whole reference buffer (what
// those ranks hold); a reduce-scatter multiplies this rank's block by
// `copies` and poisons the others with NaN. Counts the calls and the most
// units whose weights were in memory at any collective.
class MirrorDp final : public DpComm {
 public:
  MirrorDp(int copies, int me, const FlatParams* flat, torch::Tensor whole)
      : copies_(copies), me_(me), flat_(flat), whole_(std::move(whole)) {}
  int rank() const override { return me_; }
  int size() const override { return copies_; }
  std::unique_ptr<PendingReduce> allreduceSumAsync(std::span<float> data) override {
    ADD_FAILURE() << "ZeRO-3 never allreduces a bucket";
    return LocalDp().allreduceSumAsync(data);
  }
  std::unique_ptr<PendingReduce> reduceScatterSumAsync(std::span<float> data, std::span<const size_t> counts) override {
    ++reduces;
    size_t at = 0;
    for (size_t r = 0; r < counts.size(); ++r) {
      for (size_t i = at; i < at + counts[r]; ++i) {
        data[i] = static_cast<int>(r) == me_ ? data[i] * static_cast<float>(copies_) : std::nanf("");
      }
      at += counts[r];
    }
    EXPECT_EQ(at, data.size());
    return LocalDp().reduceScatterSumAsync(data, counts);
  }
  core::Status allreduceSum(std::span<double> data) override {
    for (double& x : data) x *= copies_;
    return core::okStatus();
  }
  core::Status allgather(std::span<const double>, std::span<double>) override { return core::internalError("unused"); }
  core::Status allgatherSlices(std::span<float> data, std::span<const int64_t> offsets) override {
    ++gathers;
    size_t held = 0, unit = flat_->units();
    for (size_t u = 0; u < flat_->units(); ++u) {
      if (!model::compat::storageHeld(flat_->unitParams(u))) continue;
      ++held;
      if (flat_->unitParams(u).data_ptr<float>() == data.data()) unit = u;
    }
    max_held = std::max(max_held, held);
    if (unit == flat_->units()) return core::internalError("gather into memory that is no unit's");
    EXPECT_EQ(offsets.size(), static_cast<size_t>(copies_) + 1);
    const int64_t base = flat_->unitBegin(unit);
    for (int r = 0; r < copies_; ++r) {
      if (r == me_) continue;
      for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i) data[static_cast<size_t>(i)] = whole_[base + i].item<float>();
    }
    return core::okStatus();
  }
  core::Status broadcast(std::span<float>, int) override { return core::okStatus(); }
  std::string describe() const override { return "mirror"; }

  int gathers = 0, reduces = 0;
  size_t max_held = 0;

 private:
  int copies_, me_;
  const FlatParams* flat_;
  torch::Tensor whole_;
};

using testutil::randomBatch;

core::ModelConfig threeLayers() {
  core::ModelConfig c = model::testing::tinyConfig();
  c.n_layers = 3;
  return c;
}

StepInput stepOf(const data::Batch& b, int64_t passes) {
  StepInput in;
  in.batch = &b;
  in.seq_len = b.seq_len;
  in.group_samples = static_cast<double>(b.n);
  in.passes = passes;
  return in;
}

TEST(ShardedParameters, UnitsAreTheLayersAndTheRest) {
  const auto cut = cutUnits({{"model.embed_tokens.weight", 10},
                             {"model.layers.0.input_layernorm.weight", 2},
                             {"model.layers.0.mlp.down_proj.weight", 4},
                             {"model.layers.1.input_layernorm.weight", 2},
                             {"model.norm.weight", 2},
                             {"lm_head.weight", 10}});
  EXPECT_EQ(cut.offsets, (std::vector<int64_t>{0, 10, 16, 18, 30}));
  EXPECT_EQ(cut.layer_units, (std::vector<size_t>{1, 2}));
  EXPECT_EQ(cut.expert_units, (std::vector<int64_t>{-1, -1}));
  EXPECT_EQ(cut.root_units, (std::vector<size_t>{0, 3}));
}

TEST(ShardedParameters, ALayersExpertsAfterTheDenseTensorsAreItsSecondUnit) {
  // Expert parallelism orders every expert after the dense tensors.
  const auto cut = cutUnits({{"model.embed_tokens.weight", 10},
                             {"model.layers.0.block_sparse_moe.gate.weight", 2},
                             {"model.layers.1.mlp.down_proj.weight", 4},
                             {"lm_head.weight", 10},
                             {"model.layers.0.block_sparse_moe.experts.0.w1.weight", 6},
                             {"model.layers.0.block_sparse_moe.experts.1.w1.weight", 6}});
  EXPECT_EQ(cut.offsets, (std::vector<int64_t>{0, 10, 12, 16, 26, 38}));
  EXPECT_EQ(cut.layer_units, (std::vector<size_t>{1, 2}));
  EXPECT_EQ(cut.expert_units, (std::vector<int64_t>{4, -1}));
  EXPECT_EQ(cut.root_units, (std::vector<size_t>{0, 3}));
}

TEST(ShardedParameters, TwoSlicesAreHeldEndToEnd) {
  model::Transformer m(threeLayers(), 4);
  FlatParams whole = FlatParams::bind(m->namedParameters());
  std::vector<std::pair<std::string, int64_t>> numels;
  for (const auto& [name, t] : m->namedParameters()) numels.push_back({name, t.numel()});
  const UnitCut cut = cutUnits(numels);
  const int64_t n = whole.numel();
  FlatParams flat = FlatParams::bindSharded(m->namedParameters(), torch::kFloat32, {{{3, 10}, {n - 5, n}}, cut.offsets});
  ASSERT_EQ(flat.params().numel(), 12);
  EXPECT_EQ(flat.localOf(3), 0);
  EXPECT_EQ(flat.localOf(n - 5), 7);
  EXPECT_TRUE(torch::equal(flat.params().narrow(0, 0, 7), whole.params().narrow(0, 3, 7)));
  EXPECT_TRUE(torch::equal(flat.params().narrow(0, 7, 5), whole.params().narrow(0, n - 5, 5)));
  EXPECT_THROW(flat.localOf(11), c10::Error);
}

TEST(ShardedParameters, RankOfTwoGetsTheGroupSumOfItsSliceAndHoldsWeightsOnlyWhereUsed) {
  const auto c = threeLayers();
  const auto b = randomBatch(4, 8, c.vocab_size, 1);
  // The whole model, unsharded: gradients of the same micro-batches.
  model::Transformer ref(c, 4);
  FlatParams rf = FlatParams::bind(ref->namedParameters());
  const torch::Tensor whole = rf.params().clone();
  {
    MicroBatchSchedule sched(ref, 2, 1.0);
    StepStats stats;
    rf.zeroGrad();
    ASSERT_TRUE(sched.forwardBackward(stepOf(b, 0), stats).isOk());
  }
  // Rank 1 of 2 with ZeRO-3.
  model::Transformer m(c, 4);
  std::vector<std::pair<std::string, int64_t>> numels;
  for (const auto& [name, t] : m->namedParameters()) numels.push_back({name, t.numel()});
  const UnitCut cut = cutUnits(numels);
  ASSERT_EQ(cut.layer_units.size(), 3u);
  const auto offsets = OptimizerShard::sliceOffsets(rf.numel(), 2);
  FlatParams flat = FlatParams::bindSharded(m->namedParameters(), torch::kFloat32, {{{offsets[1], offsets[2]}}, cut.offsets});
  ASSERT_TRUE(flat.sharded());
  EXPECT_EQ(flat.numel(), rf.numel());
  EXPECT_EQ(flat.localOf(offsets[1]), 0);
  EXPECT_TRUE(torch::equal(flat.params(), whole.narrow(0, offsets[1], offsets[2] - offsets[1])));
  MirrorDp dp(2, 1, &flat, whole);
  ShardedParameters sp(flat, {{&dp, offsets}}, cut);
  EXPECT_EQ(sp.heldUnits(), 0u) << "nothing is gathered before the first forward";
  m->setLayerHooks(&sp);
  MicroBatchSchedule sched(m, 2, 1.0);
  sched.setPassHooks(&sp);
  // Two micro-batches of rows and one idle pass (a peer with three).
  StepStats stats;
  flat.zeroGrad();
  ASSERT_TRUE(sched.forwardBackward(stepOf(b, 3), stats).isOk());
  ASSERT_TRUE(sp.reduceGradients(stats).isOk());
  EXPECT_EQ(sp.heldUnits(), 0u) << "every unit is freed after the step";
  // The root (2 units) stays for the step; at most two layers at a time beside it.
  EXPECT_LE(dp.max_held, 4u);
  // Its memory pool: the root's weights and gradients, and at most four
  // layer-sized blocks (two layers' weights, two layers' gradients).
  const auto bytesOf = [&](size_t u) { return (cut.offsets[u + 1] - cut.offsets[u]) * 4; };
  int64_t root = 0;
  for (size_t u : cut.root_units) root += 2 * bytesOf(u);
  EXPECT_GT(sp.unitBytes(), root);
  EXPECT_LE(sp.unitBytes(), root + 4 * bytesOf(cut.layer_units[0]));
  // Per pass: 3 forward gathers, 2 backward ones (the last layer stays), 3 reduce-scatters; the root once.
  EXPECT_EQ(dp.gathers, 2 + 3 * 5);
  EXPECT_EQ(dp.reduces, 2 + 3 * 3);
  const torch::Tensor want = rf.grads().narrow(0, offsets[1], offsets[2] - offsets[1]) * 2.0;
  EXPECT_TRUE(torch::allclose(flat.grads(), want, 1e-6, 1e-9)) << (flat.grads() - want).abs().max().item<double>();
  EXPECT_FALSE(torch::isnan(flat.grads()).any().item<bool>());
  const NormShare share = sp.gradNormSquared();
  EXPECT_FALSE(share.replicated);
  EXPECT_NEAR(share.sum_sq, want.to(torch::kFloat64).pow(2).sum().item<double>(), 1e-9 * share.sum_sq);
  // Evaluation gathers the same weights (the peer's slices from the mirror) and frees them.
  double ce = 0, tokens = 0, ce_ref = 0, tokens_ref = 0;
  ASSERT_TRUE(sched.evaluate(b, b.seq_len, ce, tokens).isOk());
  ASSERT_TRUE(MicroBatchSchedule(ref, 2, 1.0).evaluate(b, b.seq_len, ce_ref, tokens_ref).isOk());
  EXPECT_EQ(tokens, tokens_ref);
  EXPECT_NEAR(ce, ce_ref, 1e-5 * ce_ref);
  EXPECT_EQ(sp.heldUnits(), 0u);
  // The state a checkpoint takes from this rank: its slice, by tensor.
  int64_t covered = 0;
  for (const auto& r : sp.stateRanges()) {
    EXPECT_GE(r.begin, offsets[1]);
    EXPECT_LE(r.end, offsets[2]);
    covered += r.end - r.begin;
  }
  EXPECT_EQ(covered, offsets[2] - offsets[1]);
}

}  // namespace
}  // namespace archipelago::runtime::parallel
