// The Mixture-of-Experts FFN (model/moe.h): routing, dispatch, the local
// experts, combine and router-bias balancing; sequence parallelism's whole-
// sequence balance loss and capacity order. The expert-parallel path is
// src/model/expert_parallel.cpp.
#include <algorithm>
#include <cmath>

#include "archipelago/model/moe.h"

namespace archipelago::model {

MoeFfnImpl::MoeFfnImpl(const core::ModelConfig& c, int64_t layer, int64_t expert_begin, int64_t expert_end)
    : layer_(layer),
      num_experts_(c.moe.num_experts),
      top_k_(c.moe.top_k),
      use_bias_(c.moe.balance == "router_bias"),
      bias_rate_(c.moe.router_bias_rate),
      capacity_factor_(c.moe.capacity_factor) {
  int64_t hidden = c.moe.expert_hidden > 0 ? c.moe.expert_hidden : c.ffn_hidden;
  expert_begin_ = expert_begin;
  expert_end_ = expert_end < 0 ? num_experts_ : expert_end;
  TORCH_CHECK(expert_begin_ >= 0 && expert_begin_ < expert_end_ && expert_end_ <= num_experts_, "expert range [",
              expert_begin_, ", ", expert_end_, ") is not inside [0, ", num_experts_, ")");
  gate = register_module("gate", LinearNoBias(c.dim, num_experts_));
  if (expert_begin_ == 0 && expert_end_ == num_experts_) {
    experts = register_module("experts", torch::nn::ModuleList());
    for (int64_t e = 0; e < num_experts_; ++e) experts->push_back(SwiGlu(c.dim, hidden, /*mixtral_names=*/true));
  } else {
    // A subset: registered under their global indices ("experts.5.w1.weight")
    // through a plain holder; `experts` lists them for local indexing.
    experts = torch::nn::ModuleList();
    auto holder = register_module("experts", std::make_shared<torch::nn::Module>());
    for (int64_t e = expert_begin_; e < expert_end_; ++e) {
      SwiGlu ex(c.dim, hidden, /*mixtral_names=*/true);
      holder->register_module(std::to_string(e), ex);
      experts->push_back(ex);
    }
  }
  if (c.moe.shared_expert) shared_expert = register_module("shared_expert", SwiGlu(c.dim, hidden));
  if (use_bias_) {
    // Persistent (checkpointed) but not trained: selection-only bias.
    router_bias_ = gate->register_buffer("e_score_correction_bias", torch::zeros({num_experts_}));
  }
  load_counts_ = torch::zeros({num_experts_}, torch::kLong);
  stats_.layer = layer;
}

int64_t MoeFfnImpl::capacityFor(int64_t n_tokens) const {
  // Capacity limits apply to training only: dropping tokens at inference
  // (generation feeds one token at a time) would only hurt quality.
  if (capacity_factor_ <= 0 || !is_training()) return 0;
  double cap = capacity_factor_ * static_cast<double>(n_tokens * top_k_) / static_cast<double>(num_experts_);
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(cap - 1e-9)));
}

Routing MoeFfnImpl::route(const torch::Tensor& x2d) const {
  Routing r;
  int64_t n = x2d.size(0);
  auto compute = x2d.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto logits = torch::linear(x2d, gate->weight).to(compute);
  r.probs = torch::softmax(logits, -1);
  auto select = r.probs.detach();
  if (use_bias_) select = select + router_bias_.to(select.options());
  auto top = select.topk(top_k_, -1, /*largest=*/true, /*sorted=*/true);
  r.expert = std::get<1>(top);
  r.weight = r.probs.gather(1, r.expert);
  // Renormalise over the chosen k (Mixtral); with k = 1 that would make the
  // weight a constant 1 and cut the router off from the LM loss, so top-1
  // keeps the raw probability (Switch).
  if (top_k_ > 1) r.weight = r.weight / r.weight.sum(-1, /*keepdim=*/true);
  auto counts = torch::bincount(r.expert.reshape({-1}), {}, num_experts_).to(torch::kCPU);
  r.tokens_per_expert.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + num_experts_);
  // Switch/Mixtral balance loss, normalised so perfect balance gives 1:
  // E * sum_e (assignments_e / (N k)) * mean_n probs[n, e].
  // Under sequence parallelism over the whole sequence (every rank's block).
  torch::Tensor load = counts.to(r.probs.device(), compute);
  torch::Tensor prob_sum = r.probs.sum(0);
  double n_all = static_cast<double>(n);
  if (tp.sequence) {
    tp.comm->allreduceSum(load);
    prob_sum = reduceFromTensorParallel(prob_sum, tp.comm.get());
    n_all *= tp.comm->size();
  }
  auto f = load / std::max(1.0, n_all * static_cast<double>(top_k_));
  r.aux_loss = static_cast<double>(num_experts_) * (f * (prob_sum / std::max(1.0, n_all))).sum();
  return r;
}

torch::Tensor MoeFfnImpl::sequenceOffset(const torch::Tensor& flat_e, int64_t n, int64_t block) const {
  // The whole micro-batch orders an expert's assignments by (choice, sample,
  // rank's block, token), this rank by (choice, sample, token): count per
  // key (choice, sample) and expert, gather every rank's counts, and add
  // the other ranks' assignments under earlier keys and this key's lower
  // ranks' (this rank's own earlier ones its local position counts).
  const int64_t samples = n / block, keys = top_k_ * samples, E = num_experts_;
  const auto iopts = flat_e.options();
  const torch::Tensor pos = torch::arange(n * top_k_, iopts);
  const torch::Tensor slot = (pos.div(n, "floor") * samples + (pos % n).div(block, "floor")) * E + flat_e;
  const torch::Tensor mine = torch::bincount(slot, {}, keys * E).view({keys, E}).to(torch::kDouble);
  const torch::Tensor all = tp.comm->allgather(mine.unsqueeze(0), 0);  // [ranks, keys, E]
  const torch::Tensor others = all.sum(0) - mine;
  const int me = tp.comm->rank();
  const torch::Tensor lower = me > 0 ? all.narrow(0, 0, me).sum(0) : torch::zeros_like(mine);
  const torch::Tensor offset = (others.cumsum(0) - others + lower).to(torch::kLong).view({-1}).to(iopts.device());
  return offset.index_select(0, slot);
}

