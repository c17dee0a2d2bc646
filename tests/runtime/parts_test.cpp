// The parallelism parts alone, without sockets (runtime/parallel/): the
// flat buffer's gradient views, the gradient bucketer's layout and its
// overlap with backward, the micro-batch schedule and the data-parallel
// reduction against a reference computed by plain libtorch on one batch.
// Multi-process equivalence of whole layouts is in pipeline_test.cpp and
// trainer_test.cpp.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "archipelago/data/sampler.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/parallel/data_parallel.h"
#include "archipelago/runtime/parallel/expert.h"
#include "archipelago/runtime/parallel/gradient_bucketer.h"
#include "archipelago/runtime/parallel/micro_batches.h"
#include "archipelago/runtime/parallel/optimizer_shard.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "model/test_util.h"
#include "runtime/random_batch.h"

namespace archipelago::runtime::parallel {
namespace {

// A group of `copies` identical ranks: a sum over it multiplies by copies.
// Records every launched range and whether backward was still running. Its
// reduce-scatter, as rank `me`, multiplies block `me` and poisons the
// others with NaN (what a real one leaves there must never be read).
class CopiesDp final : public DpComm {
 public:
  explicit CopiesDp(int copies, int me = 0) : copies_(copies), me_(me) {}
  int rank() const override { return me_; }
  int size() const override { return copies_; }
  std::unique_ptr<PendingReduce> allreduceSumAsync(std::span<float> data) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (float& x : data) x *= static_cast<float>(copies_);
    launched.push_back({data.data(), data.size()});
    during_backward.push_back(in_backward.load());
    return LocalDp().allreduceSumAsync(data);
  }
  std::unique_ptr<PendingReduce> reduceScatterSumAsync(std::span<float> data, std::span<const size_t> counts) override {
    std::lock_guard<std::mutex> lock(mu_);
    EXPECT_EQ(counts.size(), static_cast<size_t>(copies_));
    size_t at = 0;
    for (size_t r = 0; r < counts.size(); ++r) {
      for (size_t i = at; i < at + counts[r]; ++i) {
        data[i] = static_cast<int>(r) == me_ ? data[i] * static_cast<float>(copies_) : std::nanf("");
      }
      at += counts[r];
    }
    EXPECT_EQ(at, data.size()) << "the blocks must cover the bucket";
    launched.push_back({data.data(), data.size()});
    during_backward.push_back(in_backward.load());
    return LocalDp().reduceScatterSumAsync(data, counts);
  }
  core::Status allreduceSum(std::span<double> data) override {
    for (double& x : data) x *= copies_;
    return core::okStatus();
  }
  core::Status allgather(std::span<const double> mine, std::span<double> all) override {
    for (size_t r = 0; r < static_cast<size_t>(copies_); ++r) std::copy(mine.begin(), mine.end(), all.begin() + r * mine.size());
    return core::okStatus();
  }
  core::Status allgatherSlices(std::span<float>, std::span<const int64_t>) override { return core::okStatus(); }
  core::Status broadcast(std::span<float>, int) override { return core::okStatus(); }
  std::string describe() const override { return "copies"; }

  std::vector<std::pair<float*, size_t>> launched;
  std::vector<bool> during_backward;
  std::atomic<bool> in_backward{false};

