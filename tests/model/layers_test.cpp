// Dense decoder pieces against plain fp64 references, plus init, names,
// parameter counts and finite-difference gradients.
#include <gtest/gtest.h>

#include <set>

#include "archipelago/model/training.h"
#include "archipelago/model/transformer.h"
#include "model/test_util.h"

namespace archipelago::model {
namespace {

using testing::toVec;

TEST(ModelConfig, ResolvesDefaultsAndNamesBadFields) {
  core::ModelConfig c;
  c.vocab_size = 100;
  c.dim = 96;
  c.n_heads = 4;
  auto r = resolveModelConfig(c);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  EXPECT_EQ(r->n_kv_heads, 4);
  EXPECT_EQ(r->ffn_hidden, 256);  // 8/3 * 96 = 256, already a multiple of 32
  c.n_heads = 5;
  c.n_kv_heads = 3;
  c.moe.num_experts = 4;
  c.moe.top_k = 5;
  auto bad = resolveModelConfig(c);
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.status().message().find("model.n_heads"), std::string::npos);
  EXPECT_NE(bad.status().message().find("model.n_kv_heads"), std::string::npos);
  EXPECT_NE(bad.status().message().find("model.moe.top_k"), std::string::npos);
}

TEST(RmsNorm, MatchesFp64Reference) {
  RmsNorm norm(8, 1e-5);
  torch::NoGradGuard g;
  norm->weight.copy_(torch::randn({8}));
  auto x = torch::randn({3, 8});
  auto y = norm(x);
  auto xv = toVec(x), wv = toVec(norm->weight), yv = toVec(y);
  for (int r = 0; r < 3; ++r) {
    double ms = 0;
    for (int i = 0; i < 8; ++i) ms += xv[r * 8 + i] * xv[r * 8 + i];
    ms /= 8;
    for (int i = 0; i < 8; ++i) {
      double ref = wv[i] * xv[r * 8 + i] / std::sqrt(ms + 1e-5);
      EXPECT_NEAR(yv[r * 8 + i], ref, 1e-5 * (1 + std::abs(ref)));
    }
  }
}

TEST(Rotary, MatchesFp64Reference) {
  const int64_t heads = 2, t = 5, hd = 8, start = 3;
  const double theta = 500.0;
  auto x = torch::randn({1, heads, t, hd}, torch::kDouble);
  auto y = applyRotary(x, rotaryTables(start, t, hd, theta, torch::kCPU, torch::kDouble));
  auto xv = toVec(x), yv = toVec(y);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t p = 0; p < t; ++p) {
      const double* xi = &xv[static_cast<size_t>((h * t + p) * hd)];
      const double* yi = &yv[static_cast<size_t>((h * t + p) * hd)];
      for (int64_t i = 0; i < hd / 2; ++i) {
        double angle = static_cast<double>(start + p) * std::pow(theta, -2.0 * i / hd);
        double a = xi[i], b = xi[i + hd / 2];
        EXPECT_NEAR(yi[i], a * std::cos(angle) - b * std::sin(angle), 1e-12);
        EXPECT_NEAR(yi[i + hd / 2], b * std::cos(angle) + a * std::sin(angle), 1e-12);
      }
    }
  }
}

// Plain-loop causal GQA attention with rotary embeddings, fp64.
std::vector<double> referenceAttention(const AttentionImpl& a, const torch::Tensor& x, double theta) {
  const int64_t b = x.size(0), t = x.size(1), d = x.size(2);
  const int64_t h = a.n_heads, kvh = a.n_kv_heads, hd = a.head_dim, rep = h / kvh;
  std::vector<double> out;
  auto rope = [&](std::vector<double>& v, int64_t heads, int64_t pos) {
    for (int64_t hh = 0; hh < heads; ++hh) {
      for (int64_t i = 0; i < hd / 2; ++i) {
        double ang = static_cast<double>(pos) * std::pow(theta, -2.0 * i / hd);
        double& p = v[static_cast<size_t>(hh * hd + i)];
        double& q = v[static_cast<size_t>(hh * hd + i + hd / 2)];
        double p0 = p, q0 = q;
        p = p0 * std::cos(ang) - q0 * std::sin(ang);
        q = q0 * std::cos(ang) + p0 * std::sin(ang);
      }
    }
  };
  for (int64_t bi = 0; bi < b; ++bi) {
    std::vector<std::vector<double>> q(t), k(t), v(t);
    for (int64_t ti = 0; ti < t; ++ti) {
      auto xt = toVec(x[bi][ti]);
      q[ti] = testing::matvec(a.q_proj->weight, xt);
      k[ti] = testing::matvec(a.k_proj->weight, xt);
      v[ti] = testing::matvec(a.v_proj->weight, xt);
      rope(q[ti], h, ti);
      rope(k[ti], kvh, ti);
    }
    for (int64_t ti = 0; ti < t; ++ti) {
      std::vector<double> cat(static_cast<size_t>(h * hd), 0.0);
      for (int64_t hh = 0; hh < h; ++hh) {
        int64_t g = hh / rep;
        std::vector<double> s(static_cast<size_t>(ti + 1));
        double mx = -1e300;
        for (int64_t si = 0; si <= ti; ++si) {
          double dot = 0;
          for (int64_t i = 0; i < hd; ++i) dot += q[ti][hh * hd + i] * k[si][g * hd + i];
          s[si] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[si]);
        }
        double z = 0;
        for (auto& e : s) z += (e = std::exp(e - mx));
        for (int64_t si = 0; si <= ti; ++si) {
          for (int64_t i = 0; i < hd; ++i) cat[hh * hd + i] += s[si] / z * v[si][g * hd + i];
        }
      }
      auto o = testing::matvec(a.o_proj->weight, cat);
      out.insert(out.end(), o.begin(), o.end());
    }
    (void)d;
  }
  return out;
}

