// Mixture-of-Experts FFN (Mixtral naming): a top-k softmax router over
// num_experts SwiGLU experts, an optional always-on shared expert
// (DeepSeek style), load balancing by an auxiliary loss (Switch/Mixtral) or by
// a selection-only router bias (DeepSeek-V3 auxiliary-loss-free), and an
// optional capacity limit that drops overflowing assignments.
//
// The forward pass is split into route -> dispatch -> computeExperts ->
// combine so that expert parallelism can later insert an all-to-all after
// dispatch (send each expert's rows to its owner) and before combine (bring
// the results back) without touching the routing or the maths.
//
// Tensor names under model.layers.{i}.block_sparse_moe:
//   gate.weight [E, dim]                      router (Mixtral)
//   experts.{j}.w1.weight [hidden, dim]       gate projection (Mixtral)
//   experts.{j}.w3.weight [hidden, dim]       up projection (Mixtral)
//   experts.{j}.w2.weight [dim, hidden]       down projection (Mixtral)
//   shared_expert.{gate,up,down}_proj.weight  extension (Qwen2-MoE naming)
//   gate.e_score_correction_bias [E] (buffer) extension (DeepSeek-V3 naming)
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/model/layers.h"

namespace archipelago::model {

// What one MoE layer did in its last forward (for logging). Counts are over
// (token, choice) assignments: tokens * top_k in total.
struct MoeLayerStats {
  int64_t layer = -1;                       // decoder layer index
  int64_t tokens = 0;                       // tokens routed
  std::vector<int64_t> tokens_per_expert;   // assignments the router chose (before capacity)
  std::vector<int64_t> dropped_per_expert;  // assignments dropped by the capacity limit
  int64_t dropped = 0;                      // sum of dropped_per_expert
  int64_t capacity = 0;                     // per-expert capacity; 0 = unlimited
  double aux_loss = 0;                      // E * sum_e f_e * P_e (1.0 = perfectly balanced)
};

// The router's decision for N tokens.
struct Routing {
  torch::Tensor expert;   // [N, k] int64, chosen experts (best first)
  torch::Tensor weight;   // [N, k] fp32 combine weights (differentiable)
  torch::Tensor probs;    // [N, E] fp32 softmax router probabilities (differentiable)
  torch::Tensor aux_loss; // scalar fp32, E * sum_e f_e * P_e (differentiable through P)
  std::vector<int64_t> tokens_per_expert;
};

// Kept assignments grouped by expert (expert-major, rows of one expert
// contiguous), ready for local compute or for an all-to-all to expert owners.
struct Dispatched {
  torch::Tensor tokens;        // [M, dim] hidden states
  torch::Tensor token_index;   // [M] int64 source token of each row
  torch::Tensor weight;        // [M] combine weight of each row (x's dtype)
  std::vector<int64_t> rows_per_expert;     // sums to M
  std::vector<int64_t> dropped_per_expert;  // assignments over capacity
  int64_t capacity = 0;
};

class MoeFfnImpl : public torch::nn::Module {
 public:
  // c must be resolved (resolveModelConfig); layer is the decoder layer index.
  MoeFfnImpl(const core::ModelConfig& c, int64_t layer);

  // x [B, T, dim] -> [B, T, dim]. Records stats() and, in training mode
  // with router-bias balancing, adds this batch's load to loadCounts().
  torch::Tensor forward(const torch::Tensor& x);

  // The four stages, usable one by one (x2d is [N, dim]).
  Routing route(const torch::Tensor& x2d) const;
  Dispatched dispatch(const torch::Tensor& x2d, const Routing& routing) const;
  torch::Tensor computeExperts(const Dispatched& d);
  torch::Tensor combine(const torch::Tensor& expert_out, const Dispatched& d, int64_t n_tokens) const;

  // Per-expert capacity for n tokens: ceil(capacity_factor * n * k / E);
  // 0 = none (capacity_factor 0, or eval mode).
  int64_t capacityFor(int64_t n_tokens) const;

  const MoeLayerStats& stats() const { return stats_; }
  // The differentiable aux loss of the last forward (scalar).
  const torch::Tensor& lastAuxLoss() const { return last_aux_; }
  // Assignments per expert accumulated by training-mode forwards since the
  // last updateRouterBias (int64 [E], CPU).
  const torch::Tensor& loadCounts() const { return load_counts_; }
  // bias_e += rate * sign(mean(load) - load_e), then clears loadCounts().
  // Data-parallel callers pass the load summed over all ranks so every
  // replica applies the same update.
  void updateRouterBias(const torch::Tensor& load);
  torch::Tensor routerBias() const { return router_bias_; }

  LinearNoBias gate{nullptr};
  torch::nn::ModuleList experts{nullptr};
  SwiGlu shared_expert{nullptr};

 private:
  int64_t layer_;
  int64_t num_experts_;
  int64_t top_k_;
  bool use_bias_;
  double bias_rate_;
  double capacity_factor_;
  torch::Tensor router_bias_;  // buffer gate.e_score_correction_bias, fp32 [E]
  torch::Tensor load_counts_;
  torch::Tensor last_aux_;
  MoeLayerStats stats_;
};
TORCH_MODULE(MoeFfn);

}  // namespace archipelago::model
