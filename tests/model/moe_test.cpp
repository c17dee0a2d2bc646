// MoE FFN against a per-token fp64 loop, plus balancing and capacity.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "archipelago/model/moe.h"
#include "archipelago/model/transformer.h"
#include "model/test_util.h"

namespace archipelago::model {
namespace {

using testing::toVec;

SwiGluImpl& expert(MoeFfnImpl& m, int64_t e) { return *m.experts[static_cast<size_t>(e)]->as<SwiGluImpl>(); }

// One token through the MoE by the textbook recipe, in fp64 loops.
std::vector<double> referenceMoe(MoeFfnImpl& m, const core::ModelConfig& c, const std::vector<double>& x) {
  auto logits = testing::matvec(m.gate->weight, x);
  const size_t e_count = logits.size();
  double mx = *std::max_element(logits.begin(), logits.end()), z = 0;
  std::vector<double> p(e_count);
  for (size_t e = 0; e < e_count; ++e) z += (p[e] = std::exp(logits[e] - mx));
  for (auto& v : p) v /= z;
  std::vector<size_t> order(e_count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
  double wsum = 0;
  for (int64_t j = 0; j < c.moe.top_k; ++j) wsum += p[order[j]];
  std::vector<double> y(x.size(), 0.0);
  for (int64_t j = 0; j < c.moe.top_k; ++j) {
    size_t e = order[j];
    auto& ex = expert(m, static_cast<int64_t>(e));
    auto out = testing::swiglu(ex.gate->weight, ex.up->weight, ex.down->weight, x);
    double w = c.moe.top_k > 1 ? p[e] / wsum : p[e];
    for (size_t i = 0; i < y.size(); ++i) y[i] += w * out[i];
  }
  if (!m.shared_expert.is_empty()) {
    auto s = testing::swiglu(m.shared_expert->gate->weight, m.shared_expert->up->weight,
                             m.shared_expert->down->weight, x);
    for (size_t i = 0; i < y.size(); ++i) y[i] += s[i];
  }
  return y;
}

TEST(Moe, ForwardMatchesPerTokenFp64Loop) {
  for (int64_t k : {1, 2, 3}) {
    auto c = testing::tinyMoeConfig();
    c.moe.top_k = k;
    c.moe.shared_expert = (k != 3);
    MoeFfn moe(c, 0);
    moe->to(torch::kDouble);
    testing::randomize(*moe, 0.5, 100 + k);
    auto x = torch::randn({3, 5, c.dim}, torch::kDouble);
    auto y = moe(x).reshape({-1, c.dim});
    auto x2 = x.reshape({-1, c.dim});
    for (int64_t n = 0; n < x2.size(0); ++n) {
      auto ref = referenceMoe(*moe, c, toVec(x2[n]));
      auto got = toVec(y[n]);
      for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-12) << "k=" << k << " token " << n;
    }
    auto s = moe->stats();
    EXPECT_EQ(s.tokens, 15);
    EXPECT_EQ(std::accumulate(s.tokens_per_expert.begin(), s.tokens_per_expert.end(), int64_t{0}), 15 * k);
    EXPECT_EQ(s.dropped, 0);
  }
}

TEST(Moe, AuxLossMatchesHandFormula) {
  auto c = testing::tinyMoeConfig();
  MoeFfn moe(c, 0);
  moe->to(torch::kDouble);
  testing::randomize(*moe, 0.5, 5);
  auto x = torch::randn({4, 6, c.dim}, torch::kDouble);
  moe(x);
  const auto x2 = x.reshape({-1, c.dim});
  const int64_t n = x2.size(0), e_count = c.moe.num_experts, k = c.moe.top_k;
  std::vector<double> mean_p(e_count, 0.0);
  std::vector<int64_t> counts(e_count, 0);
  for (int64_t t = 0; t < n; ++t) {
    auto logits = testing::matvec(moe->gate->weight, toVec(x2[t]));
    double mx = *std::max_element(logits.begin(), logits.end()), z = 0;
    for (auto& l : logits) z += (l = std::exp(l - mx));
    std::vector<size_t> order(e_count);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return logits[a] > logits[b]; });
    for (int64_t j = 0; j < k; ++j) counts[order[j]]++;
    for (int64_t e = 0; e < e_count; ++e) mean_p[e] += logits[e] / z / n;
  }
  double aux = 0;
  for (int64_t e = 0; e < e_count; ++e) aux += static_cast<double>(counts[e]) / (n * k) * mean_p[e];
  aux *= e_count;
  EXPECT_EQ(moe->stats().tokens_per_expert, counts);
  EXPECT_NEAR(moe->stats().aux_loss, aux, 1e-12);
  EXPECT_NEAR(moe->lastAuxLoss().item<double>(), aux, 1e-12);

  // In the model loss: coef * mean over MoE layers.
  Transformer m(c, 3);
  auto ids = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
  auto out = m->lossAndStats(ids, ids);
  auto stats = m->moeStats();
  ASSERT_EQ(stats.size(), 2u);
  double expected = c.moe.aux_loss_coef * (stats[0].aux_loss + stats[1].aux_loss) / 2;
  EXPECT_NEAR(out.aux_loss.item<double>(), expected, 1e-6);
  EXPECT_NEAR(out.loss.item<double>(), out.ceMean() + expected, 1e-5);
}