TEST(Attention, GqaMatchesFp64LoopReference) {
  auto c = testing::tinyConfig();  // 4 heads, 2 kv heads
  Attention attn(c);
  attn->to(torch::kDouble);
  testing::randomize(*attn, 0.3, 7);
  auto x = torch::randn({2, 6, c.dim}, torch::kDouble);
  auto y = attn(x, rotaryTables(0, 6, headDim(c), c.rope_theta, torch::kCPU, torch::kDouble));
  auto ref = referenceAttention(*attn, x, c.rope_theta);
  auto yv = toVec(y);
  ASSERT_EQ(yv.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(yv[i], ref[i], 1e-12);
}

TEST(Attention, GqaEqualsMhaWithRepeatedKvHeads) {
  auto gqa_cfg = testing::tinyConfig();
  auto mha_cfg = gqa_cfg;
  mha_cfg.n_kv_heads = mha_cfg.n_heads;
  Attention gqa(gqa_cfg), mha(mha_cfg);
  testing::randomize(*gqa, 0.3, 3);
  {
    torch::NoGradGuard g;
    const int64_t hd = headDim(gqa_cfg), rep = gqa_cfg.n_heads / gqa_cfg.n_kv_heads;
    mha->q_proj->weight.copy_(gqa->q_proj->weight);
    mha->o_proj->weight.copy_(gqa->o_proj->weight);
    for (int64_t h = 0; h < mha_cfg.n_heads; ++h) {
      mha->k_proj->weight.narrow(0, h * hd, hd).copy_(gqa->k_proj->weight.narrow(0, (h / rep) * hd, hd));
      mha->v_proj->weight.narrow(0, h * hd, hd).copy_(gqa->v_proj->weight.narrow(0, (h / rep) * hd, hd));
    }
  }
  auto x = torch::randn({2, 7, gqa_cfg.dim});
  auto rope = rotaryTables(0, 7, headDim(gqa_cfg), gqa_cfg.rope_theta, torch::kCPU);
  EXPECT_LT(testing::maxAbsDiff(gqa(x, rope), mha(x, rope)), 1e-6);
}

TEST(Transformer, CausalFutureTokensDoNotChangePastLogits) {
  for (bool moe : {false, true}) {
    auto c = moe ? testing::tinyMoeConfig() : testing::tinyConfig();
    Transformer m(c, 1);
    m->eval();
    torch::NoGradGuard g;
    auto a = torch::randint(0, c.vocab_size, {2, 10}, torch::kLong);
    auto b = a.clone();
    b.narrow(1, 6, 4).copy_((a.narrow(1, 6, 4) + 1) % c.vocab_size);
    auto la = m(a), lb = m(b);
    EXPECT_LT(testing::maxAbsDiff(la.narrow(1, 0, 6), lb.narrow(1, 0, 6)), 1e-6);
    EXPECT_GT(testing::maxAbsDiff(la.narrow(1, 6, 4), lb.narrow(1, 6, 4)), 1e-4);
  }
}

TEST(Transformer, KvCacheMatchesFullRecompute) {
  auto c = testing::tinyMoeConfig();
  Transformer m(c, 5);
  m->eval();
  torch::NoGradGuard g;
  auto ids = torch::randint(0, c.vocab_size, {1, 9}, torch::kLong);
  auto full = m(ids);
  KvCache cache = m->makeCache();
  auto first = m->forward(ids.narrow(1, 0, 5), &cache);
  EXPECT_LT(testing::maxAbsDiff(first, full.narrow(1, 0, 5)), 1e-5);
  for (int64_t t = 5; t < 9; ++t) {
    auto step = m->forward(ids.narrow(1, t, 1), &cache);
    EXPECT_LT(testing::maxAbsDiff(step, full.narrow(1, t, 1)), 1e-5) << "position " << t;
  }
  EXPECT_EQ(cache.length(), 9);
}

TEST(Init, SameSeedSameBytesDifferentSeedDiffers) {
  auto c = testing::tinyMoeConfig("router_bias");
  Transformer a(c, 42), b(c, 42), d(c, 43);
  auto pa = a->namedTensors(), pb = b->namedTensors(), pd = d->namedTensors();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    ASSERT_EQ(pa[i].first, pb[i].first);
    auto x = pa[i].second.contiguous(), y = pb[i].second.contiguous();
    ASSERT_EQ(0, std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size())) << pa[i].first;
  }
  EXPECT_FALSE(torch::equal(pa[0].second, pd[0].second));
  // Norms start at one; residual outputs use the scaled std.
  EXPECT_TRUE(torch::equal(a->model->norm->weight, torch::ones({c.dim})));
  auto q = a->model->layers[0]->as<DecoderLayerImpl>()->self_attn->q_proj->weight;
  auto o = a->model->layers[0]->as<DecoderLayerImpl>()->self_attn->o_proj->weight;
  EXPECT_NEAR(q.std().item<double>(), c.init_std, 0.3 * c.init_std);
  EXPECT_NEAR(o.std().item<double>(), c.init_std / std::sqrt(2.0 * c.n_layers), 0.3 * c.init_std / 2);
  // A tensor's init depends only on (seed, name): a different architecture
  // holding the same tensor gets the same values.
  auto c2 = c;
  c2.n_layers = 1;
  Transformer e(c2, 42);
  EXPECT_TRUE(torch::equal(e->model->embed_tokens->weight, a->model->embed_tokens->weight));
}

