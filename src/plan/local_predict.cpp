// Predicted step time of a local run (see local_predict.h). The steps are
// replayed the way the trainer runs them on this host, each worker on its
// own clock from one meeting of all workers to the next (every step for
// sync, every outer step for DiLoCo, whose islands meet only inside
// themselves in between):
//   1. every worker commits (the elastic rollback copy), then computes
//      forward+backward of its share (micro-batches) on the host's cores
//      with the others computing at that moment (placed on cores the
//      kernel's way or processor sharing, measured co-run factors);
//   2. a worker with an EMULATED slowdown then sleeps (slowdown-1) x its
//      measured compute wall time (its core is free meanwhile);
//   3. gradients are reduced: inside each island over loopback TCP, across
//      islands over the EMULATED strait (codec, latency); buckets start as
//      soon as every rank has them, so the reduction overlaps the sleeps
//      and the other workers' remaining compute;
//   4. the ranks that meet wait for the slowest of them (the expected
//      maximum of their compute, by the calibrated spread);
//   5. control values (loss, tokens) are allreduced, every worker runs the
//      optimizer (sharing the cores again); DiLoCo's outer step waits for
//      every island and sends the pseudo-gradient over the strait.
// Shares start from the config (or 1/slowdown) and are moved by the
// trainer's rebalancer rule (core/shares.h, with its margin) at the same
// steps; the prediction is the mean over the steps the trainer times.
#include "archipelago/plan/local_predict.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "archipelago/core/shares.h"
#include "archipelago/core/workers.h"
#include "archipelago/plan/cost_model.h"
#include "plan/arith.h"

