// Planner search (see planner.h). Structure: evaluateGroup prices one fixed
// layout of one group (partition, memory, pipeline, DP); combine() joins
// groups with batch shares and the cross-group strategy; searchPlans
// enumerates groupings of islands and per-group layouts, pruned to the few
// layouts per group that can matter.
#include "archipelago/plan/planner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <numeric>
#include <set>

#include <fmt/format.h>

#include "plan/arith.h"
#include "plan/planner_internal.h"
#include "plan/schedule.h"

namespace archipelago::plan {
namespace {
constexpr double kBatchTolerance = 0.10;  // realised vs requested global batch
}  // namespace

void RejectStats::add(const std::string& reason, const std::string& example, int max_examples) {
  ++counts[reason];
  auto& ex = examples[reason];
  if (static_cast<int>(ex.size()) < max_examples) ex.push_back(example);
}

namespace detail {

double codecBytes(const std::string& codec) {
  if (codec == "none" || codec == "fp32") return 4;
  if (codec == "bf16" || codec == "fp16") return 2;
  // int8 / fp8: one byte per element plus one fp32 scale per 256-element block.
  return 1.0 + 4.0 / 256.0;
}

Planner::Planner(const core::ClusterSpec& cluster, const ModelSpec& model, const DeviceCatalog& catalog,
                 const PlanOptions& options, const CalibrationProfile* profile)
    : cluster_(cluster), model_(model), options_(options), cm_(model, options.setup, profile) {
  (void)catalog;
}

core::Status Planner::init(const DeviceCatalog& catalog) {
  if (cluster_.islands.empty()) return core::invalidArgument("cluster " + cluster_.name + ": no islands");
  for (size_t i = 0; i < cluster_.islands.size(); ++i) {
    const auto& is = cluster_.islands[i];
    auto dev = catalog.get(is.device);
    if (!dev.isOk()) return dev.status().withContext("cluster.islands[" + std::to_string(i) + "].device");
    DeviceSpec ds = *dev;
    StageLinks l;
    l.node_bandwidth = is.node_bandwidth > 0 ? is.node_bandwidth : ds.node_bandwidth;
    l.nic_bandwidth = is.fabric_bandwidth > 0 ? is.fabric_bandwidth : ds.nic_bandwidth;
    l.latency = ds.link_latency;
    devs_.push_back(ds);
    links_.push_back(l);
    LinkInfo li;
    li.name = is.name + ":net";
    li.bandwidth = l.nic_bandwidth;
    li.latency = 2e-6;
    plan_links_.push_back(li);
  }
  const int n = static_cast<int>(cluster_.islands.size());
  strait_link_.assign(static_cast<size_t>(n * n), -1);
  for (int a = 0; a < n; ++a) {
    for (int b = a + 1; b < n; ++b) {
      const auto* s = cluster_.strait(cluster_.islands[a].name, cluster_.islands[b].name);
      LinkInfo li;
      li.strait = true;
      li.name = cluster_.islands[a].name + "<->" + cluster_.islands[b].name;
      if (s) {
        li.bandwidth = s->bandwidth;
        li.latency = s->latency;
      } else if (cluster_.default_strait_bandwidth > 0) {
        li.bandwidth = cluster_.default_strait_bandwidth;
        li.latency = cluster_.default_strait_latency;
      } else {
        continue;
      }
      strait_link_[static_cast<size_t>(a * n + b)] = strait_link_[static_cast<size_t>(b * n + a)] =
          static_cast<int>(plan_links_.size());
      plan_links_.push_back(li);
    }
  }
  return core::okStatus();
}

int Planner::straitLink(int a, int b) const {
  const int n = static_cast<int>(cluster_.islands.size());
  return strait_link_[static_cast<size_t>(a * n + b)];
}

const std::vector<ItemCost>& Planner::items(int island, int64_t tp, int64_t ep, int64_t mb, Recompute rc) {
  const auto key = std::make_tuple(island, tp, ep, mb, static_cast<int>(rc));
  auto it = item_cache_.find(key);
  if (it != item_cache_.end()) return it->second;
  std::vector<ItemCost> v;
  const int64_t n = cm_.numItems();
  v.reserve(static_cast<size_t>(n));
  // Identical transformer layers cost the same: compute each kind once.
  ItemCost dense_c, moe_c;
  bool have_dense = false, have_moe = false;
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || i == n - 1) {
      v.push_back(cm_.itemCost(i, devs_[island], links_[island], tp, ep, mb, rc));
      continue;
    }
    const bool moe = model_.isMoeLayer(i - 1);
    ItemCost& c = moe ? moe_c : dense_c;
    bool& have = moe ? have_moe : have_dense;
    if (!have) {
      c = cm_.itemCost(i, devs_[island], links_[island], tp, ep, mb, rc);
      have = true;
    }
    v.push_back(c);
  }
  return item_cache_.emplace(key, std::move(v)).first->second;
}