TEST(Names, HuggingFaceNamesCompleteAndUnique) {
  core::ModelConfig c = testing::tinyMoeConfig("router_bias");
  c.n_layers = 3;
  c.moe.every = 2;  // layer 1 is MoE, layers 0 and 2 dense
  Transformer m(c, 1);
  std::vector<std::string> expected = {"model.embed_tokens.weight"};
  for (int i = 0; i < 3; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    expected.push_back(p + "input_layernorm.weight");
    for (const char* s : {"q", "k", "v", "o"}) expected.push_back(p + "self_attn." + s + "_proj.weight");
    expected.push_back(p + "post_attention_layernorm.weight");
    if (i == 1) {
      expected.push_back(p + "block_sparse_moe.gate.weight");
      for (int e = 0; e < 4; ++e) {
        for (const char* w : {"w1", "w2", "w3"}) {
          expected.push_back(p + "block_sparse_moe.experts." + std::to_string(e) + "." + w + ".weight");
        }
      }
      for (const char* s : {"gate", "up", "down"}) expected.push_back(p + "block_sparse_moe.shared_expert." + s + "_proj.weight");
    } else {
      for (const char* s : {"gate", "up", "down"}) expected.push_back(p + "mlp." + s + "_proj.weight");
    }
  }
  expected.push_back("model.norm.weight");
  expected.push_back("lm_head.weight");
  std::set<std::string> got;
  for (const auto& [n, t] : m->namedParameters()) EXPECT_TRUE(got.insert(n).second) << "duplicate " << n;
  EXPECT_EQ(got, std::set<std::string>(expected.begin(), expected.end()));
  // The selection bias is state, not a parameter, but is checkpointed.
  auto all = m->namedTensors();
  EXPECT_EQ(all.back().first, "model.layers.1.block_sparse_moe.gate.e_score_correction_bias");
  EXPECT_EQ(all.size(), got.size() + 1);
  // Stable order: embedding first, lm_head last.
  EXPECT_EQ(m->namedParameters().front().first, "model.embed_tokens.weight");
  EXPECT_EQ(m->namedParameters().back().first, "lm_head.weight");
}