 private:
  int copies_;
  int me_;
  std::mutex mu_;
};

using testutil::randomBatch;

// Reference: the mean token loss of the whole batch in one forward, plain libtorch.
std::vector<torch::Tensor> referenceGrads(const core::ModelConfig& c, const data::Batch& b) {
  model::Transformer ref(c, 4);
  auto in = torch::tensor(b.input, torch::kLong).view({b.n, b.seq_len});
  auto tg = torch::tensor(b.target, torch::kLong).view({b.n, b.seq_len});
  auto out = ref->lossAndStats(in, tg);
  (out.ce_sum / static_cast<double>(out.tokens)).backward();
  std::vector<torch::Tensor> g;
  for (auto& [name, p] : ref->namedParameters()) g.push_back(p.grad().clone());
  return g;
}

// One step of micro-batches (micro_batch 2 over batch b, or an `agreed`
// count) with `data`'s buckets hooked to backward as the trainer hooks them,
// then the reduction: the stats of the step, dp.in_backward left false.
StepStats overlappedStep(model::Transformer& m, FlatParams& flat, CopiesDp& dp, DataParallel& data,
                         const data::Batch& b, int64_t agreed = 0) {
  MicroBatchSchedule sched(m, 2, 1.0);
  sched.setAgreedCount(agreed);
  sched.onFinalBackward([&] {
    dp.in_backward = true;
    data.beforeFinalBackward();
  });
  StepInput in;
  in.batch = &b;
  in.seq_len = 8;
  in.group_samples = 4;
  StepStats stats;
  flat.zeroGrad();
  EXPECT_TRUE(sched.forwardBackward(in, stats).isOk());
  dp.in_backward = false;
  EXPECT_TRUE(data.reduceGradients(stats).isOk());
  return stats;
}

TEST(FlatParams, GradViewsAccumulateInPlaceAndSurviveZeroGrad) {
  auto c = model::testing::tinyConfig();
  model::Transformer m(c, 4);
  FlatParams flat = FlatParams::bind(m->namedParameters());
  EXPECT_EQ(flat.numel(), m->numParameters());
  const auto b = randomBatch(2, 8, c.vocab_size, 1);
  const auto ref = referenceGrads(c, b);
  auto in = torch::tensor(b.input, torch::kLong).view({2, 8});
  auto tg = torch::tensor(b.target, torch::kLong).view({2, 8});
  for (int rep = 0; rep < 2; ++rep) {
    flat.zeroGrad();
    EXPECT_EQ(flat.grads().abs().sum().item<double>(), 0.0);
    auto out = m->lossAndStats(in, tg);
    (out.ce_sum / static_cast<double>(out.tokens)).backward();
    const auto& segs = flat.segments();
    ASSERT_EQ(segs.size(), ref.size());
    for (size_t i = 0; i < segs.size(); ++i) {
      EXPECT_TRUE(torch::equal(flat.grads().narrow(0, segs[i].offset, segs[i].numel).view(segs[i].shape), ref[i])) << i;
      EXPECT_EQ(segs[i].param.grad().data_ptr(), flat.grads().narrow(0, segs[i].offset, 1).data_ptr()) << i;
    }
  }
}

// Chunked (bounded memory) and still the fp64 sum of squares: against a
// plain loop in long double over a range longer than several chunks.
TEST(FlatParams, SumOfSquaresIsTheFp64SumChunkByChunk) {
  torch::manual_seed(3);
  const torch::Tensor g = torch::randn({(1 << 20) + 12345});
  const float* p = g.data_ptr<float>();
  long double want = 0;
  for (int64_t i = 0; i < g.numel(); ++i) want += static_cast<long double>(p[i]) * p[i];
  const torch::Tensor got = sumOfSquaresFp64(g);
  EXPECT_EQ(got.scalar_type(), torch::kFloat64);
  EXPECT_NEAR(got.item<double>(), static_cast<double>(want), 1e-12 * static_cast<double>(want));
  EXPECT_EQ(sumOfSquaresFp64(g.narrow(0, 0, 0)).item<double>(), 0.0);
}

TEST(GradientBucketer, BucketsWalkBackwardsWholeTensorsNoGaps) {
  auto c = model::testing::tinyMoeConfig();
  model::Transformer m(c, 4);
  FlatParams flat = FlatParams::bind(m->namedParameters());
  LocalDp local;
  GradientBucketer bk(flat, &local, 8 * 1024, false);
  const auto buckets = bk.buckets();
  ASSERT_GT(buckets.size(), 2u);
  int64_t end = flat.numel();
  std::vector<int64_t> starts;
  for (const auto& s : flat.segments()) starts.push_back(s.offset);
  for (const auto& b : buckets) {
    EXPECT_EQ(b.end, end);  // walking backwards, no gaps
    EXPECT_TRUE(std::binary_search(starts.begin(), starts.end(), b.begin)) << "a tensor was split at " << b.begin;
    end = b.begin;
  }
  EXPECT_EQ(end, 0);
  // A range of segments: only those, in the same way.
  GradientBucketer part(flat, &local, 1 << 30, false, 2, 5);
  ASSERT_EQ(part.buckets().size(), 1u);
  EXPECT_EQ(part.buckets()[0].begin, flat.segments()[2].offset);
  EXPECT_EQ(part.buckets()[0].end, flat.segments()[5].offset);
}

// Micro-batches of 2 + 1 + 1 (micro_batch 2 over 4 samples, then an agreed
// count of 3) reduced over 3 identical ranks: 3x the one-batch gradient.
TEST(DataParallelParts, MicroBatchesAndOverlappedReductionMatchOneBatch) {
  auto c = model::testing::tinyConfig();
  const auto b = randomBatch(4, 8, c.vocab_size, 2);
  const auto ref = referenceGrads(c, b);
  for (int64_t agreed : {0, 3}) {
    model::Transformer m(c, 4);
    FlatParams flat = FlatParams::bind(m->namedParameters());
    CopiesDp dp(3);
    DataParallelOptions o;
    o.bucket_bytes = 4 * 1024;
    DataParallel data(flat, &dp, o);
    const StepStats stats = overlappedStep(m, flat, dp, data, b, agreed);
    if (HasFailure()) return;
    EXPECT_EQ(stats.micro_batches, agreed > 0 ? 3 : 2);
    EXPECT_EQ(stats.tokens, 32);
    // Every bucket reduced once, the first ones while backward still ran.
    EXPECT_GE(dp.launched.size(), 3u);
    EXPECT_TRUE(dp.during_backward.front()) << "no bucket overlapped with backward";
    const auto& segs = flat.segments();
    for (size_t i = 0; i < segs.size(); ++i) {
      auto got = flat.grads().narrow(0, segs[i].offset, segs[i].numel).view(segs[i].shape);
      EXPECT_TRUE(torch::allclose(got, ref[i] * 3.0, 1e-5, 1e-7)) << segs[i].name << " agreed " << agreed;
    }
    const double norm = flat.grads().norm().item<double>();
    const auto share = data.gradNormSquared();
    EXPECT_TRUE(share.replicated);
    EXPECT_NEAR(std::sqrt(share.sum_sq), norm, 1e-6 * norm);
  }
}

// ZeRO-2: as rank 1 of 3, every bucket is reduce-scattered along the
// optimizer's slices, overlapped with backward; this rank's slice holds
// 3x the one-batch gradient, and its norm share is that slice's alone.
TEST(DataParallelParts, ZeroTwoReduceScattersEachBucketToTheSliceOwner) {
  auto c = model::testing::tinyConfig();
  const auto b = randomBatch(4, 8, c.vocab_size, 2);
  const auto ref = referenceGrads(c, b);
  model::Transformer m(c, 4);
  FlatParams flat = FlatParams::bind(m->namedParameters());
  CopiesDp dp(3, 1);
  OptimizerShard shard(flat, &dp, 2);
  ASSERT_EQ(shard.pieces().size(), 1u);
  const OptimizerPiece& piece = shard.pieces()[0];
  ASSERT_EQ(piece.offsets.size(), 4u);
  DataParallelOptions o;
  o.bucket_bytes = 4 * 1024;
  o.shard_offsets = piece.offsets;
  DataParallel data(flat, &dp, o);
  overlappedStep(m, flat, dp, data, b);
  if (HasFailure()) return;
  EXPECT_GE(dp.launched.size(), 3u);
  EXPECT_TRUE(dp.during_backward.front()) << "no bucket overlapped with backward";
  // The reference, flattened in the same order.
  std::vector<torch::Tensor> flat_ref;
  for (const auto& g : ref) flat_ref.push_back(g.reshape({-1}));
  const auto want = torch::cat(flat_ref) * 3.0;
  const int64_t lo = piece.begin, n = piece.size();
  ASSERT_GT(n, 0);
  auto got = flat.grads().narrow(0, lo, n);
  EXPECT_TRUE(torch::allclose(got, want.narrow(0, lo, n), 1e-5, 1e-7));
  // Outside the slice only poison: nothing was allreduced.
  EXPECT_TRUE(flat.grads().narrow(0, 0, lo).isnan().all().item<bool>());
  const auto share = data.gradNormSquared();
  EXPECT_FALSE(share.replicated);
  const double slice_sq = want.narrow(0, lo, n).to(torch::kFloat64).pow(2).sum().item<double>();
  EXPECT_NEAR(share.sum_sq, slice_sq, 1e-6 * slice_sq);
  EXPECT_EQ(shard.name(), "optimizer shard (ZeRO-2)");
}

TEST(DataParallelParts, OwnerOnlyNormCountsOnceAndRangesAreNamed) {
  auto c = model::testing::tinyMoeConfig();
  model::Transformer m(c, 4);
  auto named = m->namedParameters();
  std::stable_partition(named.begin(), named.end(), [](const auto& p) { return !isExpertTensor(p.first); });
  FlatParams flat = FlatParams::bind(named);
  flat.grads().fill_(0.5f);
  int first_expert = -1;
  for (size_t i = 0; i < flat.segments().size(); ++i) {
    if (isExpertTensor(flat.segments()[i].name)) {
      first_expert = static_cast<int>(i);
      break;
    }
  }
  ASSERT_GT(first_expert, 0);
  const int64_t split = flat.segments()[static_cast<size_t>(first_expert)].offset;
  DataParallelOptions o;
  o.seg_end = first_expert;
  o.overlap = false;
  o.replicated_norm = false;
  DataParallel dense(flat, nullptr, o);
  o.norm_owner = false;
  DataParallel not_owner(flat, nullptr, o);
  ExpertParallel experts(flat, split, nullptr, true, nullptr);
  EXPECT_DOUBLE_EQ(dense.gradNormSquared().sum_sq, 0.25 * static_cast<double>(split));
  EXPECT_FALSE(dense.gradNormSquared().replicated);
  EXPECT_EQ(not_owner.gradNormSquared().sum_sq, 0.0);
  EXPECT_DOUBLE_EQ(experts.gradNormSquared().sum_sq, 0.25 * static_cast<double>(flat.numel() - split));
  // Together the ranges name every tensor once.
  size_t named_count = dense.stateRanges().size() + experts.stateRanges().size();
  EXPECT_EQ(named_count, flat.segments().size());
  for (const auto& r : experts.stateRanges()) EXPECT_TRUE(isExpertTensor(r.name)) << r.name;
  StepStats stats;
  EXPECT_TRUE(dense.reduceGradients(stats).isOk());  // nobody else holds them: a no-op
}

// Rank `rank` of a group of processes stepped one after another (`members`:
// their indices in `all`; empty: all of them): its allgatherSlices takes the
// other members' slices from their buffers, at the same flat offsets.
class SlicesDp final : public DpComm {
 public:
  SlicesDp(int rank, std::vector<FlatParams>* all, std::vector<int> members = {})
      : rank_(rank), all_(all), members_(std::move(members)) {
    if (members_.empty()) {
      for (int q = 0; q < static_cast<int>(all->size()); ++q) members_.push_back(q);
    }
  }
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  std::unique_ptr<PendingReduce> allreduceSumAsync(std::span<float> data) override { return LocalDp().allreduceSumAsync(data); }
  core::Status allreduceSum(std::span<double>) override { return core::okStatus(); }
  core::Status allgather(std::span<const double>, std::span<double>) override { return core::unimplemented("unused"); }
  core::Status allgatherSlices(std::span<float> data, std::span<const int64_t> offsets) override {
    // Where `data` starts in this member's flat buffer.
    const int64_t lo = data.data() - bufferOf(rank_);
    for (int q = 0; q < size(); ++q) {
      if (q == rank_) continue;
      const float* src = bufferOf(q) + lo;
      std::copy(src + offsets[q], src + offsets[q + 1], data.data() + offsets[q]);
    }
    return core::okStatus();
  }
  core::Status broadcast(std::span<float>, int) override { return core::okStatus(); }
  std::string describe() const override { return "slices"; }

