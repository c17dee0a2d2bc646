#include "archipelago/plan/worker_memory.h"

#include <algorithm>

#include <fmt/format.h>

namespace archipelago::plan {
namespace {

double d(int64_t v) { return static_cast<double>(v); }

// Parameters of decoder layer `l` one TP rank holds: the projections split,
// the two norms whole.
double layerParamsPerRank(const ModelSpec& m, int64_t tp) {
  const double h = d(m.dim);
  return (m.attentionParams() - h) / d(tp) + h + (m.denseFfnParams() - h) / d(tp) + h;
}

// Elements autograd keeps per token of one decoder layer (see the header).
double layerActivationElements(const ModelSpec& m, const WorkerLayout& w) {
  const double h = d(m.dim), T = d(w.tp);
  const double hq = d(m.n_heads * m.head_dim), hkv = d(m.n_kv_heads * m.head_dim);
  const double outside = 6 * h / (w.sequence_parallel ? T : 1.0);  // input, norms' y and output x2, residual sum
  // Grouped-query attention saves k and v repeated to the query heads (the matmuls' inputs).
  const double kv = m.n_kv_heads < m.n_heads ? 2 * hkv + 2 * hq : 4 * hkv;
  const double softmax = w.fused_attention ? 0.0 : d(m.n_heads) * d(w.seq_len);
  const double inside = (3 * hq + kv + hq + softmax + 4 * d(m.ffn_hidden)) / T;
  return outside + inside;
}

}  // namespace

core::Result<WorkerMemory> predictWorkerMemory(const ModelSpec& m, const WorkerLayout& w) {
  if (m.isMoe()) return core::unimplemented("no memory model for MoE layers yet");
  if (m.isMla()) return core::unimplemented("no memory model for multi-head latent attention yet");
  if (w.seq_len <= 0 || w.micro_batch <= 0 || w.micro_batches <= 0 || w.tp <= 0 || w.stages <= 0 ||
      w.layer_begin < 0 || w.layer_end <= w.layer_begin || w.layer_end > m.n_layers) {
    return core::invalidArgument("predictWorkerMemory: the layout is incomplete (seq_len, micro-batch, tp, stages, layers)");
  }
  const bool first = w.layer_begin == 0, last = w.layer_end == m.n_layers;
  const double h = d(m.dim), V = d(m.vocab), T = d(w.tp);
  const double layers = d(w.layer_end - w.layer_begin);
  const double layer_p = layerParamsPerRank(m, w.tp);
  // Vocab-parallel rows as model::splitRange deals them (the first V % T ranks one more).
  const double rows = d(m.vocab / w.tp + (w.tp_rank < m.vocab % w.tp ? 1 : 0));
  const double root_p = (first ? rows * h + d(m.learned_pos) * h : 0.0) +
                        (last ? (m.tie_embeddings ? 0.0 : rows * h) + (m.headParams() - (m.tie_embeddings ? 0.0 : V * h))
                              : 0.0);  // the final norm whole
  const double held = layers * layer_p + root_p;
  const double group = d(std::max<int64_t>(1, w.zero_group));
  const double updated = w.zero >= 1 ? held / group : held;  // the optimizer's slice
  const double low = w.compute_bytes < 4 ? 2 * w.compute_bytes : 0.0;  // compute copy of weights and gradients

  WorkerMemory out;
  if (w.zero >= 3) {
    // Everything sharded; gathered: two layers at a time and the root tensors, weights and gradients.
    const double unit_b = w.compute_bytes < 4 ? 2 * w.compute_bytes : 8.0;
    out.state_bytes = 24 * held / group + unit_b * (std::min(2.0, layers) * layer_p + root_p);
  } else {
    out.state_bytes = (12 + low) * held + 12 * updated;
  }
  if (w.elastic) out.rollback_bytes = 4 * (w.zero >= 3 ? held / group : held) + 8 * updated;

  const double tokens = d(w.micro_batch * w.seq_len);
  const double b = w.compute_bytes;
  const double seq_split = w.sequence_parallel ? T : 1.0;  // the embedding's output and the final norm
  const double per_mb = tokens * b *
                        (layers * layerActivationElements(m, w) + (first ? h / seq_split : 0.0) +
                         (last ? 3 * h / seq_split + 3 * rows : 0.0));
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