namespace archipelago::plan {
namespace {

constexpr double kLocalLatency = 50e-6;       // one loopback TCP message between local workers
constexpr double kDefaultLoopback = 1.0e9;    // bytes/s when the profile has no loopback measurement

struct LocalWorker {
  int island = 0;
  double slowdown = 1;
  DeviceSpec dev;
};

// Cores our job gets when it wants `demand` (threads x running workers)
// and the host's other load wants `load.groups`: the kernel shares the cores
// fairly between scheduling groups (each gets min(its demand, level), the
// level filling the cores). Our job is one group, or with load.per_thread
// one entity per thread (what a measured core share implies, see
// HostLoad). cores <= 0: not modelled.
double jobCapacity(double demand, const HostLoad& load, double cores) {
  if (cores <= 0) return demand;
  double total = demand;
  for (double g : load.groups) total += g;
  if (total <= cores) return demand;
  auto ours = [&](double level) { return load.per_thread ? demand * std::min(1.0, level) : std::min(demand, level); };
  double lo = 0, hi = cores;
  for (int it = 0; it < 60; ++it) {
    const double level = 0.5 * (lo + hi);
    double used = ours(level);
    for (double g : load.groups) used += std::min(g, level);
    (used > cores ? hi : lo) = level;
  }
  return ours(lo);
}

// How much more CPU time a unit of work takes when n workers of the job run
// at once (1 alone): piecewise linear through the measured co-run points,
// the last point's factor beyond it (1.0 without measurements).
double corunFactor(const std::vector<DeviceCalibration::Corun>& pts, double n, bool optimizer) {
  if (n <= 1) return 1.0;
  double x0 = 1, y0 = 1;
  for (const auto& p : pts) {
    const double x = d(p.threads), y = optimizer ? p.optimizer_factor : p.compute_factor;
    if (x <= x0) continue;
    if (n <= x) return y0 + (y - y0) * (n - x0) / (x - x0);
    x0 = x;
    y0 = y;
  }
  return y0;
}

// The run-to-run spread of a worker's compute with n workers running at
// once: the measured point nearest above n (the last one beyond), 0 unknown.
double corunCv(const std::vector<DeviceCalibration::Corun>& pts, double n) {
  double cv = 0;
  for (const auto& p : pts) {
    cv = p.compute_cv;
    if (d(p.threads) >= n) break;
  }
  return cv;
}

}  // namespace

double expectedMaxOfNormals(int64_t n) {
  // E[max of n independent standard normal variables] (tabulated to 8,
  // then the sqrt(2 ln n) growth with the same offset as at 8).
  static constexpr double kTable[] = {0.0, 0.0, 0.5642, 0.8463, 1.0294, 1.1630, 1.2672, 1.3522, 1.4236};
  if (n <= 1) return 0.0;
  if (n <= 8) return kTable[n];
  return kTable[8] + std::sqrt(2.0 * std::log(d(n))) - std::sqrt(2.0 * std::log(8.0));
}

std::vector<std::vector<WorkerTimes>> replaySegment(const std::vector<double>& pre, const std::vector<double>& work,
                                                    const std::vector<double>& slowdown, const std::vector<int>& island,
                                                    int64_t steps, const HostModel& host, const GroupRelease& release) {
  enum Phase { kPre, kCompute, kSleep, kWait, kPost, kFinished };
  constexpr double kEps = 1e-12;  // seconds: a phase with less left is over
  const size_t n = work.size();
  std::vector<std::vector<WorkerTimes>> out(static_cast<size_t>(std::max<int64_t>(steps, 0)), std::vector<WorkerTimes>(n));
  if (steps <= 0 || n == 0) return out;
  std::vector<Phase> phase(n, kPre);
  std::vector<double> left = pre;
  std::vector<int64_t> step(n, 0);
  size_t finished = 0;
  double now = 0;
  // host.per_core: the core each computing worker is on (-1 none), the
  // workers per core, and when each arrived there.
  const int n_cores = host.per_core ? std::max(1, static_cast<int>(std::lround(host.cores))) : 0;
  std::vector<int> core_of(n, -1), load(static_cast<size_t>(n_cores), 0);
  std::vector<int64_t> arrival(n, 0);
  int64_t arrivals = 0;
  auto takeCore = [&](size_t i) {
    if (n_cores == 0) return;
    const auto c = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    core_of[i] = static_cast<int>(c);
    ++load[c];
    arrival[i] = ++arrivals;
  };
  auto leaveCore = [&](size_t i) {
    if (n_cores == 0 || core_of[i] < 0) return;
    --load[static_cast<size_t>(core_of[i])];
    core_of[i] = -1;
    while (true) {
      const auto lo = std::min_element(load.begin(), load.end()) - load.begin();
      const auto hi = std::max_element(load.begin(), load.end()) - load.begin();
      if (load[static_cast<size_t>(hi)] - load[static_cast<size_t>(lo)] < 2) break;
      size_t mover = n;
      for (size_t j = 0; j < n; ++j) {
        if (core_of[j] == hi && (mover == n || arrival[j] > arrival[mover])) mover = j;
      }
      core_of[mover] = static_cast<int>(lo);
      --load[static_cast<size_t>(hi)];
      ++load[static_cast<size_t>(lo)];
    }
  };
  for (size_t i = 0; i < n; ++i) takeCore(i);
  // A worker done with its step waits for its group; the last to arrive
  // releases all of them.
  auto arrive = [&](size_t i) {
    const int64_t k = step[i];
    const bool all = k == steps - 1;
    std::vector<size_t> members;
    for (size_t j = 0; j < n; ++j) {
      if (!all && island[j] != island[i]) continue;
      if (phase[j] != kWait || step[j] != k) return;
      members.push_back(j);
    }
    const double finish = std::max(now, release(k, members, out[static_cast<size_t>(k)]));
    for (size_t j : members) {
      out[static_cast<size_t>(k)][j].finish = finish;
      phase[j] = kPost;
      left[j] = finish - now;
    }
  };
  // Moves worker i on while its phase is over; true if anything changed.
  auto advance = [&](size_t i) {
    bool changed = false;
    while (phase[i] != kWait && phase[i] != kFinished && left[i] <= kEps) {
      auto& t = out[static_cast<size_t>(step[i])][i];
      changed = true;
      switch (phase[i]) {
        case kPre:
          t.start = now;
          phase[i] = kCompute;
          left[i] = work[i];
          break;
        case kCompute:
          t.end = now;
          leaveCore(i);
          phase[i] = kSleep;
          left[i] = (std::max(1.0, slowdown[i]) - 1.0) * (now - t.start);
          break;
        case kSleep:
          t.done = now;
          phase[i] = kWait;
          arrive(i);
          break;
        case kPost:
          if (++step[i] == steps) {
            phase[i] = kFinished;
            ++finished;
          } else {
            phase[i] = kPre;
            left[i] = pre[i];
            takeCore(i);
          }
          break;
        default:
          break;
      }
    }
    return changed;
  };
  while (true) {
    for (bool changed = true; changed;) {
      changed = false;
      for (size_t i = 0; i < n; ++i) changed = advance(i) || changed;
    }
    if (finished == n) break;
    int64_t running = 0;
    for (size_t i = 0; i < n; ++i) running += phase[i] == kPre || phase[i] == kCompute ? 1 : 0;
    const double demand = host.threads * d(running);
    const double corun_f = running == 0 ? 1.0 : corunFactor(host.corun, d(running), false);
    const double shared =
        running == 0 ? 0.0 : std::min(1.0, jobCapacity(demand, host.background, host.cores) / demand) / corun_f;
    std::vector<double> rate(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
      if (phase[i] != kPre && phase[i] != kCompute) continue;
      rate[i] = n_cores > 0 ? 1.0 / d(load[static_cast<size_t>(core_of[i])]) / corun_f : shared;
    }
    double dt = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < n; ++i) {
      if (phase[i] == kPre || phase[i] == kCompute) dt = std::min(dt, left[i] / rate[i]);
      if (phase[i] == kSleep || phase[i] == kPost) dt = std::min(dt, left[i]);
    }
    if (!std::isfinite(dt)) break;  // everybody waiting: cannot happen (the last arrival releases its group)
    now += dt;
    for (size_t i = 0; i < n; ++i) {
      if (phase[i] == kPre || phase[i] == kCompute) left[i] -= dt * rate[i];
      if (phase[i] == kSleep || phase[i] == kPost) left[i] -= dt;
    }
  }
  return out;
}