// Router skewed towards expert 0 by construction.
MoeFfn skewedMoe(const core::ModelConfig& c) {
  MoeFfn moe(c, 0);
  testing::randomize(*moe, 0.1, 8);
  torch::NoGradGuard g;
  moe->gate->weight[0] += 0.5;
  moe->gate->weight[1] += 0.25;
  return moe;
}

TEST(Moe, RouterBiasMovesLoadTowardUniform) {
  auto c = testing::tinyMoeConfig("router_bias");
  c.moe.top_k = 1;
  c.moe.shared_expert = false;
  c.moe.router_bias_rate = 0.005;
  // Router with varied per-token preferences and a strong pull to expert 0.
  MoeFfn moe(c, 0);
  testing::randomize(*moe, 0.3, 8);
  {
    torch::NoGradGuard g;
    moe->gate->weight[0] += 0.3;
  }
  auto x = torch::randn({256, c.dim}) + 0.5;
  auto imbalance = [&] {
    torch::NoGradGuard g;
    moe->eval();
    moe(x);
    moe->train();
    auto t = moe->stats().tokens_per_expert;
    return static_cast<double>(*std::max_element(t.begin(), t.end())) / (256.0 / c.moe.num_experts);
  };
  const double before = imbalance();
  EXPECT_GT(before, 2.0);
  auto probs_before = moe->route(x).probs.clone();
  for (int step = 0; step < 400; ++step) {
    torch::NoGradGuard g;
    moe(x);
    EXPECT_EQ(moe->loadCounts().sum().item<int64_t>(), 256);
    moe->updateRouterBias(moe->loadCounts());
  }
  const double after = imbalance();
  EXPECT_LT(after, 1.3) << "before " << before;
  // The bias changes selection only, never the router probabilities.
  EXPECT_TRUE(torch::allclose(moe->route(x).probs, probs_before));
  EXPECT_LT(moe->routerBias()[0].item<double>(), moe->routerBias().mean().item<double>());
  // The bias is state: the trainer sees it in namedTensors under the
  // DeepSeek-V3 name, not in the parameters.
  for (const auto& p : moe->named_parameters()) EXPECT_EQ(p.key().find("bias"), std::string::npos);
}

TEST(Moe, ModelRouterLoadAndUpdateAcrossLayers) {
  auto c = testing::tinyMoeConfig("router_bias");
  Transformer m(c, 2);
  auto ids = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
  m->lossAndStats(ids, ids);
  m->lossAndStats(ids, ids);
  auto load = m->routerLoad();
  ASSERT_EQ(load.sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(load.sum().item<int64_t>(), 2 * 2 * 16 * c.moe.top_k);  // layers x forwards x tokens x k
  m->updateRouterBias(load * 3);  // as if summed over 3 identical ranks
  EXPECT_EQ(m->routerLoad().sum().item<int64_t>(), 0);
  auto bias = m->moeLayers()[0]->routerBias();
  auto expected = torch::sign(load[0].to(torch::kDouble).mean() - load[0].to(torch::kDouble)) * c.moe.router_bias_rate;
  EXPECT_TRUE(torch::allclose(bias.to(torch::kDouble), expected));
}

TEST(Moe, CapacityDropsOverflowAndCountsIt) {
  auto c = testing::tinyMoeConfig("none");
  c.moe.num_experts = 2;
  c.moe.top_k = 1;
  c.moe.shared_expert = false;
  c.moe.capacity_factor = 1.0;
  MoeFfn moe = skewedMoe(c);
  auto x = torch::rand({8, c.dim}) + 0.1;  // every token prefers expert 0
  EXPECT_EQ(moe->capacityFor(8), 4);     // ceil(1.0 * 8 * 1 / 2)
  auto y = moe(x);
  const auto& s = moe->stats();
  EXPECT_EQ(s.tokens_per_expert, (std::vector<int64_t>{8, 0}));
  EXPECT_EQ(s.dropped_per_expert, (std::vector<int64_t>{4, 0}));
  EXPECT_EQ(s.dropped, 4);
  EXPECT_EQ(s.capacity, 4);
  // Tokens 0..3 are kept (token order), 4..7 dropped: zero FFN output.
  auto r = moe->route(x);
  auto ex = expert(*moe, 0).forward(x) * r.weight;
  EXPECT_LT(testing::maxAbsDiff(y.narrow(0, 0, 4), ex.narrow(0, 0, 4)), 1e-6);
  EXPECT_EQ(y.narrow(0, 4, 4).abs().max().item<double>(), 0.0);
  // Top-2 over 2 experts: first choices outrank second choices.
  c.moe.top_k = 2;
  c.moe.capacity_factor = 0.75;  // capacity ceil(0.75 * 8 * 2 / 2) = 6
  MoeFfn moe2 = skewedMoe(c);
  moe2(x);
  EXPECT_EQ(moe2->stats().capacity, 6);
  EXPECT_EQ(moe2->stats().dropped_per_expert, (std::vector<int64_t>{2, 2}));
  auto d = moe2->dispatch(x, moe2->route(x));
  // Expert 0 keeps the first choices of tokens 0..5; expert 1 keeps the
  // second choices of tokens 0..5.
  EXPECT_TRUE(torch::equal(d.token_index, torch::tensor({0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5}, torch::kLong)));
  // No capacity in eval mode.
  moe2->eval();
  moe2(x);
  EXPECT_EQ(moe2->stats().dropped, 0);
}

}  // namespace
}  // namespace archipelago::model