Dispatched MoeFfnImpl::dispatch(const torch::Tensor& x2d, const Routing& r, int64_t block) const {
  Dispatched d;
  int64_t n = x2d.size(0);
  auto iopts = torch::TensorOptions().dtype(torch::kLong).device(x2d.device());
  // Choice-major order: every token's first choice outranks any second
  // choice when an expert overflows (GShard priority); ties by token order.
  auto flat_e = r.expert.t().reshape({-1});
  auto flat_tok = torch::arange(n, iopts).repeat({top_k_});
  auto flat_w = r.weight.t().reshape({-1});
  auto sorted = flat_e.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto sorted_e = std::get<0>(sorted);
  auto order = std::get<1>(sorted);
  d.capacity = capacityFor(tp.sequence ? n * tp.comm->size() : n);
  d.rows_per_expert = r.tokens_per_expert;
  d.dropped_per_expert.assign(static_cast<size_t>(num_experts_), 0);
  if (d.capacity > 0) {
    // Each assignment's place in its expert's priority order.
    auto counts = torch::tensor(r.tokens_per_expert, iopts);
    auto starts = counts.cumsum(0) - counts;
    auto rank = torch::arange(flat_e.size(0), iopts) - starts.index_select(0, sorted_e);
    if (tp.sequence) rank = rank + sequenceOffset(flat_e, n, block > 0 ? block : n).index_select(0, order);
    const torch::Tensor keep = rank < d.capacity;
    order = order.masked_select(keep);
    const torch::Tensor kept = torch::bincount(sorted_e.masked_select(keep), {}, num_experts_).to(torch::kCPU).contiguous();
    const int64_t* kept_rows = kept.data_ptr<int64_t>();
    for (size_t e = 0; e < d.rows_per_expert.size(); ++e) {
      d.dropped_per_expert[e] = d.rows_per_expert[e] - kept_rows[e];
      d.rows_per_expert[e] = kept_rows[e];
    }
  }
  d.token_index = flat_tok.index_select(0, order);
  d.weight = flat_w.index_select(0, order).to(x2d.scalar_type());
  d.tokens = x2d.index_select(0, d.token_index);
  return d;
}

torch::Tensor MoeFfnImpl::computeExperts(const Dispatched& d) {
  TORCH_CHECK(expert_begin_ == 0 && expert_end_ == num_experts_,
              "computeExperts needs every expert; this module holds a subset (expert parallelism: set an exchange)");
  std::vector<torch::Tensor> outs;
  int64_t off = 0;
  for (int64_t e = 0; e < num_experts_; ++e) {
    int64_t rows = d.rows_per_expert[static_cast<size_t>(e)];
    if (rows == 0) continue;
    outs.push_back(experts[static_cast<size_t>(e)]->as<SwiGluImpl>()->forward(d.tokens.narrow(0, off, rows)));
    off += rows;
  }
  if (outs.empty()) return torch::zeros({0, d.tokens.size(1)}, d.tokens.options());
  return torch::cat(outs, 0);
}

torch::Tensor MoeFfnImpl::combine(const torch::Tensor& expert_out, const Dispatched& d,
                                  int64_t n_tokens) const {
  auto out = torch::zeros({n_tokens, expert_out.size(1)}, expert_out.options());
  if (expert_out.size(0) == 0) return out;
  return out.index_add(0, d.token_index, expert_out * d.weight.unsqueeze(1));
}

torch::Tensor MoeFfnImpl::forward(const torch::Tensor& x) {
  auto x2d = x.reshape({-1, x.size(-1)});
  int64_t n = x2d.size(0);
  Routing r = route(x2d);
  Dispatched d = dispatch(x2d, r, x.dim() == 3 ? x.size(1) : 0);
  auto y = exchange_ ? expertParallelFfn(d, n) : combine(computeExperts(d), d, n);
  if (!shared_expert.is_empty()) y = y + shared_expert(x2d);
  last_aux_ = r.aux_loss;
  stats_.tokens = n;
  stats_.tokens_per_expert = r.tokens_per_expert;
  stats_.dropped_per_expert = d.dropped_per_expert;
  stats_.dropped = 0;
  for (int64_t v : d.dropped_per_expert) stats_.dropped += v;
  stats_.capacity = d.capacity;
  stats_.aux_loss = r.aux_loss.item<double>();
  if (is_training() && use_bias_) load_counts_ += torch::tensor(r.tokens_per_expert, torch::kLong);
  return y.view_as(x);
}

void MoeFfnImpl::updateRouterBias(const torch::Tensor& load) {
  if (!use_bias_) return;
  torch::NoGradGuard no_grad;
  auto l = load.to(torch::kCPU, torch::kDouble).reshape({-1});
  TORCH_CHECK(l.size(0) == num_experts_, "router load has ", l.size(0), " entries, expected ", num_experts_);
  auto step = torch::sign(l.mean() - l) * bias_rate_;
  auto updated = router_bias_.to(torch::kCPU, torch::kDouble) + step;
  router_bias_.copy_(updated.to(router_bias_.options()));
  load_counts_.zero_();
}

}  // namespace archipelago::model