 private:
  float* bufferOf(int q) const {
    return (*all_)[static_cast<size_t>(members_[static_cast<size_t>(q)])].params().data_ptr<float>();
  }
  int rank_;
  std::vector<FlatParams>* all_;
  std::vector<int> members_;
};

std::vector<std::pair<std::string, torch::Tensor>> tensorsFrom(uint64_t seed) {
  torch::manual_seed(seed);
  return {{"w1", torch::randn({3, 4})}, {"norm", torch::randn({5})}, {"w2", torch::randn({7})}};
}

// ZeRO-1: three ranks each update a third of the buffer (cut inside
// tensors) and gather; every rank ends with the parameters one AdamW over
// the whole buffer computes, while holding a third of the moments.
TEST(OptimizerShardPart, ThreeSlicesMatchOneOptimizerOverTheWholeBuffer) {
  core::TrainConfig tc;
  tc.weight_decay = 0.1;
  FlatParams ref = FlatParams::bind(tensorsFrom(7));
  FlatAdamW ref_opt(tc, ref.numel());
  std::vector<FlatParams> ranks;
  for (int r = 0; r < 3; ++r) ranks.push_back(FlatParams::bind(tensorsFrom(7)));
  std::vector<std::unique_ptr<SlicesDp>> dps;
  std::vector<std::unique_ptr<OptimizerShard>> shards;
  std::vector<std::unique_ptr<FlatAdamW>> opts;
  int64_t held = 0;
  for (int r = 0; r < 3; ++r) {
    dps.push_back(std::make_unique<SlicesDp>(r, &ranks));
    shards.push_back(std::make_unique<OptimizerShard>(ranks[static_cast<size_t>(r)], dps.back().get()));
    opts.push_back(std::make_unique<FlatAdamW>(tc, shards.back()->size()));
    held += opts.back()->expAvg().numel();
    EXPECT_TRUE(shards.back()->sharded());
  }
  EXPECT_EQ(held, ref.numel());
  EXPECT_EQ(shards[1]->pieces()[0].begin, 8);  // 24 elements: [0, 8) [8, 16) [16, 24)
  for (int step = 0; step < 4; ++step) {
    torch::manual_seed(100 + static_cast<uint64_t>(step));
    const torch::Tensor g = torch::randn({ref.numel()});
    const double lr = 0.01 * (step + 1);
    ref.grads().copy_(g);
    ref_opt.step(ref.params(), ref.grads(), ref.decayMask(), lr);
    for (int r = 0; r < 3; ++r) {
      ranks[static_cast<size_t>(r)].grads().copy_(g);
      shards[static_cast<size_t>(r)]->step(*opts[static_cast<size_t>(r)], lr);
    }
    StepStats stats;
    for (auto& s : shards) ASSERT_TRUE(s->gatherParameters(stats).isOk());
    for (auto& f : ranks) EXPECT_TRUE(torch::allclose(f.params(), ref.params(), 1e-6, 1e-7)) << "step " << step;
  }
  // The moments it names are pieces of tensors cut at the slice ends.
  auto ranges = shards[1]->stateRanges();
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[0].name, "w1");
  EXPECT_EQ(ranges[0].begin, 8);
  EXPECT_EQ(ranges[0].end, 12);
  EXPECT_EQ(ranges[1].name, "norm");
  EXPECT_EQ(ranges[1].end, 16);
  OptimizerShard whole(ref);
  EXPECT_FALSE(whole.sharded());
  EXPECT_EQ(whole.size(), ref.numel());
  StepStats stats;
  EXPECT_TRUE(whole.gatherParameters(stats).isOk());
}

