// The decoder's and the MoE's operators on the device, each against an fp64
// reference written from the op's formula (docs/model.md), not from the
// model's code. Tolerance terms (r roundings, n-term sums) are stated per op.
#include <cmath>
#include <limits>

#include "archipelago/core/config.h"
#include "archipelago/model/layers.h"
#include "archipelago/model/moe.h"
#include "runtime/check_ops/op_case.h"

namespace archipelago::runtime::check_ops {

namespace {

using torch::indexing::Slice;

// Copies `value` into a module's tensor (a weight set for a check).
void assign(torch::Tensor& param, const torch::Tensor& value) {
  torch::NoGradGuard no_grad;
  param.copy_(value);
}

// Every projection of the model is a torch::linear (x W^T, no bias).
// r = 2: the output's rounding, and one more for a split-K partial sum that
// a GPU library may round in the format (cuBLAS's reduced-precision
// reduction for bf16 / fp16, on by default in PyTorch); the sum itself must
// accumulate in fp32.
OpResult matmul(const OpContext& c) {
  const int64_t m = c.size(16, 128), k = c.size(32, 256), n = c.size(24, 96);
  auto x = c.input({m, k}, 1.0, "matmul.x");
  auto w = c.input({n, k}, 1.0 / std::sqrt(static_cast<double>(k)), "matmul.w");
  return {torch::linear(x.dev, w.dev), x.ref.mm(w.ref.t()), {}, formatName(c.dtype), 2, k};
}

// softmax(q k^T / sqrt(hd) with keys after the query masked) v.
// r = 4: scores, probabilities and output rounded, plus exp's own error.
OpResult attention(const OpContext& c) {
  const int64_t b = c.size(1, 2), h = c.size(2, 4), t = c.size(8, 64), hd = c.size(8, 32);
  auto q = c.input({b, h, t, hd}, 1.0, "attention.q");
  auto k = c.input({b, h, t, hd}, 1.0, "attention.k");
  auto v = c.input({b, h, t, hd}, 1.0, "attention.v");
  auto scores = q.ref.matmul(k.ref.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
  auto later = torch::ones({t, t}, torch::kBool).triu(1);
  scores = scores.masked_fill(later, -std::numeric_limits<double>::infinity());
  auto ref = torch::softmax(scores, -1).matmul(v.ref);
  return {model::causalAttention(q.dev, k.dev, v.dev, 0), ref, {}, formatName(c.dtype), 4, std::max(t, hd)};
}

// w * x / sqrt(mean(x^2) + eps). r = 3: the normalised value, the product
// with the weight and the mean's own rounding.
OpResult rmsnorm(const OpContext& c) {
  const int64_t rows = c.size(8, 256), dim = c.size(32, 512);
  const double eps = 1e-5;
  auto x = c.input({rows, dim}, 1.0, "rmsnorm.x");
  auto w = c.input({dim}, 0.1, "rmsnorm.w", c.dtype, /*mean=*/1.0);
  model::RmsNorm norm(dim, eps);
  norm->to(c.device, c.dtype);
  assign(norm->weight, w.dev);
  auto ref = w.ref * x.ref / torch::sqrt(x.ref.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return {norm(x.dev), ref, {}, formatName(c.dtype), 3, dim};
}

// Rotary embedding at positions start..start+T-1, HF "rotate_half" layout:
// element i pairs with i + hd/2 at angle pos * theta^(-2i/hd). The model's
// tables are fp32 (cast to the dtype when applied). r = 4: table cast, two
// products, one sum.
OpResult rotary(const OpContext& c) {
  const int64_t b = c.size(1, 2), h = c.size(2, 4), t = c.size(8, 64), hd = c.size(16, 64), start = 5;
  const double theta = 10000.0;
  auto x = c.input({b, h, t, hd}, 1.0, "rotary.x");
  auto tables = model::rotaryTables(start, t, hd, theta, c.device, torch::kFloat);
  auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  auto inv_freq = torch::pow(theta, -2.0 * torch::arange(hd / 2, f64) / static_cast<double>(hd));
  auto angle = torch::outer(torch::arange(start, start + t, f64), inv_freq);  // [t, hd/2]
  auto cs = angle.cos(), sn = angle.sin();
  auto x1 = x.ref.index({"...", Slice(0, hd / 2)}), x2 = x.ref.index({"...", Slice(hd / 2, hd)});
  auto ref = torch::cat({x1 * cs - x2 * sn, x2 * cs + x1 * sn}, -1);
  return {model::applyRotary(x.dev, tables), ref, {}, formatName(c.dtype), 4, 2};
}

// down(silu(gate x) * up x) for rows x [n, dim], weights [out, in].
torch::Tensor swigluRef(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& up,
                        const torch::Tensor& down) {
  auto g = x.mm(gate.t());
  return (g * torch::sigmoid(g) * x.mm(up.t())).mm(down.t());
}

struct SwiGluWeights {
  Operand gate, up, down;
};
SwiGluWeights swigluWeights(const OpContext& c, int64_t dim, int64_t hidden, const std::string& name) {
  const double in_std = 1.0 / std::sqrt(static_cast<double>(dim)), out_std = 1.0 / std::sqrt(static_cast<double>(hidden));
  return {c.input({hidden, dim}, in_std, name + ".gate"), c.input({hidden, dim}, in_std, name + ".up"),
          c.input({dim, hidden}, out_std, name + ".down")};
}
void assignSwiGlu(model::SwiGluImpl& m, const SwiGluWeights& w) {
  assign(m.gate->weight, w.gate.dev);
  assign(m.up->weight, w.up.dev);
  assign(m.down->weight, w.down.dev);
}

// r = 4: both projections, the gated product, the down projection.
OpResult swiglu(const OpContext& c) {
  const int64_t rows = c.size(8, 128), dim = c.size(32, 256), hidden = c.size(64, 688);
  auto x = c.input({rows, dim}, 1.0, "swiglu.x");
  auto w = swigluWeights(c, dim, hidden, "swiglu");
  model::SwiGlu m(dim, hidden);
  m->to(c.device, c.dtype);
  assignSwiGlu(*m, w);
  auto ref = swigluRef(x.ref, w.gate.ref, w.up.ref, w.down.ref);
  return {m(x.dev), ref, {}, formatName(c.dtype), 4, std::max(dim, hidden)};
}

core::ModelConfig moeConfig(int64_t dim, int64_t hidden, int64_t experts, int64_t top_k) {
  core::ModelConfig m;
  m.vocab_size = 16;
  m.dim = dim;
  m.n_layers = 1;
  m.n_heads = 1;
  m.ffn_hidden = hidden;
  m.moe.num_experts = experts;
  m.moe.top_k = top_k;
  m.moe.expert_hidden = hidden;
  m.moe.balance = "none";
  m.moe.capacity_factor = 0;
  return m;
}

// Top-k routing. Near-ties may legitimately pick another expert, so the
// device's choice is judged by the reference: the reference probability of
// each expert it chose against that of the reference's choice (their
// difference is what a wrong choice costs) and its combine weights against
// the reference weights of the experts it chose. r = 3: logits, softmax,
// renormalisation; n = dim (the router's sum).
OpResult moeRoute(const OpContext& c) {
  const int64_t rows = c.size(16, 256), dim = c.size(32, 256), experts = 8, k = 2;
  auto x = c.input({rows, dim}, 1.0, "moe_route.x");
  auto gate = c.input({experts, dim}, 1.0 / std::sqrt(static_cast<double>(dim)), "moe_route.gate");
  model::MoeFfn moe(moeConfig(dim, 16, experts, k), 0);
  moe->to(c.device, c.dtype);
  assign(moe->gate->weight, gate.dev);
  model::Routing routing = moe->route(x.dev);
  auto probs = torch::softmax(x.ref.mm(gate.ref.t()), -1);
  auto chosen = routing.expert.to(torch::kCPU);
  auto p_chosen = probs.gather(1, chosen);
  auto p_best = probs.gather(1, std::get<1>(probs.topk(k, -1)));
  auto weight_ref = p_chosen / p_chosen.sum(-1, /*keepdim=*/true);
  auto device = torch::cat({routing.weight.to(torch::kCPU, torch::kDouble).reshape({-1}), p_chosen.reshape({-1})});
  auto ref = torch::cat({weight_ref.reshape({-1}), p_best.reshape({-1})});
  return {device, ref, {}, formatName(c.dtype), 3, dim};
}

// Dispatch (rows grouped by expert), the experts, combine (weighted
// scatter-add back), under a fixed routing so both sides route alike:
// out[n] = sum_j w[n, j] expert_{e[n, j]}(x[n]). r = 6: the SwiGLU's four,
// the combine weight's cast and product; n = the longest expert sum.
OpResult moeDispatchCombine(const OpContext& c) {
  const int64_t rows = c.size(16, 128), dim = c.size(32, 128), hidden = c.size(32, 256), experts = 4, k = 2;
  auto x = c.input({rows, dim}, 1.0, "moe_dispatch.x");
  auto logits = c.input({rows, experts}, 1.0, "moe_dispatch.logits", torch::kFloat);
  auto top = torch::softmax(logits.ref, -1).topk(k, -1);
  auto choice = std::get<1>(top);
  auto weight = (std::get<0>(top) / std::get<0>(top).sum(-1, true)).to(torch::kFloat);  // fp32, as route() gives
  model::MoeFfn moe(moeConfig(dim, hidden, experts, k), 0);
  moe->to(c.device, c.dtype);
  auto ref = torch::zeros({rows, dim}, torch::kDouble);
  auto weight_of = torch::zeros({rows, experts}, torch::kDouble).scatter(1, choice, weight.to(torch::kDouble));
  for (int64_t e = 0; e < experts; ++e) {
    auto w = swigluWeights(c, dim, hidden, "moe_dispatch.expert" + std::to_string(e));
    assignSwiGlu(*moe->experts[static_cast<size_t>(e)]->as<model::SwiGluImpl>(), w);
    ref += weight_of.index({Slice(), Slice(e, e + 1)}) * swigluRef(x.ref, w.gate.ref, w.up.ref, w.down.ref);
  }
  model::Routing routing;
  routing.expert = choice.to(c.device);
  routing.weight = weight.to(c.device);
  auto counts = torch::bincount(choice.reshape({-1}), {}, experts);
  routing.tokens_per_expert.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + experts);
  model::Dispatched d = moe->dispatch(x.dev, routing);
  auto out = moe->combine(moe->computeExperts(d), d, rows);
  return {out, ref, {}, formatName(c.dtype), 6, std::max(dim, hidden)};
}

// The LM loss as TransformerImpl::headLoss computes it: logits in the
// compute dtype, cross-entropy summed in fp32, divided by the token count.
struct CrossEntropyRun {
  torch::Tensor loss, grad;          // device
  torch::Tensor loss_ref, grad_ref;  // fp64
  int64_t vocab = 0;
};
CrossEntropyRun crossEntropyRun(const OpContext& c) {
  const int64_t n = c.size(16, 256), vocab = c.size(64, 512);
  auto logits = c.input({n, vocab}, 2.0, "cross_entropy.logits");
  auto target = torch::remainder(torch::arange(n, torch::kLong) * 131 + static_cast<int64_t>(c.seed % 997), vocab);
  auto leaf = logits.dev.detach().clone().requires_grad_(true);
  namespace F = torch::nn::functional;
  auto loss = F::cross_entropy(leaf.to(torch::kFloat), target.to(c.device),
                               F::CrossEntropyFuncOptions().reduction(torch::kSum)) /
              static_cast<double>(n);
  loss.backward();
  // loss = mean(logsumexp(z) - z[target]); d loss / d z = (softmax(z) - onehot) / n.
  auto lse = torch::logsumexp(logits.ref, -1);
  auto picked = logits.ref.gather(1, target.unsqueeze(1)).squeeze(1);
  auto onehot = torch::zeros_like(logits.ref).scatter(1, target.unsqueeze(1), 1.0);
  return {loss.detach(), leaf.grad(), (lse - picked).mean(), (torch::softmax(logits.ref, -1) - onehot) / static_cast<double>(n),
          vocab};
}

// Forward: the loss is computed in fp32 whatever the logits' dtype. r = 3:
// exp, log, the sum's own rounding; n = vocab.
OpResult crossEntropy(const OpContext& c) {
  auto run = crossEntropyRun(c);
  return {run.loss, run.loss_ref, {}, "fp32", 3, run.vocab};
}

// Gradient with respect to the logits, rounded to their dtype. r = 2.
OpResult crossEntropyGrad(const OpContext& c) {
  auto run = crossEntropyRun(c);
  return {run.grad, run.grad_ref, {}, formatName(c.dtype), 2, run.vocab};
}

}  // namespace

std::vector<OpDef> modelOps() {
  return {{"matmul", matmul},
          {"attention", attention},
          {"rmsnorm", rmsnorm},
          {"rotary", rotary},
          {"swiglu", swiglu},
          {"moe_route", moeRoute},
          {"moe_dispatch_combine", moeDispatchCombine},
          {"cross_entropy", crossEntropy},
          {"cross_entropy_grad", crossEntropyGrad}};
}

}  // namespace archipelago::runtime::check_ops
