// Tensor parallelism inside the model against the whole model: TP shards run
// in threads of one process over an in-memory group; the loss and every
// gradient (each slice against the same slice of the whole model's) must be
// the single-process ones. fp64, so the only difference is summation order.
#include <gtest/gtest.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "archipelago/model/tensor_parallel.h"
#include "archipelago/model/transformer.h"
#include "test_util.h"

namespace archipelago::model {
namespace {

// All ranks deposit, the last one combines in rank order (identical result
// on every rank), everyone reads it.
enum class Op { kSum, kMax, kGather };
class ThreadGroup {
 public:
  explicit ThreadGroup(int n) : n_(n), slots_(static_cast<size_t>(n)) {}
  int size() const { return n_; }
  torch::Tensor combine(int rank, const torch::Tensor& t, Op op, int64_t dim = 0) {
    std::unique_lock<std::mutex> lk(mu_);
    const int64_t gen = gen_;
    slots_[static_cast<size_t>(rank)] = t.clone();
    if (++arrived_ == n_) {
      torch::Tensor acc = op == Op::kGather ? torch::cat(slots_, dim) : slots_[0].clone();
      for (int r = 1; r < n_ && op != Op::kGather; ++r) {
        acc = op == Op::kMax ? torch::maximum(acc, slots_[static_cast<size_t>(r)]) : acc + slots_[static_cast<size_t>(r)];
      }
      result_ = acc;
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
    return result_.clone();
  }

 private:
  int n_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<torch::Tensor> slots_;
  torch::Tensor result_;
  int arrived_ = 0;
  int64_t gen_ = 0;
};

class ThreadComm : public TensorParallelComm {
 public:
  ThreadComm(ThreadGroup& g, int rank) : g_(g), rank_(rank) {}
  int size() const override { return g_.size(); }
  int rank() const override { return rank_; }
  void allreduceSum(torch::Tensor& t) override { t.copy_(g_.combine(rank_, t, Op::kSum)); }
  void allreduceMax(torch::Tensor& t) override { t.copy_(g_.combine(rank_, t, Op::kMax)); }
  torch::Tensor reduceScatter(const torch::Tensor& t, int64_t dim) override {
    const int64_t block = t.size(dim) / size();
    return g_.combine(rank_, t, Op::kSum).narrow(dim, rank_ * block, block).contiguous();
  }
  torch::Tensor allgather(const torch::Tensor& t, int64_t dim) override { return g_.combine(rank_, t, Op::kGather, dim); }