// Expert parallelism's two ranges: four ranks share the dense range [0, 10)
// and pairs of them ({0, 2}, {1, 3}) the expert range [10, 24). Each rank
// updates a quarter of one and a half of the other with one AdamW state and
// gathers both; every rank ends with what one AdamW over the whole buffer
// computes, and the moments it names are its two slices.
TEST(OptimizerShardPart, TwoRangesOverTwoGroupsMatchOneOptimizer) {
  core::TrainConfig tc;
  tc.weight_decay = 0.1;
  FlatParams ref = FlatParams::bind(tensorsFrom(7));
  ASSERT_EQ(ref.numel(), 24);
  FlatAdamW ref_opt(tc, ref.numel());
  std::vector<FlatParams> ranks;
  for (int r = 0; r < 4; ++r) ranks.push_back(FlatParams::bind(tensorsFrom(7)));
  std::vector<std::unique_ptr<SlicesDp>> dense, experts;
  std::vector<std::unique_ptr<OptimizerShard>> shards;
  std::vector<std::unique_ptr<FlatAdamW>> opts;
  int64_t held = 0;
  for (int r = 0; r < 4; ++r) {
    dense.push_back(std::make_unique<SlicesDp>(r, &ranks));
    experts.push_back(std::make_unique<SlicesDp>(r / 2, &ranks, std::vector<int>{r % 2, r % 2 + 2}));
    const std::vector<OptimizerRange> ranges{{0, 10, dense.back().get()}, {10, 24, experts.back().get()}};
    shards.push_back(std::make_unique<OptimizerShard>(ranks[static_cast<size_t>(r)], ranges, 2));
    opts.push_back(std::make_unique<FlatAdamW>(tc, shards.back()->size()));
    held += shards.back()->size();
  }
  // The dense range once over four ranks, the experts once per pair.
  EXPECT_EQ(held, 10 + 2 * 14);
  const auto& p3 = shards[3]->pieces();
  ASSERT_EQ(p3.size(), 2u);
  EXPECT_EQ(p3[0].begin, 7);  // [0, 2) [2, 5) [5, 7) [7, 10)
  EXPECT_EQ(p3[0].end, 10);
  EXPECT_EQ(p3[1].begin, 17);  // rank 3 is member 1 of {1, 3}: [10, 17) [17, 24)
  EXPECT_EQ(p3[1].end, 24);
  EXPECT_EQ(p3[1].state_offset, 3);
  EXPECT_EQ(shards[3]->name(), "optimizer shard (ZeRO-2)");
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(200 + static_cast<uint64_t>(step));
    const torch::Tensor g = torch::randn({ref.numel()});
    const double lr = 0.02 * (step + 1);
    ref.grads().copy_(g);
    ref_opt.step(ref.params(), ref.grads(), ref.decayMask(), lr);
    for (int r = 0; r < 4; ++r) {
      ranks[static_cast<size_t>(r)].grads().copy_(g);
      shards[static_cast<size_t>(r)]->step(*opts[static_cast<size_t>(r)], lr);
    }
    StepStats stats;
    for (auto& s : shards) ASSERT_TRUE(s->gatherParameters(stats).isOk());
    for (auto& f : ranks) EXPECT_TRUE(torch::allclose(f.params(), ref.params(), 1e-6, 1e-7)) << "step " << step;
  }
  // Rank 3's moments are the reference's at its two slices.
  const torch::Tensor m = opts[3]->expAvg();
  ASSERT_EQ(m.numel(), 3 + 7);
  // w1 is [0, 12), norm [12, 17), w2 [17, 24): its slices name w1 [7, 10) and w2 [17, 24).
  const auto ranges = shards[3]->stateRanges();
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[0].name, "w1");
  EXPECT_EQ(ranges[1].name, "w2");
  EXPECT_EQ(ranges[1].begin, 17);
  // The reference's moments at those offsets (one AdamW over the whole buffer).
  EXPECT_TRUE(torch::allclose(m.narrow(0, 0, 3), ref_opt.expAvg().narrow(0, 7, 3), 1e-6, 1e-8));
  EXPECT_TRUE(torch::allclose(m.narrow(0, 3, 7), ref_opt.expAvg().narrow(0, 17, 7), 1e-6, 1e-8));
}

