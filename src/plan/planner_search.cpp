// The planner's search over groupings of islands and per-group layouts.
// Pruning: single-island layouts are enumerated fully (cheap: identical
// layers are priced once, the layer split is a greedy + bisection); layouts
// of groups spanning islands reuse each island's best tensor-parallel
// degrees and a small set of replica counts; only the top few layouts per
// group are combined into plans.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <set>

#include <fmt/format.h>

#include "archipelago/plan/planner.h"
#include "plan/arith.h"
#include "plan/planner_internal.h"

namespace archipelago::plan {
namespace {

struct Cand {
  FixedLayout layout;
  double tokens_per_s = 0;
};

std::vector<int64_t> ppChoices(int64_t max_pp) {
  std::vector<int64_t> out;
  for (int64_t p = 1; p <= max_pp; ++p) {
    if (p <= 8 || (p <= 32 && p % 4 == 0) || (p <= 64 && p % 8 == 0) || p % 32 == 0) out.push_back(p);
  }
  return out;
}

std::vector<int64_t> tpChoices(const ModelSpec& m, int64_t per_node) {
  std::vector<int64_t> out;
  for (int64_t t = 1; t <= per_node && t <= 8; t *= 2) {
    if (m.n_heads % t == 0) out.push_back(t);
  }
  return out;
}

std::vector<int64_t> epChoices(const ModelSpec& m, int64_t dp) {
  if (!m.isMoe()) return {1};
  std::vector<int64_t> out;
  for (int64_t e = 1; e <= std::min<int64_t>(m.num_experts, 256); e *= 2) {
    if (m.num_experts % e == 0 && dp % e == 0) out.push_back(e);
  }
  if (out.size() > 4) out.erase(out.begin(), out.end() - 4);  // small EP never wins for big MoE
  return out;
}

void keepTop(std::vector<Cand>& v, size_t n) {
  std::sort(v.begin(), v.end(), [](const Cand& a, const Cand& b) { return a.tokens_per_s > b.tokens_per_s; });
  if (v.size() > n) v.resize(n);
}

// All set partitions of {0..n-1}.
void setPartitions(int n, int i, std::vector<std::vector<int>>& cur, std::vector<std::vector<std::vector<int>>>& out) {
  if (i == n) {
    out.push_back(cur);
    return;
  }
  // By index: the recursion below may grow (reallocate) `cur`.
  for (size_t b = 0; b < cur.size(); ++b) {
    cur[b].push_back(i);
    setPartitions(n, i + 1, cur, out);
    cur[b].pop_back();
  }
  cur.push_back({i});
  setPartitions(n, i + 1, cur, out);
  cur.pop_back();
}

}  // namespace

core::Result<PlanResult> searchPlans(const core::ClusterSpec& cluster, const ModelSpec& model,
                                     const DeviceCatalog& catalog, const PlanOptions& options,
                                     const CalibrationProfile* profile) {
  const auto t0 = std::chrono::steady_clock::now();
  ARCH_RETURN_IF_ERROR(model.validate());
  if (options.setup.seq_len <= 0 || options.setup.global_batch_tokens < options.setup.seq_len) {
    return core::invalidArgument("--global-batch-tokens must be >= --seq-len > 0");
  }
  if (options.strategy != "auto" && options.strategy != "sync" && options.strategy != "diloco") {
    return core::invalidArgument("--strategy '" + options.strategy + "': expected auto|sync|diloco");
  }
  detail::Planner pl(cluster, model, catalog, options, profile);
  ARCH_RETURN_IF_ERROR(pl.init(catalog));
  PlanResult res;
  const int n = static_cast<int>(cluster.islands.size());
  const double B = d(options.setup.global_batch_tokens) / d(options.setup.seq_len);
  const int64_t N = model.n_layers + 2;
  const auto& devs = pl.devices();
  double peak_sum = 0;
  std::vector<double> peak(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    peak[static_cast<size_t>(i)] = devs[static_cast<size_t>(i)].peakFlops(options.setup.compute_dtype) *
                                   d(cluster.islands[static_cast<size_t>(i)].count);
    peak_sum += peak[static_cast<size_t>(i)];
  }
  auto tryLayout = [&](const FixedLayout& L, double share, std::vector<Cand>& out) {
    GroupPlan g;
    std::string reason, example;
    if (!pl.evaluateGroup(L, share, g, reason, example)) {
      res.rejected.add(reason, example, options.max_examples);
      return;
    }
    out.push_back({L, g.batch_sequences * d(options.setup.seq_len) / g.step_s});
  };
  const std::vector<Recompute> rcs = {Recompute::kNone, Recompute::kFull};
  const std::vector<int64_t> mbs = {1, 2, 4};

  // Single-island groups.
  std::vector<std::vector<Cand>> single(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const auto& is = cluster.islands[static_cast<size_t>(i)];
    const double share = B * peak[static_cast<size_t>(i)] / peak_sum;
    std::vector<Cand> cands;
    for (int64_t tp : tpChoices(model, is.devices_per_node)) {
      for (int64_t pp : ppChoices(std::min<int64_t>(N, is.count / tp))) {
        const int64_t dp = is.count / (tp * pp);
        if (dp < 1) continue;
        for (int64_t ep : epChoices(model, dp)) {
          for (int64_t mb : mbs) {
            if (share / d(dp * mb) < 0.5) {
              res.rejected.add("batch too small for dp x micro-batch",
                               fmt::format("{}[tp{} pp{}] dp{} mb{}: {:.0f} sequences", is.name, tp, pp, dp, mb, share),
                               options.max_examples);
              continue;
            }
            for (Recompute rc : rcs) {
              for (int64_t v : {int64_t{1}, int64_t{2}}) {
                if (v > 1 && pp < 2) continue;
                FixedLayout L;
                L.islands = {i};
                L.tp = {tp};
                L.pp = {pp};
                L.dp = dp;
                L.ep = ep;
                L.micro_batch = mb;
                L.recompute = rc;
                L.virtual_stages = v;
                L.schedule = v > 1 ? Schedule::kInterleaved : Schedule::k1F1B;
                L.zero = 1;
                tryLayout(L, share, cands);
                // ZeRO-3 gathers every stage's weights for each of the m
                // micro-batches (priced in Planner::evaluate): searched
                // without pipelines only; a user's --layout may combine them.
                if (pp == 1 && v == 1) {
                  L.zero = 3;
                  tryLayout(L, share, cands);
                }
              }
            }
          }
        }
      }
    }
    keepTop(cands, 3);
    single[static_cast<size_t>(i)] = cands;
  }

  // Groups spanning several islands, in every order the straits allow.
  std::map<std::vector<int>, std::vector<Cand>> spanning;
  auto spanCands = [&](std::vector<int> block) -> std::vector<Cand>& {
    std::sort(block.begin(), block.end());
    auto it = spanning.find(block);
    if (it != spanning.end()) return it->second;
    std::vector<Cand> cands;
    double share_peak = 0;
    for (int i : block) share_peak += peak[static_cast<size_t>(i)];
    const double share = B * share_peak / peak_sum;
    std::vector<int> order = block;
    do {
      if (order.front() > order.back()) continue;  // a reversed order is the same pipeline
      bool linked = true;
      for (size_t j = 0; j + 1 < order.size(); ++j) linked = linked && pl.straitLink(order[j], order[j + 1]) >= 0;
      if (!linked) continue;
      // Replica counts: powers of two and the single-island winners' counts.
      std::set<int64_t> dps;
      int64_t min_count = INT64_MAX;
      for (int i : order) min_count = std::min(min_count, cluster.islands[static_cast<size_t>(i)].count);
      for (int64_t x = 1; x <= min_count; x *= 2) dps.insert(x);
      for (int i : order) {
        for (const auto& c : single[static_cast<size_t>(i)]) dps.insert(c.layout.dp);
      }
      // Tensor parallel per island: the island's best and the largest.
      std::vector<std::vector<int64_t>> tps;
      for (int i : order) {
        std::set<int64_t> t;
        const auto tc = tpChoices(model, cluster.islands[static_cast<size_t>(i)].devices_per_node);
        if (!tc.empty()) t.insert(tc.back());
        if (!single[static_cast<size_t>(i)].empty()) t.insert(single[static_cast<size_t>(i)][0].layout.tp[0]);
        tps.emplace_back(t.begin(), t.end());
      }
      for (int64_t dp : dps) {
        if (share / d(dp) < 0.5) continue;
        std::vector<size_t> idx(order.size(), 0);
        while (true) {
          FixedLayout L;
          L.islands = order;
          L.dp = dp;
          bool ok = true;
          int64_t P = 0;
          for (size_t j = 0; j < order.size(); ++j) {
            const int64_t tp = tps[j][idx[j]];
            const int64_t pp = cluster.islands[static_cast<size_t>(order[j])].count / (tp * dp);
            if (pp < 1) ok = false;
            L.tp.push_back(tp);
            L.pp.push_back(pp);
            P += pp;
          }
          if (ok && P <= N) {
            auto eps = epChoices(model, dp);
            for (int64_t ep : {eps.back(), eps.front()}) {
              for (int64_t mb : {int64_t{1}, int64_t{2}}) {
                for (Recompute rc : rcs) {
                  L.ep = ep;
                  L.micro_batch = mb;
                  L.recompute = rc;
                  tryLayout(L, share, cands);
                }
              }
              if (eps.size() == 1) break;
            }
          } else if (ok) {
            res.rejected.add("more stages than layers", fmt::format("spanning dp{}: {} stages > {} items", dp, P, N),
                             options.max_examples);
          } else {
            res.rejected.add("layout exceeds island", fmt::format("spanning dp{}: an island has < tp x dp devices", dp),
                             options.max_examples);
          }
          size_t j = 0;
          while (j < idx.size() && ++idx[j] == tps[j].size()) idx[j++] = 0;
          if (j == idx.size()) break;
        }
      }
    } while (std::next_permutation(order.begin(), order.end()));
    keepTop(cands, 3);
    return spanning.emplace(block, std::move(cands)).first->second;
  };

  std::vector<std::vector<std::vector<int>>> partitions;
  if (options.allow_spanning && n <= 5) {
    std::vector<std::vector<int>> cur;
    setPartitions(n, 0, cur, partitions);
  } else {
    std::vector<std::vector<int>> p;
    for (int i = 0; i < n; ++i) p.push_back({i});
    partitions.push_back(p);
  }

  std::vector<Plan> plans;
  std::set<std::string> seen;
  auto addPlan = [&](const std::vector<FixedLayout>& layouts) {
    std::vector<std::string> strategies;
    if (layouts.size() == 1) {
      strategies = {"sync"};
    } else if (options.strategy == "auto") {
      strategies = {"sync"};
    } else {
      strategies = {options.strategy};
    }
    auto r = pl.combine(layouts, strategies[0]);
    if (!r.isOk()) {
      res.rejected.add("grouping infeasible", r.status().message(), options.max_examples);
      return;
    }
    Plan p = std::move(r).value();
    if (layouts.size() > 1 && options.strategy == "auto" &&
        p.sync_s > options.auto_diloco_threshold * p.step_s) {
      auto r2 = pl.combine(layouts, "diloco");
      if (r2.isOk()) p = std::move(r2).value();
    }
    const std::string key = p.summary + "/" + p.strategy;
    if (seen.insert(key).second) plans.push_back(std::move(p));
  };
  for (const auto& part : partitions) {
    std::vector<const std::vector<Cand>*> lists;
    bool ok = true;
    for (const auto& block : part) {
      const auto& l = block.size() == 1 ? single[static_cast<size_t>(block[0])] : spanCands(block);
      if (l.empty()) ok = false;
      lists.push_back(&l);
    }
    if (!ok) continue;
    std::vector<FixedLayout> base;
    for (const auto* l : lists) base.push_back((*l)[0].layout);
    addPlan(base);
    for (size_t b = 0; b < lists.size(); ++b) {
      for (size_t alt = 1; alt < lists[b]->size(); ++alt) {
        auto v = base;
        v[b] = (*lists[b])[alt].layout;
        addPlan(v);
      }
    }
  }
  std::sort(plans.begin(), plans.end(), [](const Plan& a, const Plan& b) { return a.tokens_per_s > b.tokens_per_s; });
  if (static_cast<int>(plans.size()) > options.top_k) plans.resize(static_cast<size_t>(options.top_k));
  res.plans = std::move(plans);
  res.evaluated = pl.evaluated();
  res.search_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (res.plans.empty()) {
    std::string why;
    for (const auto& [r, c] : res.rejected.counts) why += fmt::format("{}{} x{}", why.empty() ? "" : ", ", r, c);
    return core::resourceExhausted("no feasible plan for " + model.name + " on " + cluster.name + " (rejected: " +
                                   why + ")");
  }
  return res;
}

}  // namespace archipelago::plan