 private:
  ThreadGroup& g_;
  int rank_;
};

struct Result {
  double ce_sum = 0;
  int64_t tokens = 0;
  std::map<std::string, torch::Tensor> grads;
  std::map<std::string, torch::Tensor> params;
};

Result runShard(const core::ModelConfig& c, ModelShard shard, std::shared_ptr<TensorParallelComm> comm,
                const torch::Tensor& ids, const torch::Tensor& target, bool sequence = false) {
  Transformer net(c, 7, shard);
  net->to(torch::kDouble);
  if (comm) net->setTensorParallel(comm, sequence);
  LossOutput out = net->lossAndStats(ids, target);
  out.loss.backward();
  Result r;
  r.ce_sum = out.ce_sum.item<double>();
  r.tokens = out.tokens;
  for (auto& [name, p] : net->namedParameters()) {
    r.grads[name] = p.grad().clone();
    r.params[name] = p.detach().clone();
  }
  return r;
}

// Sequence parallelism: the replicated tensors' gradients are partial per
// rank (each saw its block of the sequence); their sum over the group is
// the whole model's, as the trainer forms it.
void expectMatchesWhole(const core::ModelConfig& c, int tp, bool sequence = false) {
  torch::manual_seed(3);
  const int64_t T = sequence ? 4 * tp : 9;
  const torch::Tensor ids = torch::randint(0, c.vocab_size, {3, T}, torch::kLong);
  torch::Tensor target = torch::randint(0, c.vocab_size, {3, T}, torch::kLong);
  target.index_put_({0, 4}, -1);  // an ignored position
  const Result whole = runShard(c, {}, nullptr, ids, target);
  ThreadGroup group(tp);
  std::vector<Result> parts(static_cast<size_t>(tp));
  std::vector<std::thread> threads;
  for (int r = 0; r < tp; ++r) {
    threads.emplace_back([&, r] {
      ModelShard s;
      s.tp = {r, tp};
      parts[static_cast<size_t>(r)] = runShard(c, s, std::make_shared<ThreadComm>(group, r), ids, target, sequence);
    });
  }
  for (auto& t : threads) t.join();
  std::map<std::string, torch::Tensor> replicated_sum;
  for (const auto& p : parts) {
    for (const auto& [name, g] : p.grads) {
      if (tensorSlice(c, name, {0, tp}).sliced()) continue;
      replicated_sum[name] = replicated_sum.count(name) ? replicated_sum[name] + g : g.clone();
    }
  }
  for (int r = 0; r < tp; ++r) {
    const Result& p = parts[static_cast<size_t>(r)];
    EXPECT_NEAR(p.ce_sum, whole.ce_sum, 1e-9 * std::abs(whole.ce_sum)) << "rank " << r;
    EXPECT_EQ(p.tokens, whole.tokens);
    ASSERT_EQ(p.grads.size(), whole.grads.size());
    int sliced = 0;
    for (const auto& [name, local_g] : p.grads) {
      const TensorSlice sl = tensorSlice(c, name, {r, tp});
      const torch::Tensor g = sequence && !sl.sliced() ? replicated_sum.at(name) : local_g;
      sliced += sl.sliced() ? 1 : 0;
      const torch::Tensor ref_g = sliceOf(whole.grads.at(name), sl);
      const torch::Tensor ref_p = sliceOf(whole.params.at(name), sl);
      ASSERT_EQ(g.sizes(), ref_g.sizes()) << name;
      EXPECT_TRUE(torch::equal(p.params.at(name), ref_p)) << name << ": initial value is not the whole tensor's slice";
      const double scale = ref_g.abs().max().item<double>() + 1e-30;
      EXPECT_LT((g - ref_g).abs().max().item<double>(), 1e-9 * scale) << name << " rank " << r;
    }
    // Every projection of attention and of a dense MLP, and the embedding (and head), are cut.
    int expected = c.tie_embeddings ? 1 : 2;
    for (int64_t l = 0; l < c.n_layers; ++l) expected += isMoeLayer(c, l) ? 4 : 7;
    EXPECT_EQ(sliced, expected) << "rank " << r;
  }
}

TEST(TensorParallel, SplitRangeCoversEveryItemOnce) {
  for (int parts = 1; parts <= 5; ++parts) {
    int64_t next = 0;
    for (int r = 0; r < parts; ++r) {
      const auto [b, e] = splitRange(13, parts, r);
      EXPECT_EQ(b, next);
      EXPECT_GE(e - b, 13 / parts);
      EXPECT_LE(e - b, 13 / parts + 1);
      next = e;
    }
    EXPECT_EQ(next, 13);
  }
}

TEST(TensorParallel, TwoRanksMatchTheWholeModelWithGqaAndUnevenVocabAndHidden) {
  core::ModelConfig c = testing::tinyConfig();  // vocab 13 (odd), 4 heads over 2 kv heads
  c.ffn_hidden = 25;                            // odd: uneven MLP slices
  expectMatchesWhole(c, 2);
}

TEST(TensorParallel, FourRanksWithTiedEmbeddings) {
  core::ModelConfig c = testing::tinyConfig();
  c.n_kv_heads = 4;
  c.tie_embeddings = true;
  expectMatchesWhole(c, 4);
}

TEST(TensorParallel, MoeLayersAreReplicatedAcrossTheGroup) {
  const core::ModelConfig c = testing::tinyMoeConfig();
  // The experts, router and shared expert are held whole and get the
  // single-process gradient on every rank (checked by expectMatchesWhole:
  // their slice is the whole tensor); attention is still cut.
  torch::manual_seed(3);
  ModelShard s;
  s.tp = {1, 2};
  Transformer net(c, 7, s);
  EXPECT_EQ(net->model->layers[0]->as<DecoderLayerImpl>()->self_attn->n_heads, 2);
  expectMatchesWhole(c, 2);
}

TEST(SequenceParallel, TwoAndFourRanksMatchTheWholeModel) {
  core::ModelConfig c = testing::tinyConfig();
  c.ffn_hidden = 25;
  expectMatchesWhole(c, 2, /*sequence=*/true);
  c.n_kv_heads = 4;
  c.tie_embeddings = true;
  expectMatchesWhole(c, 4, /*sequence=*/true);
}

TEST(SequenceParallel, HiddenStatesAreThisRanksBlockOfTheSequence) {
  const core::ModelConfig c = testing::tinyConfig();
  ThreadGroup group(2);
  const torch::Tensor ids = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
  Transformer whole(c, 7);
  whole->to(torch::kDouble);
  const torch::Tensor ref = whole->stageForward(ids).detach();
  std::vector<torch::Tensor> got(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      ModelShard s;
      s.tp = {r, 2};
      Transformer net(c, 7, s);
      net->to(torch::kDouble);
      net->setTensorParallel(std::make_shared<ThreadComm>(group, r), true);
      got[static_cast<size_t>(r)] = net->stageForward(ids).detach();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(got[static_cast<size_t>(r)].sizes(), (std::vector<int64_t>{2, 4, c.dim}));
    EXPECT_LT((got[static_cast<size_t>(r)] - ref.narrow(1, 4 * r, 4)).abs().max().item<double>(), 1e-12);
  }
}

// Each rank routes its block of the sequence through the replicated
// experts; the balance loss (its gradient reaches the router) and the
// capacity's drops are the whole sequence's, so loss and gradients match.
TEST(SequenceParallel, MoeLayersRouteEachRanksBlockAsTheWholeSequenceWould) {
  core::ModelConfig c = testing::tinyMoeConfig("aux_loss");
  expectMatchesWhole(c, 2, /*sequence=*/true);
  // A capacity that drops: which assignment goes is decided in the whole
  // micro-batch's order (choice, sample, position), across the ranks' blocks.
  c.moe.capacity_factor = 1.0;
  expectMatchesWhole(c, 2, /*sequence=*/true);
  core::ModelConfig four = c;
  four.n_kv_heads = 4;
  expectMatchesWhole(four, 4, /*sequence=*/true);
  Transformer whole(c, 7);
  whole->to(torch::kDouble);
  torch::manual_seed(3);
  whole->lossAndStats(torch::randint(0, c.vocab_size, {3, 8}, torch::kLong),
                      torch::randint(0, c.vocab_size, {3, 8}, torch::kLong));
  int64_t dropped = 0;
  for (const auto& st : whole->moeStats()) dropped += st.dropped;
  EXPECT_GT(dropped, 0) << "the capacity case must drop assignments to test their order";
  expectMatchesWhole(testing::tinyMoeConfig("router_bias"), 2, /*sequence=*/true);
}

TEST(TensorParallel, RefusesKvHeadsTheGroupCannotDivide) {
  core::ModelConfig c = testing::tinyConfig();  // 2 kv heads
  const core::Status st = checkTensorParallel(c, 4);
  ASSERT_FALSE(st.isOk());
  EXPECT_NE(st.message().find("model.n_kv_heads"), std::string::npos) << st.message();
  EXPECT_TRUE(checkTensorParallel(c, 2).isOk());
}

TEST(TensorParallel, AShardWithoutItsGroupRefusesToRun) {
  const core::ModelConfig c = testing::tinyConfig();
  ModelShard s;
  s.tp = {0, 2};
  Transformer net(c, 7, s);
  const torch::Tensor ids = torch::zeros({1, 4}, torch::kLong);
  EXPECT_THROW(net->lossAndStats(ids, ids), c10::Error);
}

}  // namespace
}  // namespace archipelago::model
