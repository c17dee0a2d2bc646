// Discrete-event simulator (see simulator.h). One event loop holds every
// group's representative replica: devices execute forward/backward ops in a
// static Megatron order (1F1B, or interleaved for several chunks per
// device), each op starting once its input has arrived, and
// flows drain on links with equal per-weight shares, recomputed whenever a
// flow starts or ends.
#include "archipelago/plan/simulator.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <queue>
#include <tuple>
#include <random>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "plan/arith.h"
#include "plan/schedule.h"

namespace archipelago::plan {
namespace {

struct Flow {
  int link_dir;        // link * 2 + direction
  double remaining;    // bytes of the representative flow
  double weight;       // identical flows sharing the link
  double latency;
  int kind;            // 0 activation fwd, 1 gradient bwd, 2 dp, 3 sync
  int group, vstage, mb;
  double start;
};

struct Device {
  int group = 0;
  int stage = 0;            // device index in its group's pipeline
  double busy_until = 0;
  bool busy = false;
  int64_t f_done = 0, b_done = 0;  // ops started, in the device's static order
  double busy_time = 0;
  double last_b_end = 0;
  bool grads_reduced = false, backward_done = false;  // both before the optimizer
  std::vector<char> f_ready, b_ready;  // inputs arrived, [chunk * m + mb]
  int64_t b_remaining = 0;
};

struct Timed {
  double t;
  int type;  // 0 compute done, 1 arrival
  int dev;   // device (compute) or target device (arrival)
  int op;    // 0 F, 1 B, 2 optimizer
  int chunk, mb;
  bool operator>(const Timed& o) const { return t > o.t; }
};

}  // namespace

core::Result<SimResult> simulateStep(const Plan& plan, const SimOptions& options) {
  SimResult res;
  std::vector<Device> devs;
  std::vector<int> group_first;  // first device index per group
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
    const auto& g = plan.groups[gi];
    group_first.push_back(static_cast<int>(devs.size()));
    const int64_t P = static_cast<int64_t>(g.stages.size());
    const int64_t v = std::max<int64_t>(g.virtual_stages, 1);
    const int64_t m = g.micro_batches;
    // Overflow-checked: a plan file may hold any 64-bit micro-batch count.
    int64_t ops = 0;
    if (m < 1) return core::invalidArgument("simulate: group " + std::to_string(gi) + " has no micro-batches");
    if (__builtin_mul_overflow(m, v, &ops) || __builtin_mul_overflow(ops, P, &ops) || ops > 50'000'000) {
      return core::resourceExhausted("simulate: too many operations in one step");
    }
    for (int64_t s = 0; s < P; ++s) {
      Device dv;
      dv.group = static_cast<int>(gi);
      dv.stage = static_cast<int>(s);
      dv.f_ready.assign(static_cast<size_t>(v * m), 0);
      dv.b_ready.assign(static_cast<size_t>(v * m), 0);
      dv.b_remaining = v * m;
      if (s == 0) {
        for (int64_t j = 0; j < m; ++j) dv.f_ready[static_cast<size_t>(j)] = 1;  // chunk 0 inputs are local
      }
      devs.push_back(std::move(dv));
    }
  }
  std::priority_queue<Timed, std::vector<Timed>, std::greater<>> pq;
  std::vector<Flow> flows;
  std::vector<double> link_weight(plan.links.size() * 2, 0.0);
  nlohmann::json trace = nlohmann::json::array();
  const bool want_trace = options.trace;
  auto traceEvent = [&](const std::string& name, int pid, int tid, double t0, double t1, const std::string& cat) {
    if (!want_trace || pid >= options.max_trace_groups) return;
    trace.push_back({{"name", name}, {"cat", cat}, {"ph", "X"}, {"pid", pid}, {"tid", tid},
                     {"ts", t0 * 1e6}, {"dur", std::max(0.0, (t1 - t0) * 1e6)}});
  };
  std::vector<double> group_end(plan.groups.size(), 0.0);
  std::vector<int64_t> stages_left(plan.groups.size(), 0);
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) stages_left[gi] = static_cast<int64_t>(plan.groups[gi].stages.size());

  // Where the output of group g's virtual stage vs goes.
  auto deviceOf = [&](int g, int64_t vs) {
    const int64_t P = static_cast<int64_t>(plan.groups[static_cast<size_t>(g)].stages.size());
    return group_first[static_cast<size_t>(g)] + static_cast<int>(vs % P);
  };
  auto arrivalOf = [&](const Flow& f, double t) {
    Timed a{t + f.latency, 1, -1, f.kind, f.vstage, f.mb};
    if (f.kind == 0 || f.kind == 1) a.dev = deviceOf(f.group, f.vstage);
    if (f.kind == 2) a.dev = f.vstage;  // dp flows carry the device index in vstage
    return a;
  };
  // Straits are shared by every flow on them; an island network link stands
  // for each device's own NIC, so its flows only share with their own
  // identical copies (weight).
  auto rateOf = [&](const Flow& f) {
    const LinkInfo& li = plan.links[static_cast<size_t>(f.link_dir / 2)];
    return li.strait ? li.bandwidth / link_weight[static_cast<size_t>(f.link_dir)] : li.bandwidth / f.weight;
  };
  // Activations and gradients between two stages travel in order on one
  // channel (one per hop and direction): on a strait the next message
  // waits for the previous one to leave, while different channels (other
  // hops, other groups, the sync) share the strait's bandwidth.
  struct Channel {
    bool busy = false;
    std::deque<Flow> queue;
  };
  std::map<std::tuple<int, int, int>, Channel> channels;
  auto channelOf = [&](const Flow& f) -> Channel* {
    if ((f.kind != 0 && f.kind != 1) || f.link_dir < 0) return nullptr;
    if (!plan.links[static_cast<size_t>(f.link_dir / 2)].strait) return nullptr;
    return &channels[{f.group, f.kind, f.vstage}];
  };
  auto startFlow = [&](Flow f) {
    if (f.link_dir < 0 || f.remaining <= 0) {
      pq.push(arrivalOf(f, f.start));
      return;
    }
    if (Channel* ch = channelOf(f)) {
      if (ch->busy) {
        ch->queue.push_back(f);
        return;
      }
      ch->busy = true;
    }
    link_weight[static_cast<size_t>(f.link_dir)] += f.weight;
    flows.push_back(f);
  };

  double now = 0;
  // Each device runs a static op order: Megatron's 1F1B (one chunk) or
  // interleaved order (v chunks; needs m % P == 0, which the planner
  // enforces); the planner evaluates the same order (plan/schedule.h).
  auto opAt = [&](const Device& dv, int64_t pos, int& op, int64_t& chunk, int64_t& mb) {
    const auto& g = plan.groups[static_cast<size_t>(dv.group)];
    detail::scheduleOpAt(static_cast<int64_t>(g.stages.size()), std::max<int64_t>(g.virtual_stages, 1),
                         g.micro_batches, dv.stage, pos, op, chunk, mb);
  };
  auto tryStart = [&](int di) {
    Device& dv = devs[static_cast<size_t>(di)];
    if (dv.busy) return;
    const auto& g = plan.groups[static_cast<size_t>(dv.group)];
    const int64_t v = std::max<int64_t>(g.virtual_stages, 1), m = g.micro_batches;
    if (dv.f_done + dv.b_done >= 2 * v * m) return;
    int op;
    int64_t c, j;
    opAt(dv, dv.f_done + dv.b_done, op, c, j);
    const size_t k = static_cast<size_t>(c * m + j);
    if (!(op == 0 ? dv.f_ready[k] : dv.b_ready[k])) return;
    const auto& sp = g.stages[static_cast<size_t>(dv.stage)];
    const double dur = (op == 0 ? sp.fwd_s : sp.bwd_s) / static_cast<double>(v);
    dv.busy = true;
    if (op == 0) ++dv.f_done; else ++dv.b_done;
    if (op == 1 && dv.b_done == v * m) {
      // The stage's last backward: its gradient buckets become ready during
      // it and are reduced over the island network while it runs (bucketed
      // overlap; equivalent bytes so that alone it takes the modelled time).
      const auto& sp0 = g.stages[static_cast<size_t>(dv.stage)];
      const double bw = plan.links[static_cast<size_t>(sp0.dp_link)].bandwidth;
      startFlow({sp0.dp_link * 2, sp0.dp_s * bw, 1.0, 0.0, 2, dv.group, di, 0, now});
    }
    pq.push({now + dur, 0, di, op, static_cast<int>(c), static_cast<int>(j)});
    traceEvent(fmt::format("{}{}{}", op == 0 ? "F" : "B", j, v > 1 ? fmt::format(".{}", c) : ""), dv.group,
               dv.stage, now, now + dur, op == 0 ? "forward" : "backward");
    dv.busy_time += dur;
  };

  // The optimizer step runs once the stage's backward is over and its
  // gradients are reduced.
  auto startOptimizer = [&](int di) {
    Device& dv = devs[static_cast<size_t>(di)];
    if (!dv.grads_reduced || !dv.backward_done) return;
    const auto& sp = plan.groups[static_cast<size_t>(dv.group)].stages[static_cast<size_t>(dv.stage)];
    pq.push({now + sp.optimizer_s, 0, di, 2, 0, 0});
    traceEvent("optimizer", dv.group, dv.stage, now, now + sp.optimizer_s, "optimizer");
  };

  for (size_t i = 0; i < devs.size(); ++i) tryStart(static_cast<int>(i));
  bool sync_started = false;
  double pipelines_end = 0;
  int64_t events = 0;
  while (true) {
    // Next flow completion at current rates.
    double next_flow = kInf;
    size_t next_idx = 0;
    for (size_t i = 0; i < flows.size(); ++i) {
      const auto& f = flows[i];
      const double rate = rateOf(f);
      const double t = now + f.remaining / rate;
      if (t < next_flow) {
        next_flow = t;
        next_idx = i;
      }
    }
    const double next_timed = pq.empty() ? kInf : pq.top().t;
    if (next_flow == kInf && next_timed == kInf) {
      if (!sync_started) {
        // All groups done: cross-group sync on the straits.
        sync_started = true;
        pipelines_end = now;
        for (const auto& [l, bytes] : plan.sync_flows) {
          startFlow({l * 2, bytes, 1.0, plan.links[static_cast<size_t>(l)].latency, 3, -1, 0, 0, now});
        }
        if (plan.sync_flows.empty()) break;
        continue;
      }
      break;
    }
    const double t = std::min(next_flow, next_timed);
    // Drain flows to t.
    for (auto& f : flows) {
      f.remaining -= rateOf(f) * (t - now);
    }
    now = t;
    ++events;
    if (next_flow <= next_timed) {
      Flow f = flows[next_idx];
      flows.erase(flows.begin() + static_cast<long>(next_idx));
      link_weight[static_cast<size_t>(f.link_dir)] -= f.weight;
      if (f.kind != 3 && f.group >= 0) {
        traceEvent(f.kind == 2 ? "dp-reduce" : (f.kind == 0 ? fmt::format("act{}", f.mb) : fmt::format("grad{}", f.mb)),
                   f.group, 1000 + f.link_dir, f.start, now, "comm");
      } else if (f.kind == 3) {
        traceEvent("cross-island sync", 0, 2000 + f.link_dir, f.start, now, "sync");
      }
      pq.push(arrivalOf(f, now));
      if (Channel* ch = channelOf(f)) {
        ch->busy = false;
        if (!ch->queue.empty()) {
          Flow next = ch->queue.front();
          ch->queue.pop_front();
          next.start = now;
          startFlow(next);
        }
      }
      continue;
    }
    Timed e = pq.top();
    pq.pop();
    if (e.type == 1) {
      if (e.op == 3 || e.dev < 0) continue;  // sync arrivals end with the loop
      Device& dv = devs[static_cast<size_t>(e.dev)];
      const auto& g = plan.groups[static_cast<size_t>(dv.group)];
      const int64_t P = static_cast<int64_t>(g.stages.size()), m = g.micro_batches;
      if (e.op == 2) {
        dv.grads_reduced = true;
        startOptimizer(e.dev);
        continue;
      }
      const int64_t chunk = e.chunk / P;  // virtual stage -> chunk on the target device
      const size_t k = static_cast<size_t>(chunk * m + e.mb);
      if (e.op == 0) dv.f_ready[k] = 1; else dv.b_ready[k] = 1;
      tryStart(e.dev);
      continue;
    }
    // Compute done.
    Device& dv = devs[static_cast<size_t>(e.dev)];
    dv.busy = false;
    const auto& g = plan.groups[static_cast<size_t>(dv.group)];
    const auto& sp = g.stages[static_cast<size_t>(dv.stage)];
    const int64_t P = static_cast<int64_t>(g.stages.size()), v = std::max<int64_t>(g.virtual_stages, 1),
                  m = g.micro_batches;
    const int64_t vs = e.chunk * P + dv.stage;
    if (e.op == 2) {
      group_end[static_cast<size_t>(dv.group)] = std::max(group_end[static_cast<size_t>(dv.group)], now);
      continue;
    }
    if (e.op == 0) {
      if (vs == P * v - 1) {
        dv.b_ready[static_cast<size_t>(e.chunk * m + e.mb)] = 1;  // last stage turns around
      } else {
        const int link = sp.p2p_link >= 0 ? sp.p2p_link : g.stages[0].dp_link;
        startFlow({link * 2, sp.p2p_bytes, sp.p2p_weight, plan.links[static_cast<size_t>(link)].latency, 0,
                   dv.group, static_cast<int>(vs + 1), e.mb, now});
      }
    } else {
      dv.last_b_end = now;
      if (vs > 0) {
        const int64_t prev_dev = (vs - 1) % P;
        const auto& psp = g.stages[static_cast<size_t>(prev_dev)];
        const int link = psp.p2p_link >= 0 ? psp.p2p_link : g.stages[0].dp_link;
        startFlow({link * 2 + 1, psp.p2p_bytes, psp.p2p_weight, plan.links[static_cast<size_t>(link)].latency, 1,
                   dv.group, static_cast<int>(vs - 1), e.mb, now});
      }
      if (--dv.b_remaining == 0) {
        dv.backward_done = true;
        startOptimizer(e.dev);
      }
    }
    tryStart(e.dev);
  }
  double max_group = 0;
  double bubble_w = 0, bubble_n = 0;
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
    res.group_step_s.push_back(group_end[gi]);
    max_group = std::max(max_group, group_end[gi]);
    const auto& g = plan.groups[gi];
    if (g.stages.size() > 1) {
      double pipe_end = 0, busy = 0;
      for (size_t s = 0; s < g.stages.size(); ++s) {
        const Device& dv = devs[static_cast<size_t>(group_first[gi]) + s];
        pipe_end = std::max(pipe_end, dv.last_b_end);
        busy += dv.busy_time;
      }
      const double frac = 1.0 - busy / (d(static_cast<int64_t>(g.stages.size())) * pipe_end);
      bubble_w += frac * d(g.devices);
    }
    bubble_n += d(g.devices);
  }
  const double sync_total = now - (sync_started ? pipelines_end : now);
  res.sync_exposed_s = plan.sync_flows.empty() ? 0.0 : sync_total / d(std::max<int64_t>(plan.diloco_h, 1));
  res.step_s = max_group + res.sync_exposed_s;
  double seqs = 0;
  for (const auto& g : plan.groups) seqs += g.batch_sequences;
  res.tokens_per_s = seqs * d(plan.setup.seq_len) / res.step_s;
  res.bubble_fraction = bubble_n > 0 ? bubble_w / bubble_n : 0;
  res.straits = plan.straits;
  res.events = events;
  if (want_trace) {
    nlohmann::json meta = nlohmann::json::array();
    for (size_t gi = 0; gi < plan.groups.size() && static_cast<int64_t>(gi) < options.max_trace_groups; ++gi) {
      meta.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", gi},
                      {"args", {{"name", fmt::format("group {} (one representative replica)", gi)}}}});
    }
    for (auto& e : trace) meta.push_back(std::move(e));
    nlohmann::json doc;
    doc["traceEvents"] = meta;
    doc["displayTimeUnit"] = "ms";
    res.trace_json = doc.dump();
  }
  return res;
}

