// The memory one worker of our runtime holds in tensors at its peak (the
// figure the step records measure as tensor_peak_bytes, docs/report.md):
// the planner's memory model applied to the runtime's own layout, so the
// prediction can be printed beside the measurement (issue 20, item 6).
//
//   state       fp32 masters, gradients and weight-decay mask (12 B per
//               parameter held), AdamW's two moments and its scratch buffer
//               (12 B per parameter it updates), a bf16/fp16 compute copy of
//               weights and gradients (4 B); ZeRO-1/2 shard the optimizer's
//               part over the group (the gradient buffer stays whole: it
//               is reduce-scattered in place), ZeRO-3 all of it, plus the
//               pool of gathered layers (two decoder layers' weights and
//               gradients) and the root tensors (embedding, final norm, head)
//   rollback    elastic data parallelism keeps a copy of masters and moments
//               (the rollback point of a failed step)
//   activations what autograd saves for backward in our eager modules: per
//               token and decoder layer 10 h + 4 h_kv + heads x seq (the
//               softmax, unless fused) + 4 f elements (the norms' inputs and
//               outputs, q and k before and after rotary, v, the attention
//               output, the residual sum, the SwiGLU's gate, activation, up
//               and product; with grouped-query attention k and v repeated
//               to the query heads instead of k after rotary and v;
//               TP splits what lies between its enter and leave: q, k, v,
//               softmax, attention output and the f terms), the final norm's
//               3 h and the loss's 3 x vocab (logits, log-softmax and its
//               gradient); for every micro-batch in flight (1F1B: min(P - s,
//               m) on stage s; one without a pipeline), or with
//               recomputation only the stage inputs plus one micro-batch's.
//   MoE layers  the router, its norm, the shared expert and the routed
//               experts held (EP: this member's; TP replicates all of them);
//               with EP, ZeRO shards the experts' optimizer state over the
//               ranks holding the same experts (expert_zero_group) and
//               AdamW's scratch is the larger of its two slices. Saved per
//               token: the router's fp32 probabilities [E] and int64 choices,
//               per assignment (top_k per token) the weighted expert result,
//               its combine weight and two int64 indices, per row an expert
//               runs (top_k per token; with EP the group's rows for this
//               member's experts, an even spread assumed) its input and the
//               SwiGLU's four f, plus two int64 permutations under EP; the
//               shared expert's four f; under sequence parallelism for the
//               rank's block of the sequence only.
// Multi-head latent attention is not modelled (the result says so).
#pragma once

#include <cstdint>
#include <string>

#include "archipelago/core/status.h"
#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {

// Where one worker sits in its job.
struct WorkerLayout {
  int64_t seq_len = 0;
  int64_t micro_batch = 1;     // samples per forward/backward
  int64_t micro_batches = 1;   // per step
  int64_t tp = 1;
  int64_t tp_rank = 0;         // vocab rows are dealt unevenly when V % tp != 0
  bool sequence_parallel = false;
  int64_t stages = 1;          // PP
  int64_t stage = 0;
  int64_t layer_begin = 0;     // the stage's decoder layers [begin, end)
  int64_t layer_end = 0;
  bool recompute = false;
  int zero = 0;
  int64_t zero_group = 1;      // ranks the sharded state is split over
  bool elastic = false;        // keeps a rollback copy
  double compute_bytes = 4;    // element size of the compute dtype (4 fp32, 2 bf16)
  bool fused_attention = false;  // a fused kernel keeps no heads x seq softmax per token
  // Mixture of experts (ignored for dense models).
  int64_t ep = 1;                 // expert-parallel group size
  int64_t experts_held = -1;      // routed experts per MoE layer held here (-1: all)
  int64_t expert_zero_group = 1;  // ranks the experts' sharded state is split over
};

struct WorkerMemory {
  double state_bytes = 0;
  double rollback_bytes = 0;
  double activation_bytes = 0;
  double total() const { return state_bytes + rollback_bytes + activation_bytes; }
  std::string detail;  // the parts in MB, for a log line
};

core::Result<WorkerMemory> predictWorkerMemory(const ModelSpec& model, const WorkerLayout& layout);

}  // namespace archipelago::plan