std::string localPartKey(const std::string& part, const ModelSpec& m, int64_t seq_len, const std::string& dtype) {
  return fmt::format("{} d{} L{} h{} kv{} f{} v{} tie{} e{} k{} eh{} sh{} ev{} s{} {}", part, m.dim, m.n_layers,
                     m.n_heads, m.n_kv_heads, m.ffn_hidden, m.vocab, m.tie_embeddings ? 1 : 0, m.num_experts,
                     m.top_k, m.expert_hidden, m.shared_experts, m.moe_every, seq_len, dtype);
}

core::Result<StepPrediction> predictStepTime(const core::JobConfig& job, int64_t vocab, const DeviceCatalog& catalog,
                                             const CalibrationProfile* profile) {
  core::ModelConfig mc = job.model;
  if (vocab > 0) mc.vocab_size = vocab;
  ARCH_ASSIGN_OR_RETURN(ModelSpec model, fromModelConfig(mc));
  if (vocab > 0) model.vocab = vocab;
  const auto& cl = job.cluster;
  const auto& tc = job.train;
  const int64_t world = cl.worldSize();
  if (world < 1) return core::invalidArgument("predictStepTime: cluster has no workers");
  if (tc.global_batch < world) {
    return core::invalidArgument("predictStepTime: train.global_batch is smaller than the number of workers");
  }
  const int64_t T = job.data.seq_len;
  const std::string dtype = job.model.dtype.empty() ? "fp32" : job.model.dtype;
  TrainSetup su;
  su.seq_len = T;
  su.global_batch_tokens = tc.global_batch * T;
  su.compute_dtype = dtype == "fp32" ? Dtype::kFp32 : Dtype::kBf16;
  su.act_bytes = dtype == "fp32" ? 4 : 2;
  su.flash_attention = false;
  CostModel cm(model, su, profile);

  // The runtime's rank list (core/workers.h), so rank r is the same device here.
  const std::vector<core::WorkerInfo> ranks = core::workersOf(job);
  std::vector<LocalWorker> workers;
  for (const auto& w : ranks) {
    ARCH_ASSIGN_OR_RETURN(DeviceSpec dev, catalog.get(w.device));
    workers.push_back({w.island_index, std::max(1.0, w.slowdown), dev});
  }
  const std::string kind0 = cl.islands[0].device;
  const DeviceCalibration* dc = profile ? profile->find(kind0) : nullptr;
  const std::string model_key = localPartKey("model", model, T, dtype);
  const bool measured = profile && profile->itemTiming(kind0, model_key, d(T));
  const std::vector<DeviceCalibration::Corun> corun = dc ? dc->corun : std::vector<DeviceCalibration::Corun>{};

  StepPrediction p;
  p.measured_parts = measured;
  const double threads = d(std::max<int64_t>(1, tc.threads_per_worker));
  p.host_cores = dc && dc->host_cores > 0 ? dc->host_cores : 0;
  // The other load on a shared host (measured while calibrating) is
  // assumed to keep running during training and take its share of the
  // cores; the measured parts are costs alone (CPU time). The share s of a
  // core the calibration thread got says how much load there is: like
  // B = cores/s - 1 other busy threads where s < 0.95, each worker thread
  // competing with them one to one; with a full core, at most cores - 1 of
  // the runnable processes counted (those counts alone overstated the load
  // several times over on this host). Without a measured share: the counts
  // per scheduling group, shared fairly between groups.
  HostLoad background;
  if (p.host_cores > 0) {
    const double s = dc->alone_core_share;
    if (s > 0) {
      double b = s < 0.95 ? p.host_cores / s - 1.0 : std::min(dc->background_procs, p.host_cores - 1.0);
      p.background_procs = b;
      background.per_thread = true;
      for (; b > 1e-9; b -= 1.0) background.groups.push_back(std::min(1.0, b));
    } else {
      background.groups = dc->background_groups;
      p.background_procs = dc->background_procs;
    }
  }
  p.oversubscribed = p.host_cores > 0 && jobCapacity(threads * d(world), background, p.host_cores) < threads * d(world);

  // Seconds of forward+backward for one micro-batch of n samples on worker r
  // (alone on its cores), and the model FLOPs of it.
  auto microBatch = [&](const LocalWorker& w, int64_t n, double* bwd_out) {
    const double tokens = d(n * T);
    if (measured && w.dev.kind == kind0) {
      const ItemTiming whole = *profile->itemTiming(kind0, model_key, tokens);
      if (bwd_out) *bwd_out = whole.bwd_s;
      return whole.fwd_s + whole.bwd_s;
    }
    StageLinks links;
    double t = 0, b = 0;
    for (int64_t item = 0; item < cm.numItems(); ++item) {
      const ItemCost c = cm.itemCost(item, w.dev, links, 1, 1, n, Recompute::kNone);
      t += c.fwd_s + c.bwd_s;
      b += c.bwd_s;
    }
    if (bwd_out) *bwd_out = b;
    return t;
  };
  struct Work {
    double total = 0;      // seconds alone
    double last_bwd = 0;   // the last micro-batch's backward (gradient buckets become ready in it)
  };
  auto workOf = [&](size_t r, int64_t share) {
    Work wk;
    const int64_t mb = tc.micro_batch > 0 ? std::min(tc.micro_batch, share) : share;
    const int64_t full = share / mb, rest = share % mb;
    double bwd = 0;
    wk.total = d(full) * microBatch(workers[r], mb, &bwd);
    wk.last_bwd = bwd;
    if (rest > 0) {
      wk.total += microBatch(workers[r], rest, &bwd);
      wk.last_bwd = bwd;
    }
    return wk;
  };

  // ---- communication per step ----
  const double params = model.totalParams();
  const double grad_bytes = params * 4;
  const double loop_bw = dc && dc->loopback_bandwidth > 0 ? dc->loopback_bandwidth : kDefaultLoopback;
  const bool diloco = job.strategy.kind != "sync";
  const int64_t H = std::max<int64_t>(job.strategy.inner_steps, 1);
  const int64_t n_isl = static_cast<int64_t>(cl.islands.size());
  double strait_bw = 0, strait_lat = 0;
  for (const auto& s : cl.straits) {
    if (strait_bw == 0 || s.bandwidth < strait_bw) strait_bw = s.bandwidth;
    strait_lat = std::max(strait_lat, s.latency);
  }
  if (n_isl > 1 && strait_bw == 0) {
    strait_bw = cl.default_strait_bandwidth > 0 ? cl.default_strait_bandwidth : loop_bw;
    strait_lat = cl.default_strait_latency;
  }
  const std::string& codec = job.strategy.codec;
  const double eb = codec == "none" ? 4 : (codec == "bf16" || codec == "fp16") ? 2 : 1.0 + 4.0 / 256.0;
  double intra = 0;
  std::vector<double> island_comm;  // gradient allreduce inside each island
  for (const auto& is : cl.islands) {
    island_comm.push_back(CostModel::allreduceTime(grad_bytes, is.count, loop_bw, kLocalLatency));
    intra = std::max(intra, island_comm.back());
  }
  // One full-vector ring over the islands on the strait (hierarchical: the
  // shards travel in parallel but share the emulated strait).
  const double cross_full = n_isl > 1 ? 2.0 * d(n_isl - 1) / d(n_isl) * params * eb / strait_bw +
                                             2.0 * d(n_isl - 1) * strait_lat
                                       : 0.0;
  // Sync's gradient reduction each step: inside the islands, then over the
  // straits (DiLoCo's islands reduce alone: island_comm).
  const double grad_comm = intra + cross_full;
  const double n_buckets = std::max(1.0, std::ceil(grad_bytes / d(std::max<uint64_t>(job.strategy.bucket_bytes, 1))));
  // Control values: a tiny allreduce, over the straits for sync (every
  // step) and DiLoCo (at outer steps); reduce then broadcast.
  const double ctrl_world = n_isl > 1 ? 2.0 * strait_lat + 4 * kLocalLatency : (world > 1 ? 4 * kLocalLatency : 0.0);
  const double ctrl_local = world > 1 ? 4 * kLocalLatency : 0.0;
  // DiLoCo's outer step: the pseudo-gradient over the straits every H steps.
  const double outer = diloco && n_isl > 1 ? cross_full : 0.0;

  // ---- optimizer ----
  const double opt_alone = dc && dc->optimizer_s_per_param > 0
                               ? dc->optimizer_s_per_param * params
                               : cm.memoryTime(workers[0].dev, params * 4 * 4 * 2);  // fp32 w, g, m, v read+write
  // All workers run it at once, sharing the cores (and caches and memory
  // bandwidth: the optimizer is memory-bound).
  const double cores_factor = threads * d(world) / jobCapacity(threads * d(world), background, p.host_cores);
  const double opt_s = opt_alone * cores_factor * corunFactor(corun, d(world), true);
  // Per-step work of every worker before its compute (the elastic commit);
  // rank 0 times its step from the end of its own.
  const double overhead = dc ? dc->step_overhead_s : 0.0;

  // ---- replay the steps ----
  // The trainer's initial split (core::initialShareWeight).
  std::vector<int64_t> shares;
  {
    std::vector<double> w;
    for (const auto& rank : ranks) w.push_back(core::initialShareWeight(tc, rank));
    ARCH_ASSIGN_OR_RETURN(shares, core::sharesFromWeights(w, tc.global_batch));
  }
  const int64_t interval = core::rebalanceInterval(tc.rebalance, world, diloco, H);
  // Ranks that meet every step: the world for sync, each island for DiLoCo
  // (the largest named in the detail line).
  int64_t sync_group = world;
  if (diloco) {
    sync_group = 0;
    for (const auto& is : cl.islands) sync_group = std::max(sync_group, is.count);
  }
  const double compute_cv = corunCv(corun, d(world));
  const size_t nw = workers.size();
  // Single-threaded workers on a host with nothing else running are placed
  // on cores the kernel's way (HostModel::per_core); otherwise processor sharing.
  const HostModel host{p.host_cores, threads, background, corun,
                       p.host_cores > 0 && threads == 1.0 && background.groups.empty() &&
                           p.host_cores == std::round(p.host_cores)};
  // Each worker's communication threads send and receive 2(n-1)/n of the
  // gradients every step in a ring of n (the world for sync, the island for
  // DiLoCo) at the calibrated CPU per byte (sender + receiver side), taken
  // from the cores the workers compute on: added to its compute.
  const double cpu_per_byte = dc ? dc->loopback_cpu_per_byte : 0.0;
  std::vector<double> comm_cpu(nw, 0.0);
  for (size_t r = 0; r < nw; ++r) {
    const int64_t n = diloco ? cl.islands[static_cast<size_t>(workers[r].island)].count : world;
    if (n > 1) comm_cpu[r] = cpu_per_byte * 2.0 * d(n - 1) / d(n) * grad_bytes;
  }
  std::vector<int> island_of(nw, 0);
  std::vector<double> slow(nw), pre(nw, overhead);
  for (size_t r = 0; r < nw; ++r) {
    island_of[r] = diloco ? workers[r].island : 0;
    slow[r] = workers[r].slowdown;
  }
  // Segments run from one meeting of all workers to the next: one step
  // for sync, an outer step's H inner steps for DiLoCo (its islands run on
  // their own clocks in between and drift apart; the faster waits at the
  // outer step). Enough of them to settle the shares; the steps after the
  // replay repeat the last segment.
  const int64_t seg_len = diloco ? H : 1;
  const int64_t settle = std::max<int64_t>(4 * std::max<int64_t>(interval, 1) + 2, 12);
  const int64_t replay = std::min<int64_t>(tc.steps, (settle + seg_len - 1) / seg_len * seg_len);
  std::vector<core::SpeedEstimate> speed(nw, core::SpeedEstimate(diloco));
  double timed_sum = 0;
  int64_t timed = 0;
  double seg_step = 0, seg_compute = 0;  // rank 0's mean step and compute in the last segment
  std::vector<int64_t> seg_shares = shares;
  for (int64_t step0 = 0; step0 < replay; step0 += seg_len) {
    const int64_t len = std::min(seg_len, replay - step0);
    std::vector<Work> wks(nw);
    std::vector<double> work(nw);
    for (size_t r = 0; r < nw; ++r) {
      wks[r] = workOf(r, shares[r]);
      work[r] = wks[r].total + comm_cpu[r];
    }
    // Gradients of `members` reduced (`comm` seconds unhidden): buckets
    // start as soon as every member has them (the first once the last
    // micro-batch's backward is (n_buckets-1)/n_buckets done), and the
    // group waits for its slowest member (the expected maximum of their
    // compute, by the calibrated spread). Returns when the reduction
    // ends; *compute_end: when the last member is done computing.
    auto reduced = [&](const std::vector<size_t>& members, const std::vector<WorkerTimes>& t, double comm,
                       double* compute_end) {
      double real_end = 0, first_ready = 0, longest = 0;
      *compute_end = 0;
      for (size_t j : members) {
        *compute_end = std::max(*compute_end, t[j].done);
        real_end = std::max(real_end, t[j].end);
        const double wall = t[j].end - t[j].start;
        const double rate = wall > 0 ? work[j] / wall : 1.0;
        first_ready =
            std::max(first_ready, t[j].end - wks[j].last_bwd / std::max(rate, 1e-12) * (n_buckets - 1) / n_buckets);
        longest = std::max(longest, t[j].done - t[j].start);
      }
      const double end = std::max(real_end + comm / n_buckets, first_ready + comm);
      const double straggle = expectedMaxOfNormals(static_cast<int64_t>(members.size())) * compute_cv * longest;
      return std::max(*compute_end, end) + straggle;
    };
    std::vector<double> group_end(static_cast<size_t>(len), 0.0);  // rank 0's group done computing, per step
    auto release = [&](int64_t s, const std::vector<size_t>& members, const std::vector<WorkerTimes>& t) {
      const bool meet_all = s == len - 1;
      double ce = 0;
      if (!diloco) {
        const double e = reduced(members, t, grad_comm, &ce);
        group_end[static_cast<size_t>(s)] = ce;
        return e + ctrl_world + opt_s;
      }
      // DiLoCo: each island reduces its gradients alone and runs its inner
      // optimizer; at the outer step all meet for the pseudo-gradient.
      double latest = 0;
      for (int isl = 0; isl < static_cast<int>(n_isl); ++isl) {
        std::vector<size_t> sub;
        for (size_t j : members) {
          if (island_of[j] == isl) sub.push_back(j);
        }
        if (sub.empty()) continue;
        const double e = reduced(sub, t, island_comm[static_cast<size_t>(isl)], &ce);
        if (isl == island_of[0]) group_end[static_cast<size_t>(s)] = ce;
        latest = std::max(latest, e + opt_s);
      }
      return latest + (meet_all ? ctrl_world + outer : ctrl_local);
    };
    const auto times = replaySegment(pre, work, slow, island_of, len, host, release);
    seg_step = seg_compute = 0;
    for (int64_t s = 0; s < len; ++s) {
      const auto& ts = times[static_cast<size_t>(s)];
      const double step_s = ts[0].finish - ts[0].start;  // rank 0 times its step from the end of its commit
      if (step0 + s >= 1) {  // the trainer does not time the first step (warm-up allocations)
        timed_sum += step_s;
        ++timed;
      }
      seg_step += step_s / d(len);
      seg_compute += (group_end[static_cast<size_t>(s)] - ts[0].start) / d(len);
      // The rebalancer's speeds: seconds per sample (the compute wall time
      // incl. the emulated sleep) after the trainer's warm-up steps.
      for (size_t r = 0; r < nw && step0 + s >= core::kRebalanceWarmupSteps; ++r) {
        speed[r].observe(ts[r].done - ts[r].start, shares[r]);
      }
    }
    seg_shares = shares;
    // New shares by 1 / that at its steps if they win by its margin (core/shares.h).
    if (interval > 0 && (step0 + len) % interval == 0) {
      std::vector<double> sps;
      for (auto& e : speed) {
        sps.push_back(e.value());
        e.endPeriod();
      }
      ARCH_ASSIGN_OR_RETURN(shares, core::rebalancedShares(shares, sps, tc.global_batch));
    }
  }
  // Steps after the replay repeat the last segment.
  const int64_t rest = tc.steps - replay;
  if (rest > 0) {
    timed_sum += d(rest) * seg_step;
    timed += rest;
  }
  p.compute_s = seg_compute;
  p.comm_s = std::max(0.0, seg_step - seg_compute - opt_s);
  p.optimizer_s = opt_s;
  p.overhead_s = overhead;
  p.settled_s = seg_step;
  p.shares = seg_shares;
  p.total_s = timed > 0 ? timed_sum / d(timed) : seg_step;
  for (size_t r = 0; r < workers.size(); ++r) p.model_flops += 6.0 * model.activeParams() * d(p.shares[r] * T);
  std::string shares_s;
  for (size_t r = 0; r < p.shares.size(); ++r) shares_s += fmt::format("{}{}", r ? "," : "", p.shares[r]);
  p.corun_compute = corunFactor(corun, d(world), false);
  p.corun_optimizer = corunFactor(corun, d(world), true);
  p.compute_cv = compute_cv;
  p.detail = fmt::format(
      "predicted {:.1f} ms = compute {:.1f} + comm {:.1f} + optimizer {:.1f} at shares [{}] (each worker commits "
      "{:.1f} ms before its step, and {:.1f} ms of CPU moving its gradients); {}; co-run x{:.2f} compute, x{:.2f} "
      "optimizer with {} workers at once{}, compute spread {:.1f}% (groups of {} wait for the slowest); {}",
      1e3 * p.total_s, 1e3 * p.compute_s, 1e3 * p.comm_s, 1e3 * p.optimizer_s, shares_s, 1e3 * p.overhead_s,
      1e3 * comm_cpu[0],
      measured ? "measured model" : (profile && dc ? "calibrated GEMMs" : "catalog derating"), p.corun_compute,
      p.corun_optimizer, world, corun.empty() ? " (not measured)" : " (measured)", 100.0 * compute_cv, sync_group,
      p.host_cores > 0
          ? fmt::format("{} workers x {} threads on {} cores{}{}", world, tc.threads_per_worker, p.host_cores,
                        p.background_procs > 0.05
                            ? (background.per_thread
                                   ? fmt::format(" shared with other load worth {:.1f} busy threads (calibration got "
                                                 "{:.2f} of a core)",
                                                 p.background_procs, dc->alone_core_share)
                                   : fmt::format(" shared with {:.1f} other runnable processes in {} groups (measured)",
                                                 p.background_procs, background.groups.size()))
                            : std::string(),
                        p.oversubscribed ? " (oversubscribed: workers share cores)" : "")
          : std::string("cores not modelled"));
  return p;
}

}  // namespace archipelago::plan
