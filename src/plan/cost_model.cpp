// The analytical cost model (see cost_model.h). Conventions: activation
// bytes follow Korthikanti et al. 2022 ("Reducing Activation Recomputation
// in Large Transformer Models"); FLOPs follow Narayanan et al. 2021 (no
// causal discount in attention).
#include "archipelago/plan/cost_model.h"

#include <algorithm>
#include <cmath>

#include "plan/arith.h"

namespace archipelago::plan {
namespace {
constexpr double kAttentionKernelEfficiency = 0.75;  // flash attention vs a plain GEMM of equal FLOPs
constexpr double kMoeImbalance = 1.08;               // busiest expert rank vs the mean
}  // namespace

const char* recomputeName(Recompute r) {
  switch (r) {
    case Recompute::kNone: return "none";
    case Recompute::kSelective: return "selective";
    case Recompute::kFull: return "full";
  }
  return "?";
}

const char* scheduleName(Schedule s) {
  switch (s) {
    case Schedule::k1F1B: return "1f1b";
    case Schedule::kInterleaved: return "interleaved";
    case Schedule::kDualPipe: return "dualpipe";
  }
  return "?";
}

core::Result<Recompute> parseRecompute(const std::string& name) {
  for (Recompute r : kRecomputes) {
    if (name == recomputeName(r)) return r;
  }
  return core::invalidArgument("'" + name + "': expected none, selective or full");
}

core::Result<Schedule> parseSchedule(const std::string& name) {
  for (Schedule s : kSchedules) {
    if (name == scheduleName(s)) return s;
  }
  return core::invalidArgument("'" + name + "': expected 1f1b, interleaved or dualpipe");
}

double CostModel::achievedFlops(const DeviceSpec& dev, Dtype dtype, double gemm_flops) const {
  if (profile_) {
    if (auto f = profile_->achievedFlops(dev.kind, dtype, gemm_flops)) return *f;
  }
  const bool fp8 = dtype == Dtype::kFp8 && dev.fp8_flops > 0;
  const double eff = fp8 ? dev.fp8_efficiency : dev.matmul_efficiency;
  return dev.peakFlops(dtype) * eff;
}

double CostModel::matmulTime(const DeviceSpec& dev, Dtype dtype, double gemm_flops, double count) const {
  if (gemm_flops <= 0 || count <= 0) return 0;
  const double rate = achievedFlops(dev, dtype, gemm_flops);
  // A calibration profile already includes launch costs in small shapes.
  const bool calibrated = profile_ && profile_->find(dev.kind) != nullptr;
  return count * (gemm_flops / rate + (calibrated ? 0.0 : dev.kernel_overhead_s));
}

double CostModel::memoryTime(const DeviceSpec& dev, double bytes) const {
  double bw = dev.memory_bandwidth * dev.memory_efficiency;
  if (profile_) {
    if (const auto* dc = profile_->find(dev.kind); dc && dc->memory_bandwidth > 0) bw = dc->memory_bandwidth;
  }
  return bytes / bw;
}

double CostModel::allreduceTime(double bytes, int64_t n, double bw, double lat) {
  if (n <= 1 || bytes <= 0) return 0;
  const double nn = d(n);
  return 2.0 * (nn - 1) / nn * bytes / bw + 2.0 * std::log2(nn) * lat;
}

double CostModel::reduceScatterTime(double bytes, int64_t n, double bw, double lat) {
  if (n <= 1 || bytes <= 0) return 0;
  const double nn = d(n);
  return (nn - 1) / nn * bytes / bw + std::log2(nn) * lat;
}

double CostModel::allToAllTime(double bytes, int64_t n, double bw, double lat) {
  if (n <= 1 || bytes <= 0) return 0;
  const double nn = d(n);
  return (nn - 1) / nn * bytes / bw + (1.0 + std::log2(nn)) * lat;
}

ItemCost CostModel::itemCost(int64_t item, const DeviceSpec& dev, const StageLinks& links, int64_t tp, int64_t ep,
                             int64_t micro_batch, Recompute rc) const {
  ItemCost c;
  const ModelSpec& m = model_;
  const double T = d(tp);
  const double tokens = d(micro_batch) * d(setup_.seq_len);
  const double h = d(m.dim);
  const double ab = setup_.act_bytes;
  const Dtype dt = setup_.compute_dtype;
  const double sp = setup_.sequence_parallel ? T : 1.0;
  const double tp_ar = allreduceTime(tokens * h * ab, tp, links.node_bandwidth, links.latency);
  const double tp_exposed = 1.0 - setup_.tp_overlap;

  if (item == 0) {  // embedding: a gather (memory bound), vocab-parallel over TP
    c.params = m.embeddingParams() / T;
    c.dense_params = c.params;
    c.fwd_s = memoryTime(dev, 2 * tokens * h * ab) + tp_exposed * tp_ar;
    c.bwd_s = memoryTime(dev, 3 * tokens * h * ab);
    c.tp_comm_s = tp_exposed * tp_ar;
    c.act_bytes = tokens * h * ab / sp;
    return c;
  }
  if (item == numItems() - 1) {  // final norm + LM head + loss
    const double fwd_flops = 2.0 * tokens * h * d(m.vocab) / T;
    c.params = m.headParams() / T;
    c.dense_params = c.params;
    const double mm = matmulTime(dev, dt == Dtype::kFp8 ? Dtype::kBf16 : dt, fwd_flops, 1);
    const double mem = memoryTime(dev, tokens * d(m.vocab) / T * 4 * 3);  // fp32 softmax / loss
    c.fwd_s = mm + mem + tp_exposed * tp_ar;
    c.bwd_s = 2 * mm + mem + tp_exposed * tp_ar;
    c.tp_comm_s = 2 * tp_exposed * tp_ar;
    c.model_flops = 3 * fwd_flops;
    c.hw_flops = c.model_flops;
    c.act_bytes = tokens * h * ab / sp + tokens * d(m.vocab) / T * ab;
    if (rc == Recompute::kFull) {
      c.bwd_s += c.fwd_s;
      c.hw_flops += fwd_flops;
      c.act_bytes = tokens * h * ab / sp;
    }
    return c;
  }

  const int64_t layer = item - 1;
  const bool moe = m.isMoeLayer(layer);
  const double attn_p = m.attentionParams();
  // Attention projections: ~4 GEMMs (5 for MLA with its low-rank factors).
  const double attn_gemms = m.isMla() ? 5 : 4;
  const double attn_flops = 2.0 * tokens * attn_p / T;
  double fwd_compute = matmulTime(dev, dt, attn_flops / attn_gemms, attn_gemms);
  const double core_flops = m.attentionCoreForwardFlops(setup_.seq_len) * tokens / T;
  const double core_rate = achievedFlops(dev, Dtype::kBf16, core_flops) * kAttentionKernelEfficiency;
  const double core_s = core_flops / core_rate + dev.kernel_overhead_s;
  fwd_compute += core_s;
  double fwd_flops = attn_flops + core_flops;
  double ffn_act = 0;
  double ep_s = 0;
  double f_active = 0;
  const double mats = m.gated_ffn ? 3 : 2;
  if (moe) {
    const double ex_p = m.expertParams();
    const double e_local = d(m.num_experts) / d(ep);
    c.params = attn_p / T + (d(m.num_experts) * ex_p / d(ep) + d(m.shared_experts) * ex_p) / T +
               d(m.num_experts) * h + h;
    c.dense_params = attn_p / T + d(m.shared_experts) * ex_p / T + d(m.num_experts) * h + h;
    // Tokens each local expert sees: the EP group's tokens * top_k spread over all experts.
    const double tok_per_expert = tokens * d(m.top_k) * d(ep) / d(m.num_experts);
    const double routed_flops = 2.0 * tokens * d(m.top_k) * ex_p / T * kMoeImbalance;
    const double gemm = 2.0 * tok_per_expert * h * d(m.expert_hidden) / T;
    // Grouped GEMM: one launch per projection, size efficiency of one expert's GEMM.
    fwd_compute += routed_flops / achievedFlops(dev, dt, gemm) + mats * dev.kernel_overhead_s;
    (void)e_local;
    const double shared_flops = 2.0 * tokens * d(m.shared_experts) * ex_p / T;
    fwd_compute += matmulTime(dev, dt, shared_flops / mats, mats);
    const double router_flops = 2.0 * tokens * h * d(m.num_experts);
    fwd_compute += matmulTime(dev, Dtype::kBf16, router_flops, 1);
    fwd_flops += routed_flops / kMoeImbalance + shared_flops + router_flops;
    f_active = d((m.top_k + m.shared_experts) * m.expert_hidden);
    ffn_act = 2 * h + d(m.top_k) * 2 * h + (m.gated_ffn ? 8 : 4) * f_active;
    if (ep > 1) {
      const bool in_node = ep * tp <= dev.devices_per_node;
      const double bw = in_node ? links.node_bandwidth : links.nic_bandwidth;
      const double per_dev_tokens = tokens / sp;
      const double dispatch = allToAllTime(per_dev_tokens * d(m.top_k) * h * setup_.dispatch_bytes, ep, bw, links.latency);
      const double combine = allToAllTime(per_dev_tokens * d(m.top_k) * h * ab, ep, bw, links.latency);
      ep_s = (dispatch + combine) * (1.0 - setup_.ep_overlap);
    }
  } else {
    const double ffn_p = m.denseFfnParams();
    c.params = (attn_p + ffn_p) / T;
    c.dense_params = c.params;
    const double ffn_flops = 2.0 * tokens * ffn_p / T;
    fwd_compute += matmulTime(dev, dt, ffn_flops / mats, mats);
    fwd_flops += ffn_flops;
    f_active = d(m.ffn_hidden);
    ffn_act = 2 * h + (m.gated_ffn ? 8 : 4) * f_active + h;
  }
  // Memory-bound kernels: norms, residual adds, rotary, activation function.
  const double elem_bytes = tokens / T * (14 * h + 3 * f_active) * ab;
  const double fwd_mem = memoryTime(dev, elem_bytes);
  const double tp_fwd = tp_exposed * 2 * tp_ar;
  c.fwd_s = fwd_compute + fwd_mem + tp_fwd + ep_s;
  // Backward: 2x the matmul FLOPs, attention backward ~2.5x its forward.
  c.bwd_s = 2 * (fwd_compute - core_s) + 2.5 * core_s + 2 * fwd_mem + tp_fwd + ep_s;
  c.tp_comm_s = 2 * tp_fwd;
  c.ep_comm_s = 2 * ep_s;
  c.model_flops = 3 * fwd_flops;
  c.hw_flops = c.model_flops;

  // Activations stashed per micro-batch (bytes), Korthikanti et al. eq. for
  // attention (11 sbh + 5 a s^2 b without flash) plus the FFN/MoE terms and
  // 4 sbh for the two norms; sequence parallelism splits all of it over TP.
  double attn_act = 11 * h;
  if (!setup_.flash_attention) attn_act += 5.0 * d(m.n_heads) * d(setup_.seq_len);
  const double full_act = tokens * (attn_act + ffn_act + 4 * h) * (ab / 2) / sp;
  switch (rc) {
    case Recompute::kNone:
      c.act_bytes = full_act;
      break;
    case Recompute::kSelective:
      // Keep GEMM inputs only: recompute the attention core's s^2 part
      // (without flash attention), the activation function and the norms
      // (memory-bound, cheap) in backward.
      c.act_bytes = full_act - tokens * (ab / 2) / sp *
                                   ((setup_.flash_attention ? 0.0 : 5.0 * d(m.n_heads) * d(setup_.seq_len)) +
                                    (m.gated_ffn ? 4 : 2) * f_active + 2 * h);
      c.bwd_s += fwd_mem;
      if (!setup_.flash_attention) {
        c.bwd_s += core_s;
        c.hw_flops += core_flops;
      }
      break;
    case Recompute::kFull:
      c.act_bytes = tokens * h * ab / sp;
      c.bwd_s += c.fwd_s;
      c.hw_flops += fwd_flops;
      c.tp_comm_s += tp_fwd;
      c.ep_comm_s += ep_s;
      break;
  }
  return c;
}

double CostModel::stateBytes(double params, double dense_params, int64_t dp, int64_t expert_dp, int zero) const {
  const double expert = std::max(0.0, params - dense_params);
  const double shard = dense_params / d(std::max<int64_t>(dp, 1)) + expert / d(std::max<int64_t>(expert_dp, 1));
  const double w = setup_.weight_bytes * (zero >= 3 ? shard : params);
  const double g = setup_.grad_bytes * (zero >= 2 ? shard : params);
  const double o = setup_.optimizer_bytes * (zero >= 1 ? shard : params);
  return w + g + o;
}

}  // namespace archipelago::plan
