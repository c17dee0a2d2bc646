#include "archipelago/plan/worker_memory.h"

#include <algorithm>

#include <fmt/format.h>

#include "plan/arith.h"

namespace archipelago::plan {
namespace {

// Parameters of one decoder layer a rank holds, by the group that shares
// them: the dense tensors (the stage's replicas) and the routed experts (the
// ranks holding the same experts).
struct LayerHeld {
  double dense = 0, experts = 0;
  double total() const { return dense + experts; }
};

double expertsHeld(const ModelSpec& m, const WorkerLayout& w) {
  return d(w.experts_held >= 0 ? w.experts_held : m.num_experts);
}

// Attention and pre-FFN norm split by TP (the projections; norms whole); an
// MoE layer's router, shared and routed experts replicated over the TP group.
LayerHeld layerHeld(const ModelSpec& m, const WorkerLayout& w, int64_t layer) {
  const double h = d(m.dim), T = d(w.tp);
  LayerHeld out;
  out.dense = (m.attentionParams() - h) / T + h;
  if (m.isMoeLayer(layer)) {
    out.dense += h + d(m.num_experts) * h + d(m.shared_experts) * m.expertParams();
    out.experts = expertsHeld(m, w) * m.expertParams();
  } else {
    out.dense += (m.denseFfnParams() - h) / T + h;
  }
  return out;
}

// Bytes autograd keeps per token of one MoE FFN besides its input (see the
// header): the router's fp32 probabilities and its indices, per assignment
// sent the weighted result and its combine weight with two int64 indices,
// per row an expert runs its input and the SwiGLU's four (expert
// parallelism adds two int64 permutations), the shared expert's four.
double moeActivationBytes(const ModelSpec& m, const WorkerLayout& w) {
  const double h = d(m.dim), b = w.compute_bytes, k = d(m.top_k), f = d(m.expert_hidden);
  const bool ep = w.ep > 1;
  const double router = 4 * d(m.num_experts) + 8 * k + (m.top_k > 1 ? 4 * k + 4 : 0.0);
  const double sent = k * (h * b + b + 16);
  // Rows run here per local token: every member of the group routes as many
  // tokens, spread evenly over the experts.
  const double rows = ep ? d(w.ep) * k * expertsHeld(m, w) / d(m.num_experts) : k;
  const double run = rows * (h * b + 4 * f * b + (ep ? 16.0 : 0.0));
  return router + sent + run + d(m.shared_experts) * 4 * f * b;
}

// Bytes autograd keeps per token of decoder layer `layer` (see the header).
double layerActivationBytes(const ModelSpec& m, const WorkerLayout& w, int64_t layer) {
  const double h = d(m.dim), T = d(w.tp), b = w.compute_bytes;
  const double hq = d(m.n_heads * m.head_dim), hkv = d(m.n_kv_heads * m.head_dim);
  const double outside = 6 * h / (w.sequence_parallel ? T : 1.0);  // input, norms' y and output x2, residual sum
  // Grouped-query attention saves k and v repeated to the query heads (the matmuls' inputs).
  const double kv = m.n_kv_heads < m.n_heads ? 2 * hkv + 2 * hq : 4 * hkv;
  const double softmax = w.fused_attention ? 0.0 : d(m.n_heads) * d(w.seq_len);
  const double attention = (3 * hq + kv + hq + softmax) / T;
  // Sequence parallelism: each TP rank routes its block of the sequence.
  if (m.isMoeLayer(layer)) return (outside + attention) * b + moeActivationBytes(m, w) / (w.sequence_parallel ? T : 1.0);
  return (outside + attention + 4 * d(m.ffn_hidden) / T) * b;
}

}  // namespace

core::Result<WorkerMemory> predictWorkerMemory(const ModelSpec& m, const WorkerLayout& w) {
  if (m.isMla()) return core::unimplemented("no memory model for multi-head latent attention yet");
  if (w.seq_len <= 0 || w.micro_batch <= 0 || w.micro_batches <= 0 || w.tp <= 0 || w.stages <= 0 ||
      w.layer_begin < 0 || w.layer_end <= w.layer_begin || w.layer_end > m.n_layers) {
    return core::invalidArgument("predictWorkerMemory: the layout is incomplete (seq_len, micro-batch, tp, stages, layers)");
  }
  if (m.isMoe() && (w.ep < 1 || w.experts_held > m.num_experts)) {
    return core::invalidArgument("predictWorkerMemory: the expert split is incomplete (ep, experts held)");
  }
  const bool first = w.layer_begin == 0, last = w.layer_end == m.n_layers;
  const double h = d(m.dim), V = d(m.vocab);
  // Vocab-parallel rows as model::splitRange deals them (the first V % T ranks one more).
  const double rows = d(m.vocab / w.tp + (w.tp_rank < m.vocab % w.tp ? 1 : 0));
  const double root_p = (first ? rows * h + d(m.learned_pos) * h : 0.0) +
                        (last ? (m.tie_embeddings ? 0.0 : rows * h) + (m.headParams() - (m.tie_embeddings ? 0.0 : V * h))
                              : 0.0);  // the final norm whole
  LayerHeld held{root_p, 0};
  double pair = 0, prev = 0;  // ZeRO-3's pool: the largest two consecutive layers
  const double tokens = d(w.micro_batch * w.seq_len);
  double layer_act = 0;  // bytes per token over the stage's layers
  for (int64_t l = w.layer_begin; l < w.layer_end; ++l) {
    const LayerHeld lh = layerHeld(m, w, l);
    held.dense += lh.dense;
    held.experts += lh.experts;
    pair = std::max(pair, prev + lh.total());
    prev = lh.total();
    layer_act += layerActivationBytes(m, w, l);
  }
  const double dense_group = d(std::max<int64_t>(1, w.zero_group));
  // Without EP the experts are replicated like the dense tensors (one range, one group).
  const double expert_group = w.ep > 1 ? d(std::max<int64_t>(1, w.expert_zero_group)) : dense_group;
  // The optimizer's slices (ZeRO; with EP one of the dense tensors and one
  // of the experts), or everything held as one piece.
  const bool two_pieces = w.zero >= 1 && m.isMoe() && w.ep > 1;
  const double dense_slice = held.dense / (w.zero >= 1 ? dense_group : 1.0);
  const double expert_slice = held.experts / (w.zero >= 1 ? expert_group : 1.0);
  const double updated = dense_slice + expert_slice;
  // AdamW's two moments, and its scratch the size of its largest piece.
  const double optimizer = 8 * updated + 4 * (two_pieces ? std::max(dense_slice, expert_slice) : updated);
  const double low = w.compute_bytes < 4 ? 2 * w.compute_bytes : 0.0;  // compute copy of weights and gradients

  WorkerMemory out;
  if (w.zero >= 3) {
    // Everything sharded; gathered: two layers at a time and the root tensors, weights and gradients.
    const double unit_b = w.compute_bytes < 4 ? 2 * w.compute_bytes : 8.0;
    out.state_bytes = 12 * updated + optimizer + unit_b * (pair + root_p);
  } else {
    out.state_bytes = (12 + low) * held.total() + optimizer;
  }
  if (w.elastic) out.rollback_bytes = 4 * (w.zero >= 3 ? updated : held.total()) + 8 * updated;

  const double b = w.compute_bytes;
  const double seq_split = w.sequence_parallel ? d(w.tp) : 1.0;  // the embedding's output and the final norm
  const double per_mb = tokens * (layer_act + b * ((first ? h / seq_split : 0.0) +
                                                   (last ? 3 * h / seq_split + 3 * rows : 0.0)));
  const double in_flight = d(std::min(w.stages - w.stage, w.micro_batches));
  out.activation_bytes = w.recompute ? in_flight * tokens * h * b + per_mb : in_flight * per_mb;

  auto mb = [](double x) { return x / 1e6; };
  out.detail = fmt::format("{:.0f} MB = state {:.0f} + rollback copy {:.0f} + activations {:.0f} ({:.0f} micro-batch(es) "
                           "of {} x {} tokens in flight{})",
                           mb(out.total()), mb(out.state_bytes), mb(out.rollback_bytes), mb(out.activation_bytes),
                           in_flight, w.micro_batch, w.seq_len, w.recompute ? ", recomputed" : "");
  return out;
}

}  // namespace archipelago::plan