bool Planner::evaluateGroup(const FixedLayout& L, double batch_seqs, GroupPlan& g, std::string& reason,
                            std::string& example) {
  ++evaluated_;
  const int k = static_cast<int>(L.islands.size());
  const auto fail = [&](const std::string& r, const std::string& ex) {
    reason = r;
    example = ex;
    return false;
  };
  const std::string tag = layoutTag(L);
  const TrainSetup& su = cm_.setup();
  if (L.dp < 1 || L.micro_batch < 1) return fail("invalid", tag + ": dp and micro-batch must be >= 1");
  if (model_.isMoe()) {
    if (model_.num_experts % L.ep != 0) return fail("ep does not divide experts", tag);
    if (L.dp % L.ep != 0) return fail("ep does not divide dp", tag);
  } else if (L.ep != 1) {
    return fail("ep on a dense model", tag);
  }
  int64_t P = 0;
  for (int j = 0; j < k; ++j) {
    const auto& is = cluster_.islands[static_cast<size_t>(L.islands[j])];
    const int64_t tp = L.tp[j];
    if (tp > is.devices_per_node) {
      return fail("tp exceeds devices per node", fmt::format("{}: tp {} > {} devices per node in {}", tag, tp,
                                                              is.devices_per_node, is.name));
    }
    if (model_.n_heads % tp != 0) return fail("tp does not divide heads", tag);
    if (tp * L.pp[j] * L.dp > is.count) {
      return fail("layout exceeds island", fmt::format("{}: {} devices needed > {} in {}", tag,
                                                       tp * L.pp[j] * L.dp, is.count, is.name));
    }
    if (L.pp[j] < 1) return fail("invalid", tag + ": pp must be >= 1");
    P += L.pp[j];
  }
  const int64_t v = std::max<int64_t>(L.virtual_stages, 1);
  const int64_t N = cm_.numItems();
  if (P * v > N) return fail("more stages than layers", fmt::format("{}: {} stages > {} items", tag, P * v, N));
  const double m_real = batch_seqs / (d(L.dp) * d(L.micro_batch));
  const int64_t m = static_cast<int64_t>(std::llround(m_real));
  if (m < 1) {
    return fail("batch too small for dp x micro-batch",
                fmt::format("{}: {:.1f} sequences per step < dp {} x micro-batch {}", tag, batch_seqs, L.dp,
                            L.micro_batch));
  }
  if (L.schedule == Schedule::kInterleaved && v > 1 && m % P != 0) {
    return fail("interleaved needs micro-batches divisible by stages",
                fmt::format("{}: {} micro-batches, {} stages", tag, m, P));
  }

  // Per-stage device context.
  struct StageCtx {
    int island;
    int64_t tp;
    const std::vector<ItemCost>* items;
    double cap;
    double inflight;
    double weight_copies;
  };
  std::vector<StageCtx> st;
  st.reserve(static_cast<size_t>(P));
  const int64_t expert_dp = std::max<int64_t>(L.dp / L.ep, 1);
  for (int j = 0; j < k; ++j) {
    const int isl = L.islands[j];
    const auto& items_v = items(isl, L.tp[j], L.ep, L.micro_batch, L.recompute);
    for (int64_t s = 0; s < L.pp[j]; ++s) {
      const int64_t gi = static_cast<int64_t>(st.size());
      double inflight = d(std::min<int64_t>(m, P - gi));
      double copies = 1;
      if (L.schedule == Schedule::kInterleaved && v > 1) inflight *= 1.0 + d(P - 1) / d(P * v);
      if (L.schedule == Schedule::kDualPipe) {
        inflight = d(std::min<int64_t>(m, P + 1));
        copies = 2;
      }
      const double cap = devs_[isl].memory_bytes - su.memory_reserve_bytes;
      st.push_back({isl, L.tp[j], &items_v, cap, inflight, copies});
    }
  }
  // Memory of items [a, b) on stage s.
  auto itemMem = [&](const StageCtx& s, const ItemCost& c) {
    return s.weight_copies * cm_.stateBytes(c.params, c.dense_params, L.dp, expert_dp, L.zero) +
           s.inflight * c.act_bytes;
  };
  auto itemTime = [&](const ItemCost& c) { return c.fwd_s + c.bwd_s; };

  std::vector<int64_t> counts(static_cast<size_t>(P), 0);
  std::string mem_fail;
  // Greedy contiguous partition under a per-stage time bound T and each
  // stage's memory; every stage gets at least one item.
  auto greedy = [&](double T, std::vector<int64_t>& out) -> bool {
    int64_t i = 0;
    for (int64_t s = 0; s < P; ++s) {
      const StageCtx& sc = st[static_cast<size_t>(s)];
      double t = 0, mem = 0;
      int64_t c = 0;
      const int64_t max_take = N - i - (P - s - 1);
      while (c < max_take) {
        const ItemCost& ic = (*sc.items)[static_cast<size_t>(i + c)];
        const double nt = t + itemTime(ic), nm = mem + itemMem(sc, ic);
        if ((nt > T && c > 0) || nm > sc.cap) break;
        t = nt;
        mem = nm;
        ++c;
      }
      if (c == 0) {
        if (T == kInf) {
          const ItemCost& ic = (*sc.items)[static_cast<size_t>(i)];
          mem_fail = fmt::format("{}: stage {} on {} needs {:.1f} GB for item {} alone > {:.1f} GB usable", tag, s,
                                 devs_[sc.island].kind, itemMem(sc, ic) / 1e9, i, sc.cap / 1e9);
        }
        return false;
      }
      out[static_cast<size_t>(s)] = c;
      i += c;
    }
    if (i < N && T == kInf) {
      mem_fail = fmt::format("{}: {} of {} items do not fit in {} stages' memory ({:.1f} GB usable per {})", tag,
                             N - i, N, P, st.back().cap / 1e9, devs_[st.back().island].kind);
    }
    return i == N;
  };

  if (!L.stage_items.empty()) {
    if (static_cast<int64_t>(L.stage_items.size()) != P ||
        std::accumulate(L.stage_items.begin(), L.stage_items.end(), int64_t{0}) != N) {
      return fail("invalid", fmt::format("{}: stage_items must have {} entries summing to {}", tag, P, N));
    }
    counts = L.stage_items;
  } else {
    if (!greedy(kInf, counts)) return fail("memory", mem_fail);
    // Binary search the smallest feasible max stage time.
    double lo = 0, hi = 0;
    {
      int64_t i = 0;
      for (int64_t s = 0; s < P; ++s) {
        double t = 0;
        for (int64_t c = 0; c < counts[static_cast<size_t>(s)]; ++c, ++i) {
          t += itemTime((*st[static_cast<size_t>(s)].items)[static_cast<size_t>(i)]);
        }
        hi = std::max(hi, t);
      }
    }
    std::vector<int64_t> trial(static_cast<size_t>(P));
    for (int it = 0; it < 24 && hi - lo > 1e-4 * hi; ++it) {
      const double mid = 0.5 * (lo + hi);
      if (greedy(mid, trial)) {
        hi = mid;
        counts = trial;
      } else {
        lo = mid;
      }
    }
  }

  // Stage costs.
  g = GroupPlan{};
  g.islands = L.islands;
  g.tp = L.tp;
  g.pp = L.pp;
  g.dp = L.dp;
  g.ep = L.ep;
  g.micro_batch = L.micro_batch;
  g.micro_batches = m;
  g.virtual_stages = v;
  g.schedule = L.schedule;
  g.recompute = L.recompute;
  g.zero = L.zero;
  g.batch_sequences = d(m * L.dp * L.micro_batch);
  const double tokens_mb = d(L.micro_batch) * d(su.seq_len);
  int64_t i = 0;
  double sum_t = 0, max_t = 0;
  detail::PipelineSpec pipe;
  pipe.micro_batches = m;
  pipe.virtual_stages = v;
  pipe.hop_latency.assign(static_cast<size_t>(P), 0.0);
  pipe.hop_transfer.assign(static_cast<size_t>(P), 0.0);
  pipe.hop_serialised.assign(static_cast<size_t>(P), 0);
  // The wrap from the last device to the first (interleaving) stays inside the first island.
  pipe.hop_latency.back() = plan_links_[static_cast<size_t>(st.front().island)].latency;
  for (int64_t s = 0; s < P; ++s) {
    const StageCtx& sc = st[static_cast<size_t>(s)];
    StagePlan sp;
    sp.island = sc.island;
    sp.device = devs_[sc.island].kind;
    sp.tp = sc.tp;
    sp.first_item = i;
    sp.num_items = counts[static_cast<size_t>(s)];
    double params = 0, dense = 0, act = 0, mem = 0;
    for (int64_t c = 0; c < sp.num_items; ++c, ++i) {
      const ItemCost& ic = (*sc.items)[static_cast<size_t>(i)];
      sp.fwd_s += ic.fwd_s;
      sp.bwd_s += ic.bwd_s;
      sp.model_flops_per_mb += ic.model_flops;
      params += ic.params;
      dense += ic.dense_params;
      act += ic.act_bytes;
      mem += itemMem(sc, ic);
    }
    if (mem > sc.cap && !L.stage_items.empty()) {
      return fail("memory", fmt::format("{}: stage {} on {} needs {:.1f} GB > {:.1f} GB usable", tag, s,
                                        devs_[sc.island].kind, mem / 1e9, sc.cap / 1e9));
    }
    sp.memory_bytes = mem + su.memory_reserve_bytes;
    sp.memory_capacity = devs_[sc.island].memory_bytes;
    sp.act_bytes_per_mb = act;
    // Gradient reduction inside the island (every replica's stage s lives there).
    const StageLinks& lk = links_[sc.island];
    const double wire = 2.0;  // bf16 gradients on the wire
    const double dense_b = dense * wire, expert_b = (params - dense) * wire;
    const bool dp_in_node = L.dp * sc.tp <= cluster_.islands[static_cast<size_t>(sc.island)].devices_per_node && P == 1;
    const double bw = dp_in_node ? lk.node_bandwidth : lk.nic_bandwidth;
    sp.dp_bytes = dense_b + expert_b;
    sp.dp_group = L.dp;
    sp.dp_link = sc.island;
    sp.dp_s = CostModel::allreduceTime(dense_b, L.dp, bw, lk.latency) +
              CostModel::allreduceTime(expert_b, expert_dp, bw, lk.latency);
    const double state = sc.weight_copies * cm_.stateBytes(params, dense, L.dp, expert_dp, L.zero);
    sp.optimizer_s = cm_.memoryTime(devs_[sc.island], 2.0 * state);
    if (L.zero >= 3) {
      // Parameters gathered before forward and backward of every micro-batch.
      const double gather = 2.0 * d(m) * CostModel::reduceScatterTime(params * su.weight_bytes, L.dp, bw, lk.latency);
      const double compute = d(m) * (sp.fwd_s + sp.bwd_s);
      sp.dp_s += std::max(0.0, gather - 0.8 * compute);
    }
    // Activations to the next stage.
    if (s + 1 < P) {
      const int next_isl = st[static_cast<size_t>(s + 1)].island;
      if (next_isl != sc.island) {
        const int link = straitLink(sc.island, next_isl);
        if (link < 0) {
          return fail("no strait between pipeline islands",
                      fmt::format("{}: no strait joins {} and {}", tag, cluster_.islands[sc.island].name,
                                  cluster_.islands[next_isl].name));
        }
        sp.p2p_link = link;
        sp.p2p_bytes = tokens_mb * d(model_.dim) * su.act_bytes;  // whole activation crosses once per replica
        sp.p2p_weight = d(L.dp);
      } else {
        sp.p2p_link = sc.island;
        sp.p2p_bytes = tokens_mb * d(model_.dim) * su.act_bytes / d(sc.tp);
        sp.p2p_weight = 1;
      }
      // Straits are shared by all replicas' flows (they queue); an island
      // network link stands for each device's own NIC.
      const LinkInfo& li = plan_links_[static_cast<size_t>(sp.p2p_link)];
      pipe.hop_latency[static_cast<size_t>(s)] = li.latency;
      pipe.hop_transfer[static_cast<size_t>(s)] = sp.p2p_bytes * sp.p2p_weight / li.bandwidth;
      pipe.hop_serialised[static_cast<size_t>(s)] = li.strait ? 1 : 0;
    }
    pipe.fwd_s.push_back(sp.fwd_s);
    pipe.bwd_s.push_back(sp.bwd_s);
    const double t = sp.fwd_s + sp.bwd_s;
    sum_t += t;
    max_t = std::max(max_t, t);
    g.stages.push_back(sp);
    g.devices += L.dp * sc.tp;
  }
  // Pipeline time: the static schedule (the simulator's very order) run
  // for one replica, every op starting when its device is free and its
  // input has arrived over its hop. This captures what closed forms miss on
  // mixed pipelines: 1F1B keeps only P-s micro-batches in flight at stage
  // s, so a slow or high-latency hop (a strait) stalls the stages in front
  // of it; the steady-state period becomes (work + 2 x hop time of a loop)
  // / micro-batches in flight when that exceeds the slowest stage.
  const detail::PipelineTiming timing = detail::evaluatePipeline(pipe);
  g.pipeline_s = timing.makespan;
  // DualPipe: forward and backward streams from both ends halve the fill.
  if (L.schedule == Schedule::kDualPipe) g.pipeline_s -= 0.5 * (sum_t - max_t);
  double work = 0;
  for (const auto& sp : g.stages) work += d(m) * (sp.fwd_s + sp.bwd_s);
  g.bubble_fraction = P > 1 ? std::max(0.0, 1.0 - work / (d(P) * g.pipeline_s)) : 0.0;
  // DP reduction: a stage's gradient buckets are reduced over the island
  // network while its last backward op runs (bucketed overlap); the
  // optimizer step follows once both are over. The step ends with the
  // slowest stage's optimizer step.
  double step_end = 0, exposed = 0;
  const double shift = g.pipeline_s - timing.makespan;
  for (int64_t s = 0; s < P; ++s) {
    const auto& sp = g.stages[static_cast<size_t>(s)];
    const double b0 = timing.last_bwd_start[static_cast<size_t>(s)] + shift;
    const double b1 = timing.last_bwd_end[static_cast<size_t>(s)] + shift;
    const double reduced = std::max(b1, b0 + sp.dp_s);
    step_end = std::max(step_end, reduced + sp.optimizer_s);
    exposed = std::max(exposed, std::max(0.0, b0 + sp.dp_s - g.pipeline_s));
  }
  g.dp_exposed_s = exposed;
  g.step_s = std::max(step_end, g.pipeline_s);
  return true;
}