TEST(Counts, ParameterFormulaMatchesNumel) {
  std::vector<core::ModelConfig> configs = {testing::tinyConfig(), testing::tinyMoeConfig()};
  auto tied = testing::tinyConfig();
  tied.tie_embeddings = true;
  configs.push_back(tied);
  auto sparse = testing::tinyMoeConfig();
  sparse.n_layers = 4;
  sparse.moe.every = 2;
  sparse.moe.shared_expert = false;
  sparse.moe.top_k = 1;
  configs.push_back(sparse);
  for (const auto& c : configs) {
    Transformer m(c, 0);
    auto n = countParameters(c);
    EXPECT_EQ(n.total, m->numParameters());
    int64_t embed = m->model->embed_tokens->weight.numel() + (m->lm_head.is_empty() ? 0 : m->lm_head->weight.numel());
    EXPECT_EQ(n.embedding, embed);
    // Active: subtract the unchosen experts' weights by hand.
    int64_t inactive = 0;
    for (int64_t i = 0; i < c.n_layers; ++i) {
      if (isMoeLayer(c, i)) inactive += (c.moe.num_experts - c.moe.top_k) * 3 * c.dim * c.moe.expert_hidden;
    }
    EXPECT_EQ(n.active, n.total - inactive);
  }
}

TEST(Counts, FlopsMatchHandComputedValue) {
  core::ModelConfig c;
  c.vocab_size = 1000;
  c.dim = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.ffn_hidden = 128;
  c = resolveModelConfig(c).value();
  const int64_t t = 32;
  // Per layer: q 64x64, k,v 64x32 each, o 64x64 -> 12288 MACs; attention
  // 2 * 64 * 32 = 4096 MACs; FFN 3*64*128 = 24576 MACs. Head 64*1000.
  double macs = 2 * (12288 + 4096 + 24576) + 64000;
  auto f = flopsPerToken(c, t);
  EXPECT_DOUBLE_EQ(f.forward, 2 * macs);
  EXPECT_DOUBLE_EQ(f.backward, 4 * macs);
  // MoE: router 64*4, two experts of 3*64*32 each, no shared expert.
  c.moe.num_experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_hidden = 32;
  c = resolveModelConfig(c).value();
  macs = 2 * (12288 + 4096 + 256 + 2 * 6144) + 64000;
  EXPECT_DOUBLE_EQ(flopsPerToken(c, t).forward, 2 * macs);
}

// d loss / d theta by central differences in fp64 for a few entries of every
// parameter, against autograd.
void checkGradients(const core::ModelConfig& c) {
  Transformer m(c, 11);
  m->to(torch::kDouble);
  testing::randomize(*m, 0.3, 9);
  auto in = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  auto tgt = torch::randint(0, c.vocab_size, {2, 6}, torch::kLong);
  tgt[0][2] = -1;  // ignored position
  auto out = m->lossAndStats(in, tgt);
  EXPECT_EQ(out.tokens, 11);
  out.loss.backward();
  const double eps = 1e-6;
  int checked = 0;
  int unrouted = 0;
  for (auto& [name, p] : m->namedParameters()) {
    // An expert no token was routed to gets no gradient from autograd; its
    // true gradient is zero, which the finite differences below must confirm.
    const bool has_grad = p.grad().defined();
    if (!has_grad) {
      ASSERT_NE(name.find(".experts."), std::string::npos) << name << " has no gradient";
      ++unrouted;
    }
    const torch::Tensor grad = has_grad ? p.grad() : torch::zeros_like(p);
    auto flat = p.view({-1});
    for (int64_t idx : {int64_t{0}, p.numel() / 2, p.numel() - 1}) {
      double orig;
      double lp, lm;
      {
        torch::NoGradGuard g;
        orig = flat[idx].item<double>();
        flat[idx] = orig + eps;
        lp = m->lossAndStats(in, tgt).loss.item<double>();
        flat[idx] = orig - eps;
        lm = m->lossAndStats(in, tgt).loss.item<double>();
        flat[idx] = orig;
      }
      double fd = (lp - lm) / (2 * eps);
      double ad = grad.reshape({-1})[idx].item<double>();
      EXPECT_NEAR(ad, fd, 1e-7 + 1e-5 * std::abs(fd)) << name << "[" << idx << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 30);
  EXPECT_LT(unrouted * 3, checked) << "too few parameters received gradients to test anything";
}

TEST(Gradients, DenseMatchFiniteDifferences) { checkGradients(testing::tinyConfig()); }

TEST(Gradients, MoeWithAuxLossMatchFiniteDifferences) { checkGradients(testing::tinyMoeConfig()); }

TEST(Gradients, TiedEmbeddingsMatchFiniteDifferences) {
  auto c = testing::tinyConfig();
  c.tie_embeddings = true;
  c.n_layers = 1;
  checkGradients(c);
}

}  // namespace
}  // namespace archipelago::model