// One stage holding the whole model: the 1F1B machinery alone (stage
// input/output, loss scaling per micro-batch, recomputation) against the
// one-batch reference. Several stages exchange tensors between processes:
// pipeline_test.cpp runs those through the binary against one process.
TEST(PipelinePart, OneStageMatchesOneBatchWithAndWithoutRecompute) {
  // Dense: an MoE aux loss is not additive over micro-batches.
  auto c = model::testing::tinyConfig();
  const auto b = randomBatch(6, 8, c.vocab_size, 3);
  model::Transformer ref(c, 4);
  auto in_ids = torch::tensor(b.input, torch::kLong).view({6, 8});
  auto tg_ids = torch::tensor(b.target, torch::kLong).view({6, 8});
  auto ro = ref->lossAndStats(in_ids, tg_ids);
  (ro.ce_sum / 48.0).backward();
  for (bool recompute : {false, true}) {
    model::Transformer m(c, 4);
    FlatParams flat = FlatParams::bind(m->namedParameters());
    PipelineOptions po;
    po.stages = 1;
    po.micro_batch = 2;
    po.recompute = recompute;
    po.dim = c.dim;
    PipelineParallel pipe(m, nullptr, po);
    StepInput in;
    in.batch = &b;
    in.seq_len = 8;
    in.group_samples = 6;
    StepStats stats;
    flat.zeroGrad();
    ASSERT_TRUE(pipe.forwardBackward(in, stats).isOk());
    EXPECT_EQ(stats.micro_batches, 3);
    EXPECT_EQ(stats.tokens, 48);
    EXPECT_NEAR(stats.ce_sum, ro.ce_sum.item<double>(), 1e-4 * std::abs(ro.ce_sum.item<double>()));
    const auto& segs = flat.segments();
    auto rp = ref->namedParameters();
    for (size_t i = 0; i < segs.size(); ++i) {
      auto got = flat.grads().narrow(0, segs[i].offset, segs[i].numel).view(segs[i].shape);
      EXPECT_TRUE(torch::allclose(got, rp[i].second.grad(), 1e-4, 1e-6)) << segs[i].name << " recompute " << recompute;
    }
    double ce = 0, tokens = 0;
    ASSERT_TRUE(pipe.evaluate(b, 8, ce, tokens).isOk());
    EXPECT_EQ(tokens, 48);
  }
}

TEST(MicroBatches, RangesAndAgreedCounts) {
  using R = std::vector<std::pair<int64_t, int64_t>>;
  EXPECT_EQ(microRanges(5, 2), (R{{0, 2}, {2, 4}, {4, 5}}));
  EXPECT_EQ(microRanges(5, 0), (R{{0, 5}}));
  EXPECT_EQ(microRanges(5, 2, 2), (R{{0, 2}, {2, 5}}));
  EXPECT_TRUE(microRanges(0, 2).empty());
  // Expert groups run the same count: ceil(largest / micro_batch), at most the smallest share.
  EXPECT_EQ(expertMicroCount({6, 3}, 2, 1), 3);
  EXPECT_EQ(expertMicroCount({8, 2}, 2, 1), 2);
  EXPECT_EQ(expertMicroCount({4, 4}, 0, 1), 1);
  EXPECT_EQ(expertMicroCount({8, 8}, 0, 2), 4);  // pipelines: 2 per stage without micro_batch
  EXPECT_EQ(pipelineMicroCount(3, 0, 2), 3);
}

}  // namespace
}  // namespace archipelago::runtime::parallel