std::string Planner::layoutTag(const FixedLayout& L) const {
  std::string s;
  for (size_t j = 0; j < L.islands.size(); ++j) {
    s += fmt::format("{}{}[tp{} pp{}]", j ? "+" : "", cluster_.islands[static_cast<size_t>(L.islands[j])].name,
                     L.tp[j], L.pp[j]);
  }
  s += fmt::format(" dp{}", L.dp);
  if (L.ep > 1) s += fmt::format(" ep{}", L.ep);
  s += fmt::format(" mb{} rc={} zero{}", L.micro_batch, recomputeName(L.recompute), L.zero);
  if (L.virtual_stages > 1) s += fmt::format(" v{}", L.virtual_stages);
  return s;
}

core::Result<Plan> Planner::combine(const std::vector<FixedLayout>& layouts, const std::string& strategy) {
  const double B = d(cm_.setup().global_batch_tokens) / d(cm_.setup().seq_len);
  const size_t G = layouts.size();
  // Initial shares proportional to each group's peak FLOP/s, then to the
  // throughput each achieves at its share (three rounds settle it).
  std::vector<double> share(G);
  double tot = 0;
  for (size_t gi = 0; gi < G; ++gi) {
    double peak = 0;
    for (size_t j = 0; j < layouts[gi].islands.size(); ++j) {
      const int isl = layouts[gi].islands[j];
      peak += devs_[isl].peakFlops(cm_.setup().compute_dtype) *
              d(layouts[gi].tp[j] * layouts[gi].pp[j] * layouts[gi].dp);
    }
    share[gi] = peak;
    tot += peak;
  }
  for (auto& s : share) s = s / tot * B;
  std::vector<GroupPlan> gp(G);
  for (int round = 0; round < 3; ++round) {
    double thr_sum = 0;
    std::vector<double> thr(G);
    for (size_t gi = 0; gi < G; ++gi) {
      std::string reason, example;
      if (!evaluateGroup(layouts[gi], share[gi], gp[gi], reason, example)) {
        return core::invalidArgument(reason + ": " + example);
      }
      thr[gi] = gp[gi].batch_sequences / gp[gi].step_s;
      thr_sum += thr[gi];
    }
    if (G == 1) break;
    for (size_t gi = 0; gi < G; ++gi) share[gi] = B * thr[gi] / thr_sum;
  }
  Plan p;
  p.model = model_.name;
  p.cluster = cluster_.name;
  p.setup = cm_.setup();
  p.groups = gp;
  p.links = plan_links_;
  p.total_params = model_.totalParams();
  p.active_params = model_.activeParams();
  double max_step = 0, seqs = 0;
  for (const auto& g : gp) {
    max_step = std::max(max_step, g.step_s);
    seqs += g.batch_sequences;
  }
  // Whole micro-batches per replica: a layout whose replicas cannot share
  // the requested global batch closely would train with another batch
  // (and look faster for it).
  if (std::fabs(seqs - B) > kBatchTolerance * B) {
    return core::invalidArgument(fmt::format("batch: the layout runs {:.0f} sequences per step, not the requested "
                                             "{:.0f} (whole micro-batches per replica); fewer replicas or a "
                                             "smaller micro-batch fit it",
                                             seqs, B));
  }
  // Cross-group sync on a ring of groups, each hop over the best strait.
  double sync_s = 0;
  if (G > 1) {
    const std::string codec = strategy == "diloco" ? options_.diloco_codec : options_.sync_codec;
    const double bytes = p.total_params * codecBytes(codec);
    const double ring = 2.0 * d(static_cast<int64_t>(G) - 1) / d(static_cast<int64_t>(G)) * bytes;
    for (size_t gi = 0; gi < G; ++gi) {
      const auto& a = gp[gi];
      const auto& b = gp[(gi + 1) % G];
      int best = -1;
      for (int ia : a.islands) {
        for (int ib : b.islands) {
          const int l = straitLink(ia, ib);
          if (l >= 0 && (best < 0 || plan_links_[l].bandwidth > plan_links_[best].bandwidth)) best = l;
        }
      }
      if (best < 0) return core::invalidArgument("no strait between groups: cannot synchronise replicas");
      if (G == 2 && gi == 1) break;  // two groups: one strait, used once
      p.sync_flows.push_back({best, ring});
      const LinkInfo& li = plan_links_[static_cast<size_t>(best)];
      sync_s = std::max(sync_s, ring / li.bandwidth + 2.0 * d(static_cast<int64_t>(G) - 1) * li.latency);
    }
    p.strategy = strategy;
    p.codec = codec;
    p.diloco_h = strategy == "diloco" ? options_.diloco_h : 1;
  } else {
    p.strategy = gp[0].islands.size() > 1 ? "pipeline" : "single";
    p.codec = "none";
    p.diloco_h = 1;
  }
  p.sync_s = sync_s;
  const double exposed_sync = G > 1 ? sync_s / d(p.diloco_h) : 0.0;
  p.step_s = max_step + exposed_sync;
  p.tokens_per_s = seqs * d(cm_.setup().seq_len) / p.step_s;
  // Device-kind statistics and strait traffic.
  std::map<std::string, DeviceKindStats> kinds;
  std::map<int, StraitTraffic> straits;
  double flops_all = 0, peak_all = 0, bubble_w = 0, bubble_n = 0;
  for (const auto& g : gp) {
    for (const auto& sp : g.stages) {
      auto& ks = kinds[sp.device];
      ks.kind = sp.device;
      const int64_t n = g.dp * sp.tp;
      ks.devices += n;
      const double f = d(n) * d(g.micro_batches) * sp.model_flops_per_mb;
      ks.mfu += f;  // accumulate FLOPs; normalised below
      ks.max_memory_bytes = std::max(ks.max_memory_bytes, sp.memory_bytes);
      ks.memory_capacity = sp.memory_capacity;
      flops_all += f;
      peak_all += d(n) * devs_[sp.island].peakFlops(Dtype::kBf16);
      if (sp.p2p_link >= 0 && plan_links_[static_cast<size_t>(sp.p2p_link)].strait) {
        auto& t = straits[sp.p2p_link];
        t.name = plan_links_[static_cast<size_t>(sp.p2p_link)].name;
        t.bytes_per_step += 2.0 * sp.p2p_bytes * sp.p2p_weight * d(g.micro_batches);
        t.busy_s += 2.0 * sp.p2p_bytes * sp.p2p_weight * d(g.micro_batches) /
                    plan_links_[static_cast<size_t>(sp.p2p_link)].bandwidth / 2.0;
      }
    }
    bubble_w += g.bubble_fraction * d(g.devices);
    bubble_n += d(g.devices);
  }
  for (const auto& [l, bytes] : p.sync_flows) {
    auto& t = straits[l];
    t.name = plan_links_[static_cast<size_t>(l)].name;
    t.bytes_per_step += bytes / d(p.diloco_h);
    t.busy_s += bytes / plan_links_[static_cast<size_t>(l)].bandwidth / d(p.diloco_h);
  }
  p.devices = 0;
  for (auto& [k, ks] : kinds) {
    const DeviceSpec* dev = nullptr;
    for (const auto& ds : devs_) {
      if (ds.kind == k) dev = &ds;
    }
    ks.tflops_per_device = ks.mfu / d(ks.devices) / p.step_s / 1e12;
    ks.mfu = ks.tflops_per_device * 1e12 / dev->peakFlops(Dtype::kBf16);
    p.devices += ks.devices;
    p.kinds.push_back(ks);
  }
  for (auto& [l, t] : straits) p.straits.push_back(t);
  p.mfu = flops_all / p.step_s / peak_all;
  p.bubble_fraction = bubble_n > 0 ? bubble_w / bubble_n : 0;
  std::string sum;
  for (size_t gi = 0; gi < G; ++gi) {
    const auto& g = gp[gi];
    FixedLayout L{g.islands, g.tp, g.pp, g.dp, g.ep, g.micro_batch, g.virtual_stages, g.schedule, g.recompute, g.zero, {}};
    sum += (gi ? " | " : "") + layoutTag(L);
  }
  p.summary = sum;
  return p;
}

}  // namespace detail

core::Result<Plan> evaluateLayout(const core::ClusterSpec& cluster, const ModelSpec& model,
                                  const DeviceCatalog& catalog, const PlanOptions& options,
                                  const std::vector<FixedLayout>& groups, const CalibrationProfile* profile) {
  detail::Planner pl(cluster, model, catalog, options, profile);
  ARCH_RETURN_IF_ERROR(pl.init(catalog));
  if (groups.empty()) return core::invalidArgument("evaluateLayout: no groups");
  return pl.combine(groups, options.strategy == "auto" ? "sync" : options.strategy);
}

}  // namespace archipelago::plan
