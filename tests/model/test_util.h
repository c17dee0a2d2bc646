// Shared helpers for the model tests: tiny configs and plain fp64 reference
// maths written with loops (independent of the code under test).
#pragma once

#include <cmath>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/model/transformer.h"

namespace archipelago::model::testing {

inline core::ModelConfig tinyConfig() {
  core::ModelConfig c;
  c.vocab_size = 13;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.ffn_hidden = 24;
  c.max_seq_len = 32;
  c.rope_theta = 10000.0;
  c.norm_eps = 1e-5;
  return resolveModelConfig(c).value();
}

inline core::ModelConfig tinyMoeConfig(const std::string& balance = "aux_loss") {
  core::ModelConfig c = tinyConfig();
  c.moe.num_experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_hidden = 12;
  c.moe.shared_expert = true;
  c.moe.balance = balance;
  c.moe.aux_loss_coef = 0.05;
  return resolveModelConfig(c).value();
}

// Every parameter and buffer set to normal(0, std) from one generator.
inline void randomize(torch::nn::Module& m, double std, uint64_t seed) {
  torch::NoGradGuard g;
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& p : m.parameters()) p.copy_(torch::empty(p.sizes(), torch::kDouble).normal_(0, std, gen));
}

using Mat = std::vector<std::vector<double>>;

inline std::vector<double> toVec(const torch::Tensor& t) {
  auto c = t.to(torch::kDouble).contiguous().reshape({-1});
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// W [out, in] row-major; y = W x.
inline std::vector<double> matvec(const torch::Tensor& w, const std::vector<double>& x) {
  auto wv = toVec(w);
  int64_t out = w.size(0), in = w.size(1);
  std::vector<double> y(static_cast<size_t>(out), 0.0);
  for (int64_t o = 0; o < out; ++o) {
    double s = 0;
    for (int64_t i = 0; i < in; ++i) s += wv[static_cast<size_t>(o * in + i)] * x[static_cast<size_t>(i)];
    y[static_cast<size_t>(o)] = s;
  }
  return y;
}

inline double silu(double v) { return v / (1.0 + std::exp(-v)); }

// SwiGLU with weights gate [h, d], up [h, d], down [d, h].
inline std::vector<double> swiglu(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                                  const std::vector<double>& x) {
  auto g = matvec(gate, x);
  auto u = matvec(up, x);
  for (size_t i = 0; i < g.size(); ++i) g[i] = silu(g[i]) * u[i];
  return matvec(down, g);
}

inline double maxAbsDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace archipelago::model::testing
