// Pipeline schedule order and its deterministic evaluation (see schedule.h).
#include "plan/schedule.h"

#include <algorithm>
#include <cstdint>

namespace archipelago::plan::detail {

void scheduleOpAt(int64_t P, int64_t v, int64_t m, int64_t stage, int64_t pos, int& op, int64_t& chunk, int64_t& mb) {
  const int64_t n = m * v;
  const int64_t s = stage;
  // Warm-up forwards before the first backward (Megatron: P-s-1 for 1F1B;
  // 2(P-s-1) + (v-1)P chunks with interleaving), then one forward one
  // backward alternating, then the cool-down backwards.
  const int64_t warm = v == 1 ? std::min(P - s - 1, m) : std::min((P - s - 1) * 2 + (v - 1) * P, n);
  int64_t k;
  if (pos < warm) {
    op = 0;
    k = pos;
  } else if (pos < warm + 2 * (n - warm)) {
    const int64_t i = (pos - warm) / 2;
    op = static_cast<int>((pos - warm) % 2);
    k = op == 0 ? warm + i : i;
  } else {
    op = 1;
    k = pos - n;
  }
  if (v == 1) {
    chunk = 0;
    mb = k;
  } else {
    const int64_t grp = k / (P * v), within = k % (P * v);
    chunk = within / P;
    mb = grp * P + within % P;
    if (op == 1) chunk = v - 1 - chunk;
  }
}

namespace {

PipelineTiming run(const PipelineSpec& sp, int64_t m) {
  const int64_t P = static_cast<int64_t>(sp.fwd_s.size());
  const int64_t v = std::max<int64_t>(sp.virtual_stages, 1);
  const int64_t slots = v * m;
  // Input arrival times per device and (chunk, micro-batch); -1 = not yet.
  std::vector<std::vector<double>> f_in(static_cast<size_t>(P), std::vector<double>(static_cast<size_t>(slots), -1.0));
  std::vector<std::vector<double>> b_in = f_in;
  for (int64_t j = 0; j < m; ++j) f_in[0][static_cast<size_t>(j)] = 0.0;  // chunk 0 of device 0 reads local data
  std::vector<int64_t> pos(static_cast<size_t>(P), 0);
  std::vector<double> free_at(static_cast<size_t>(P), 0.0);
  std::vector<double> link_free_f(static_cast<size_t>(P), 0.0), link_free_b(static_cast<size_t>(P), 0.0);
  PipelineTiming out;
  out.last_bwd_start.assign(static_cast<size_t>(P), 0.0);
  out.last_bwd_end.assign(static_cast<size_t>(P), 0.0);
  auto send = [&](int64_t hop, double t, std::vector<double>& link_free) {
    const size_t h = static_cast<size_t>(hop);
    const double tr = sp.hop_transfer[h];
    if (!sp.hop_serialised[h]) return t + tr + sp.hop_latency[h];
    const double depart = std::max(t, link_free[h]);
    link_free[h] = depart + tr;
    return depart + tr + sp.hop_latency[h];
  };
  const int64_t total = 2 * slots;
  int64_t done = 0;
  while (done < P * total) {
    bool progress = false;
    for (int64_t d = 0; d < P; ++d) {
      const size_t du = static_cast<size_t>(d);
      while (pos[du] < total) {
        int op;
        int64_t c, j;
        scheduleOpAt(P, v, m, d, pos[du], op, c, j);
        const size_t k = static_cast<size_t>(c * m + j);
        const double ready = op == 0 ? f_in[du][k] : b_in[du][k];
        if (ready < 0) break;
        const double start = std::max(free_at[du], ready);
        const double end = start + (op == 0 ? sp.fwd_s[du] : sp.bwd_s[du]) / static_cast<double>(v);
        free_at[du] = end;
        ++pos[du];
        ++done;
        progress = true;
        const int64_t vs = c * P + d;
        if (op == 0) {
          if (vs == P * v - 1) {
            b_in[du][k] = end;  // the last virtual stage turns around
          } else {
            const int64_t nd = (vs + 1) % P, nc = (vs + 1) / P;
            f_in[static_cast<size_t>(nd)][static_cast<size_t>(nc * m + j)] = send(d, end, link_free_f);
          }
        } else {
          if (pos[du] == total) {
            out.last_bwd_start[du] = start;
            out.last_bwd_end[du] = end;
          }
          if (vs > 0) {
            const int64_t pd = (vs - 1) % P, pc = (vs - 1) / P;
            b_in[static_cast<size_t>(pd)][static_cast<size_t>(pc * m + j)] = send(pd, end, link_free_b);
          }
        }
        out.makespan = std::max(out.makespan, end);
      }
    }
    if (!progress) break;  // cannot happen for a valid order; avoid spinning
  }
  return out;
}

}  // namespace

PipelineTiming evaluatePipeline(const PipelineSpec& spec) {
  const int64_t P = static_cast<int64_t>(spec.fwd_s.size());
  const int64_t m = std::max<int64_t>(spec.micro_batches, 1);
  if (P == 0) return {};
  // Prefix long enough to be past warm-up (<= 2P micro-batches) twice.
  const int64_t m1 = ((std::max<int64_t>(3 * P, 12) + P - 1) / P) * P;
  if (m <= m1 + P) return run(spec, m);
  const PipelineTiming a = run(spec, m1 - P), b = run(spec, m1);
  const double extra = static_cast<double>(m - m1) / static_cast<double>(P);
  PipelineTiming out = b;
  out.makespan = b.makespan + extra * (b.makespan - a.makespan);
  for (size_t d = 0; d < out.last_bwd_end.size(); ++d) {
    out.last_bwd_start[d] = b.last_bwd_start[d] + extra * (b.last_bwd_start[d] - a.last_bwd_start[d]);
    out.last_bwd_end[d] = b.last_bwd_end[d] + extra * (b.last_bwd_end[d] - a.last_bwd_end[d]);
  }
  return out;
}

}  // namespace archipelago::plan::detail