GoodputResult simulateFailures(const Plan& plan, double step_s, const FailureOptions& o) {
  GoodputResult r;
  const double n = d(std::max<int64_t>(plan.devices, 1));
  const double lambda = n / (o.mtbf_hours * 3600.0);  // system failures per second
  const double horizon = o.horizon_hours * 3600.0;
  const double tau = o.checkpoint_interval_s > 0 ? o.checkpoint_interval_s
                                                 : std::sqrt(2.0 * o.checkpoint_write_s / lambda);
  r.checkpoint_interval_s = tau;
  std::mt19937_64 rng(o.seed);
  std::exponential_distribution<double> next(lambda);
  // Checkpoint-restart: work in segments of tau + checkpoint; a failure loses
  // the segment in progress and costs a restart.
  {
    double t = 0, useful = 0, fails = 0;
    while (t < horizon) {
      const double tf = t + next(rng);
      const double end = std::min(tf, horizon);
      const double seg = tau + o.checkpoint_write_s;
      const double k = std::floor((end - t) / seg);
      useful += k * tau;
      if (tf >= horizon) {
        useful += std::min(tau, end - t - k * seg);  // the tail since the last checkpoint
        break;
      }
      fails += 1;
      t = tf + o.restart_s;
    }
    r.failures = fails;
    r.checkpoint_goodput = std::max(0.0, useful / horizon);
  }
  // Elastic: a failure removes its replica (pipeline) until repaired; all
  // survivors lose the step in flight and pause to rebuild the group.
  {
    std::vector<double> replica_devices;
    for (const auto& g : plan.groups) {
      int64_t per = 0;
      for (const auto& s : g.stages) per += s.tp;
      for (int64_t i = 0; i < g.dp; ++i) replica_devices.push_back(d(per));
    }
    const double total = d(static_cast<int64_t>(replica_devices.size()));
    std::vector<double> down_until(replica_devices.size(), -1.0);
    std::discrete_distribution<size_t> pick(replica_devices.begin(), replica_devices.end());
    std::mt19937_64 rng2(o.seed + 1);
    std::exponential_distribution<double> next2(lambda);
    double t = 0, useful = 0;
    double tf = next2(rng2);
    while (t < horizon) {
      const double end = std::min(tf, horizon);
      // Integrate alive fraction between t and end, with repairs in between.
      double cur = t;
      while (cur < end) {
        double next_repair = end;
        double alive = 0;
        for (double du : down_until) {
          if (du <= cur) alive += 1;
          else next_repair = std::min(next_repair, du);
        }
        useful += (next_repair - cur) * alive / total;
        cur = next_repair;
      }
      if (tf >= horizon) break;
      const size_t victim = pick(rng2);
      down_until[victim] = std::max(down_until[victim], tf) + o.repair_hours * 3600.0;
      // The step in flight is lost and survivors pause to rebuild: that
      // time accrues no useful work.
      useful -= 0.5 * step_s;  // on average half a step was in flight
      t = std::min(horizon, tf + step_s + o.elastic_reconfig_s);
      tf = t + next2(rng2);
    }
    r.elastic_goodput = std::max(0.0, useful / horizon);
  }
  return r;
}

}  // namespace archipelago::plan
