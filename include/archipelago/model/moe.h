// Mixture-of-Experts FFN (Mixtral naming): a top-k softmax router over
// num_experts SwiGLU experts, an optional always-on shared expert
// (DeepSeek style), load balancing by an auxiliary loss (Switch/Mixtral) or by
// a selection-only router bias (DeepSeek-V3 auxiliary-loss-free), and an
// optional capacity limit that drops overflowing assignments.
//
// The forward pass is split into route -> dispatch -> computeExperts ->
// combine; expert parallelism (an ExpertExchange set) inserts an all-to-all
// after dispatch (each expert's rows to its owner) and one before combine
// (the results back) without touching the routing or the maths.
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
#include <memory>
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

// Expert parallelism: the members of an expert-parallel group each hold a
// contiguous range of every MoE layer's experts (member j: experts
// [expertBegin()[j], expertBegin()[j+1]), uneven counts allowed) and swap
// token rows with all-to-all(v). The runtime implements this over the comm
// layer (optionally compressing rows with a codec); the model only calls it.
// Calls are collective: every member makes them in the same order. Failures
// throw (std::runtime_error) — the runtime's step loop turns them into a
// Status.
class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // size()+1 entries, expertBegin()[0] = 0, last = num_experts.
  virtual const std::vector<int64_t>& expertBegin() const = 0;
  // Block j of `in` (send_counts[j] values) goes to member j; returns the
  // concatenation of the blocks received (recv_counts[i] values from member i).
  virtual std::vector<int64_t> alltoallvInt64(const std::vector<int64_t>& in, const std::vector<int64_t>& send_counts,
                                              const std::vector<int64_t>& recv_counts) = 0;
  // rows [sum(send_rows), dim] -> [sum(recv_rows), dim], same dtype: block j
  // (send_rows[j] rows) goes to member j. Not differentiable by itself.
  virtual torch::Tensor alltoallvRows(const torch::Tensor& rows, const std::vector<int64_t>& send_rows,
                                      const std::vector<int64_t>& recv_rows) = 0;
};

class MoeFfnImpl : public torch::nn::Module {
 public:
  // c must be resolved (resolveModelConfig); layer is the decoder layer index.
  // [expert_begin, expert_end) are the experts this module holds (expert
  // parallelism; -1 = all). Their tensors keep their global names
  // (experts.{j} with the global j), so checkpoints do not depend on the split.
  MoeFfnImpl(const core::ModelConfig& c, int64_t layer, int64_t expert_begin = 0, int64_t expert_end = -1);

  // x [B, T, dim] -> [B, T, dim]. Records stats() and, in training mode
  // with router-bias balancing, adds this batch's load to loadCounts().
  torch::Tensor forward(const torch::Tensor& x);

  // The four stages, usable one by one (x2d is [N, dim]).
  Routing route(const torch::Tensor& x2d) const;
  // `block`: tokens per sample of x2d (sequence parallelism orders the
  // whole sequence's assignments by sample; 0: one sample).
  Dispatched dispatch(const torch::Tensor& x2d, const Routing& routing, int64_t block = 0) const;
  // Needs every expert (no expert-parallel split).
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

  // Expert parallelism: with an exchange set, forward() sends each kept
  // assignment to the member holding its expert and brings the result back
  // (differentiably: the backward pass runs the reverse all-to-all). The
  // exchange's expertBegin() must match this module's expert range.
  void setExchange(std::shared_ptr<ExpertExchange> exchange);
  int64_t expertBegin() const { return expert_begin_; }
  int64_t expertEnd() const { return expert_end_; }
  int64_t numExperts() const { return num_experts_; }

  // Sequence parallelism (set with a sequence context, else empty): each
  // rank of the tensor-parallel group routes its block of the sequence
  // through the replicated experts, and the balance loss and the capacity
  // are the whole sequence's: the load and the mean router probability are
  // summed over the group (the probabilities' sum as Megatron's g: summed
  // forward, identity backward), and an assignment's place in its expert's
  // priority order counts the other ranks' assignments before it. The
  // experts' and router's gradients are then partial: the trainer sums them
  // over the group with the norms'.
  TensorParallelContext tp;

  LinearNoBias gate{nullptr};
  // The experts held, in order: experts[i] is global expert expertBegin() + i.
  torch::nn::ModuleList experts{nullptr};
  SwiGlu shared_expert{nullptr};

 private:
  // The expert-parallel path of forward (src/model/expert_parallel.cpp).
  torch::Tensor expertParallelFfn(const Dispatched& d, int64_t n_tokens);
  // Sequence parallelism: per flat (choice-major) assignment of this rank,
  // the assignments of the other ranks before it in its expert's order.
  torch::Tensor sequenceOffset(const torch::Tensor& flat_e, int64_t n, int64_t block) const;

  int64_t layer_;
  int64_t num_experts_;
  int64_t expert_begin_ = 0;
  int64_t expert_end_ = 0;
  std::shared_ptr<ExpertExchange> exchange_;
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
