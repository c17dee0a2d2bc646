// Run directory reader and statistics for `archipelago report` (report.h);
// metrics.jsonl lines are parsed by the shared schema (metrics.cpp).
// The HTML/SVG writing lives in report_html.cpp.
#include "archipelago/report/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

#include "archipelago/core/log.h"
#include "archipelago/core/units.h"
#include "report/report_internal.h"

namespace archipelago::report {
namespace {

using nlohmann::json;

// A number, or kMissing for an absent / null / non-numeric field.
double numField(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return kMissing;
  return it->get<double>();
}

// An integer; an integral float (12.0) is accepted, anything else is not.
std::optional<int64_t> intField(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) return std::nullopt;
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_number_float()) {
    const double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::abs(d) < 9e15) return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

std::string strField(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::string fmtLoss(double v) { return detail::fmtFixed(v, 4); }

std::string pad(std::string s, size_t width) {
  if (s.size() < width) s.append(width - s.size(), ' ');
  return s;
}

}  // namespace

namespace detail {

std::vector<size_t> dedupedSteps(const RunData& run) {
  std::map<std::pair<int64_t, int>, size_t> last;
  for (size_t i = 0; i < run.steps.size(); ++i) last[{run.steps[i].step, run.steps[i].rank}] = i;
  std::vector<size_t> idx;
  idx.reserve(last.size());
  for (const auto& [key, i] : last) idx.push_back(i);
  return idx;
}

std::string fmtFixed(double v, int decimals) {
  if (!std::isfinite(v)) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// 1234567 -> "1,234,567"
std::string fmtCount(double v) {
  if (!std::isfinite(v)) return "n/a";
  const bool neg = v < 0;
  std::string digits = std::to_string(static_cast<long long>(std::llround(std::abs(v))));
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return neg ? "-" + out : out;
}

// Wall-clock durations: "42.1 s", or "1h 02m 03s (3723 s)" for long runs.
std::string fmtWall(double s) {
  if (!std::isfinite(s)) return "n/a";
  if (s < 120) return fmtFixed(s, 1) + " s";
  const auto total = static_cast<long long>(std::llround(s));
  char buf[96];
  if (total < 3600) {
    std::snprintf(buf, sizeof buf, "%lldm %02llds (%lld s)", total / 60, total % 60, total);
  } else {
    std::snprintf(buf, sizeof buf, "%lldh %02lldm %02llds (%lld s)", total / 3600, (total / 60) % 60, total % 60,
                  total);
  }
  return buf;
}

}  // namespace detail

using detail::dedupedSteps;
using detail::fmtCount;
using detail::fmtFixed;
using detail::fmtWall;

namespace {

// Files a parsed record into the run's lists.
struct FileRecord {
  RunData& run;
  void operator()(StepRecord&& r) { run.steps.push_back(std::move(r)); }
  void operator()(EvalRecord&& r) { run.evals.push_back(std::move(r)); }
  void operator()(OuterRecord&& r) {
    if (r.round < 0) r.round = static_cast<int64_t>(run.outers.size());  // lines without a round number
    run.outers.push_back(std::move(r));
  }
  void operator()(EventRecord&& r) { run.events.push_back(std::move(r)); }
  void operator()(MoeRecord&& r) { run.moe.push_back(std::move(r)); }
  void operator()(PipelineRecord&& r) { run.pipeline.push_back(std::move(r)); }
  void operator()(ParallelRecord&& r) { run.parallel = std::move(r); }
  void operator()(PredictionRecord&& r) { run.prediction = std::move(r); }
  void operator()(MemoryRecord&& r) { run.memory.push_back(std::move(r)); }
  void operator()(ReplicaRecord&& r) { run.replicas.push_back(std::move(r)); }
  void operator()(SummaryRecord&& r) { run.summary = std::move(r); }
};

}  // namespace

void parseMetricsLine(std::string_view raw, RunData& run) {
  ParsedMetricsLine p = parseMetricsRecord(raw);
  switch (p.status) {
    case ParsedMetricsLine::Status::kBlank:
      return;
    case ParsedMetricsLine::Status::kMalformed:
      ++run.lines;
      ++run.malformed;
      return;
    case ParsedMetricsLine::Status::kUnknownKind:
      ++run.lines;
      ++run.unknown_kinds;
      ++run.unknown_kind_names[p.kind];
      return;
    case ParsedMetricsLine::Status::kRecord:
      ++run.lines;
      std::visit(FileRecord{run}, std::move(*p.record));
      return;
  }
}

core::Result<RunData> loadRunDir(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return core::notFound("run directory '" + dir.string() +
                          "' does not exist or is not a directory; pass the run_dir a training run wrote");
  }
  RunData run;
  run.dir = std::filesystem::weakly_canonical(dir, ec);
  if (ec) run.dir = dir;
  run.name = run.dir.filename().string();
  if (run.name.empty()) run.name = run.dir.parent_path().filename().string();
  if (run.name.empty()) run.name = dir.string();

  const auto run_json = run.dir / "run.json";
  if (std::ifstream in(run_json); in) {
    std::stringstream ss;
    ss << in.rdbuf();
    const json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      ARCH_LOG_WARN("{}: not a JSON object; reporting without it", run_json.string());
    } else {
      run.has_run_json = true;
      run.job = strField(j, "job");
      const double started = numField(j, "started");
      run.started = std::isfinite(started) ? started : 0;
      run.world = static_cast<int>(intField(j, "world").value_or(0));
      run.strategy = strField(j, "strategy");
      if (auto e = j.find("emulated"); e != j.end() && e->is_boolean()) run.emulated = e->get<bool>();
      if (auto rs = j.find("ranks"); rs != j.end() && rs->is_array()) {
        for (const auto& r : *rs) {
          if (!r.is_object()) continue;
          RunRank rr;
          rr.rank = static_cast<int>(intField(r, "rank").value_or(static_cast<int64_t>(run.ranks.size())));
          rr.island = strField(r, "island");
          rr.device = strField(r, "device");
          const double sd = numField(r, "slowdown");
          rr.slowdown = std::isfinite(sd) ? sd : 1.0;
          run.ranks.push_back(std::move(rr));
        }
      }
    }
  } else {
    ARCH_LOG_WARN("{}: missing; reporting from metrics.jsonl alone", run_json.string());
  }

  const auto metrics = run.dir / "metrics.jsonl";
  std::ifstream in(metrics);
  if (!in) {
    return core::notFound(metrics.string() +
                          ": cannot be read; is this a run directory written by `archipelago train`?");
  }
  std::string line;
  while (std::getline(in, line)) parseMetricsLine(line, run);
  if (run.malformed > 0) {
    ARCH_LOG_WARN("{}: skipped {} malformed line(s) of {}", metrics.string(), run.malformed, run.lines);
  }
  run.has_trace = std::filesystem::exists(run.dir / "trace.json", ec);
  return run;
}

double runStartTime(const RunData& run) {
  if (run.started > 0) return run.started;
  double t0 = std::numeric_limits<double>::infinity();
  for (const auto& s : run.steps) {
    if (!std::isfinite(s.time)) continue;
    t0 = std::min(t0, s.time - (std::isfinite(s.step_s) ? s.step_s : 0.0));
  }
  for (const auto& e : run.evals) {
    if (std::isfinite(e.time)) t0 = std::min(t0, e.time);
  }
  return std::isfinite(t0) ? t0 : 0.0;
}

std::vector<StepPoint> meanLossPerStep(const RunData& run) {
  const double t0 = runStartTime(run);
  struct Acc {
    double sum = 0;
    int n = 0;
    double tmax = -std::numeric_limits<double>::infinity();
    double tokens = 0;
  };
  std::map<int64_t, Acc> by_step;
  for (size_t i : dedupedSteps(run)) {
    const auto& s = run.steps[i];
    Acc& a = by_step[s.step];
    if (std::isfinite(s.loss)) {
      a.sum += s.loss;
      ++a.n;
    }
    if (std::isfinite(s.time)) a.tmax = std::max(a.tmax, s.time);
    if (std::isfinite(s.tokens)) a.tokens += s.tokens;
  }
  std::vector<StepPoint> out;
  out.reserve(by_step.size());
  double tokens = 0;
  for (const auto& [step, a] : by_step) {
    tokens += a.tokens;
    if (a.n == 0) continue;
    out.push_back({step, a.sum / a.n, std::isfinite(a.tmax) ? a.tmax - t0 : kMissing, tokens});
  }
  return out;
}

RunStats computeRunStats(const RunData& run) {
  RunStats st;
  const std::vector<size_t> idx = dedupedSteps(run);
  const double t0 = runStartTime(run);

  std::set<int64_t> distinct;
  std::map<int64_t, double> slowest_step_s;  // step -> max step_s over ranks
  double tmax = -std::numeric_limits<double>::infinity();
  double tokens = 0;
  for (size_t i : idx) {
    const auto& s = run.steps[i];
    distinct.insert(s.step);
    if (std::isfinite(s.tokens)) tokens += s.tokens;
    if (std::isfinite(s.time)) tmax = std::max(tmax, s.time);
    if (std::isfinite(s.step_s)) {
      auto [it, inserted] = slowest_step_s.emplace(s.step, s.step_s);
      if (!inserted) it->second = std::max(it->second, s.step_s);
    }
  }
  for (const auto& e : run.evals) {
    if (std::isfinite(e.time)) tmax = std::max(tmax, e.time);
  }
  st.steps = static_cast<int64_t>(distinct.size());
  if (!distinct.empty()) {
    st.first_step = *distinct.begin();
    st.last_step = *distinct.rbegin();
  }
  double sum_slowest = 0;
  for (const auto& [step, s] : slowest_step_s) sum_slowest += s;

  const SummaryRecord sum = run.summary.value_or(SummaryRecord{});
  if (sum.steps) st.steps = *sum.steps;
  if (sum.wall_s) {
    st.wall_s = *sum.wall_s;
  } else if (std::isfinite(tmax) && tmax > t0) {
    st.wall_s = tmax - t0;
  } else {
    st.wall_s = sum_slowest;
  }
  st.tokens = sum.tokens.value_or(tokens);
  st.tokens_per_s = st.wall_s > 0 ? st.tokens / st.wall_s : 0;

  // Workers: run.json's list first (it knows devices and slowdowns), then
  // any rank that only appears in metrics (joined later).
  std::map<int, WorkerStats> workers;
  for (const auto& r : run.ranks) {
    WorkerStats w;
    w.rank = r.rank;
    w.island = r.island;
    w.device = r.device;
    w.slowdown = r.slowdown;
    workers[r.rank] = w;
  }
  struct Sums {
    double compute = 0, comm = 0, wait = 0, step = 0;
    int64_t n_compute = 0, n_comm = 0, n_wait = 0, n_step = 0;
  };
  std::map<int, Sums> sums;
  for (size_t i : idx) {
    const auto& s = run.steps[i];
    auto [it, inserted] = workers.try_emplace(s.rank);
    WorkerStats& w = it->second;
    if (inserted) w.rank = s.rank;
    if (w.island.empty()) w.island = s.island;
    ++w.steps;
    if (std::isfinite(s.samples)) w.samples += s.samples;
    if (std::isfinite(s.tokens)) w.tokens += s.tokens;
    Sums& u = sums[s.rank];
    if (std::isfinite(s.compute_s)) u.compute += s.compute_s, ++u.n_compute;
    if (std::isfinite(s.comm_s)) u.comm += s.comm_s, ++u.n_comm;
    if (std::isfinite(s.wait_s)) u.wait += s.wait_s, ++u.n_wait;
    if (std::isfinite(s.step_s)) u.step += s.step_s, ++u.n_step;
  }
  for (auto& [rank, w] : workers) {
    const Sums& u = sums[rank];
    w.mean_compute_s = u.n_compute ? u.compute / u.n_compute : 0;
    w.mean_comm_s = u.n_comm ? u.comm / u.n_comm : 0;
    w.mean_wait_s = u.n_wait ? u.wait / u.n_wait : 0;
    w.mean_step_s = u.n_step ? u.step / u.n_step : 0;
    const double busy = u.step > 0 ? u.step : st.wall_s;
    w.tokens_per_s = busy > 0 ? w.tokens / busy : 0;
    w.utilisation = st.wall_s > 0 ? u.compute / st.wall_s : 0;
    st.workers.push_back(w);
  }
  std::map<std::string, IslandStats> islands;
  for (const auto& w : st.workers) {
    IslandStats& is = islands[w.island];
    is.island = w.island;
    ++is.workers;
    is.tokens_per_s += w.tokens_per_s;
    is.utilisation += w.utilisation;
  }
  for (auto& [name, is] : islands) {
    is.utilisation /= std::max(1, is.workers);
    st.islands.push_back(is);
  }

  const auto loss = meanLossPerStep(run);
  if (sum.final_loss) {
    st.final_loss = sum.final_loss;
  } else if (!loss.empty()) {
    st.final_loss = loss.back().value;
  }
  if (sum.final_val_loss) {
    st.final_val_loss = sum.final_val_loss;
  } else {
    const EvalRecord* last = nullptr;
    for (const auto& e : run.evals) {
      if (std::isfinite(e.val_loss) && (!last || e.step >= last->step)) last = &e;
    }
    if (last) st.final_val_loss = last->val_loss;
  }
  st.predicted_step_s = sum.predicted_step_s;
  if (!st.predicted_step_s && run.prediction && std::isfinite(run.prediction->predicted_step_s) &&
      run.prediction->predicted_step_s > 0) {
    st.predicted_step_s = run.prediction->predicted_step_s;  // the planner's line at the start
  }
  if (sum.measured_step_s) {
    st.measured_step_s = sum.measured_step_s;
  } else if (!slowest_step_s.empty()) {
    st.measured_step_s = sum_slowest / static_cast<double>(slowest_step_s.size());
  }
  for (const auto& e : run.events) ++st.event_counts[e.event];
  st.outer_rounds = static_cast<int64_t>(run.outers.size());
  double sync = 0;
  int64_t n_sync = 0;
  for (const auto& o : run.outers) {
    if (std::isfinite(o.bytes_strait)) st.bytes_strait += o.bytes_strait;
    if (std::isfinite(o.sync_s)) sync += o.sync_s, ++n_sync;
  }
  st.mean_sync_s = n_sync ? sync / n_sync : 0;
  if (sum.bytes_strait) st.bytes_strait = *sum.bytes_strait;
  for (const auto& w : st.workers) st.utilisation += w.utilisation / static_cast<double>(st.workers.size());
  st.pipeline = pipelineStats(run);
  st.moe_layers = moeLayerStats(run);
  return st;
}

std::optional<PipelineStats> pipelineStats(const RunData& run) {
  std::map<int64_t, const PipelineRecord*> by_step;  // a replayed step: the last line wins
  for (const auto& p : run.pipeline) by_step[p.step] = &p;
  if (by_step.empty()) return std::nullopt;
  if (by_step.size() > 1) by_step.erase(by_step.begin());  // warm-up step
  PipelineStats ps;
  ps.first_step = by_step.begin()->first;
  const PipelineRecord& last = *by_step.rbegin()->second;
  ps.micro_batches = last.micro_batches;
  size_t stages = 0;
  for (const auto& [step, p] : by_step) stages = std::max({stages, p->busy_s.size(), p->bubble.size()});
  ps.stages = static_cast<int>(stages);
  ps.per_stage.resize(stages);
  std::vector<int64_t> n_busy(stages, 0), n_bubble(stages, 0);
  int64_t n_window = 0, n_mean = 0, n_theory = 0;
  for (const auto& [step, p] : by_step) {
    ++ps.steps;
    for (size_t s = 0; s < stages; ++s) {
      if (s < p->busy_s.size() && std::isfinite(p->busy_s[s])) ps.per_stage[s].busy_s += p->busy_s[s], ++n_busy[s];
      if (s < p->bubble.size() && std::isfinite(p->bubble[s])) ps.per_stage[s].bubble += p->bubble[s], ++n_bubble[s];
    }
    if (std::isfinite(p->window_s)) ps.window_s += p->window_s, ++n_window;
    double mean = p->bubble_mean;
    if (!std::isfinite(mean) && !p->bubble.empty()) {
      mean = 0;
      for (double b : p->bubble) mean += b / static_cast<double>(p->bubble.size());
    }
    if (std::isfinite(mean)) ps.bubble_mean += mean, ++n_mean;
    double theory = p->bubble_theory;
    if (!std::isfinite(theory) && p->stages > 0 && p->micro_batches > 0) {
      theory = static_cast<double>(p->stages - 1) / static_cast<double>(p->micro_batches + p->stages - 1);
    }
    if (std::isfinite(theory)) ps.bubble_theory += theory, ++n_theory;
  }
  std::vector<int64_t> layers = last.stage_layers;
  if (layers.empty() && run.parallel) layers = run.parallel->stage_layers;
  for (size_t s = 0; s < stages; ++s) {
    auto& x = ps.per_stage[s];
    x.stage = static_cast<int>(s);
    x.layers = s < layers.size() ? layers[s] : 0;
    x.busy_s = n_busy[s] ? x.busy_s / static_cast<double>(n_busy[s]) : kMissing;
    x.bubble = n_bubble[s] ? x.bubble / static_cast<double>(n_bubble[s]) : kMissing;
  }
  ps.window_s = n_window ? ps.window_s / static_cast<double>(n_window) : kMissing;
  ps.bubble_mean = n_mean ? ps.bubble_mean / static_cast<double>(n_mean) : kMissing;
  ps.bubble_theory = n_theory ? ps.bubble_theory / static_cast<double>(n_theory) : kMissing;
  return ps;
}

std::vector<MoeLayerStats> moeLayerStats(const RunData& run) {
  // (layer, step, rank) -> the last line (a replayed step supersedes the first try)
  std::map<std::tuple<int, int64_t, int>, const MoeRecord*> lines;
  for (const auto& m : run.moe) lines[{m.layer, m.step, m.rank}] = &m;
  std::map<int, MoeLayerStats> by_layer;
  for (const auto& [key, m] : lines) {
    MoeLayerStats& l = by_layer[m->layer];
    l.layer = m->layer;
    ++l.lines;
    for (double v : m->tokens_per_expert) {
      if (std::isfinite(v)) l.routed += v;
    }
    double dropped = m->dropped;
    if (!std::isfinite(dropped) && !m->dropped_per_expert.empty()) {
      dropped = 0;
      for (double v : m->dropped_per_expert) dropped += std::isfinite(v) ? v : 0.0;
    }
    if (std::isfinite(dropped)) l.dropped += dropped;
    if (std::isfinite(m->dispatch_bytes)) {
      l.dispatch_bytes = std::isfinite(l.dispatch_bytes) ? std::max(l.dispatch_bytes, m->dispatch_bytes) : m->dispatch_bytes;
    }
    auto add = [](std::vector<double>& into, const std::vector<double>& v) {
      if (into.size() < v.size()) into.resize(v.size(), 0.0);
      for (size_t e = 0; e < v.size(); ++e) into[e] += std::isfinite(v[e]) ? v[e] : 0.0;
    };
    if (l.lines == 1 || m->step > l.last_step) {
      l.last_step = m->step;
      l.last_tokens_per_expert.clear();
      l.last_dropped_per_expert.clear();
    }
    if (m->step == l.last_step) {
      add(l.last_tokens_per_expert, m->tokens_per_expert);
      add(l.last_dropped_per_expert, m->dropped_per_expert);
    }
  }
  std::vector<MoeLayerStats> out;
  for (auto& [layer, l] : by_layer) {
    l.drop_fraction = l.routed > 0 ? l.dropped / l.routed : 0;
    double sum = 0, mx = 0;
    for (double v : l.last_tokens_per_expert) sum += v, mx = std::max(mx, v);
    const double mean = l.last_tokens_per_expert.empty() ? 0 : sum / static_cast<double>(l.last_tokens_per_expert.size());
    l.last_imbalance = mean > 0 ? mx / mean : 0;
    out.push_back(std::move(l));
  }
  return out;
}

std::string formatSummary(const RunData& run, const RunStats& st) {
  std::string o;
  o += "Run " + run.name + " (" + run.dir.string() + ")\n";
  if (!run.job.empty() || !run.strategy.empty() || run.world > 0) {
    o += "  job " + (run.job.empty() ? std::string("?") : run.job) + ", strategy " +
         (run.strategy.empty() ? std::string("?") : run.strategy) + ", world " +
         (run.world > 0 ? std::to_string(run.world) : std::to_string(st.workers.size())) + "\n";
  }
  if (run.emulated) {
    o += "  NOTE: device slowdowns and strait bandwidth/latency in this run are EMULATED on one machine\n"
         "        (run.json \"emulated\": true); throughput numbers are not those of real hardware.\n";
  }
  if (!run.has_run_json) o += "  (no run.json: workers and islands taken from metrics.jsonl)\n";
  o += "  steps              " + std::to_string(st.steps);
  if (st.steps > 0) o += " (step " + std::to_string(st.first_step) + " .. " + std::to_string(st.last_step) + ")";
  o += "\n";
  o += "  wall time          " + fmtWall(st.wall_s) + "\n";
  o += "  tokens             " + fmtCount(st.tokens) + "\n";
  o += "  throughput         " + fmtCount(st.tokens_per_s) + " tokens/s aggregate\n";
  o += "  final train loss   " + (st.final_loss ? fmtLoss(*st.final_loss) : std::string("n/a")) + "\n";
  o += "  final val loss     " + (st.final_val_loss ? fmtLoss(*st.final_val_loss) : std::string("n/a")) + "\n";
  if (st.predicted_step_s || st.measured_step_s) {
    o += "  step time          ";
    if (st.predicted_step_s) o += "predicted " + core::formatDuration(*st.predicted_step_s) + ", ";
    o += "measured " + (st.measured_step_s ? core::formatDuration(*st.measured_step_s) : std::string("n/a"));
    if (st.predicted_step_s && st.measured_step_s && *st.predicted_step_s > 0) {
      o += " (" + fmtFixed(100.0 * (*st.measured_step_s / *st.predicted_step_s - 1.0), 1) + " % vs prediction)";
    }
    o += "\n";
  }
  if (!st.workers.empty()) {
    o += "  workers:\n";
    o += "    " + pad("rank", 6) + pad("island", 12) + pad("device", 10) + pad("slowdown", 10) + pad("tokens/s", 12) +
         pad("compute", 11) + pad("comm", 11) + pad("wait", 11) + pad("step", 11) + "util\n";
    for (const auto& w : st.workers) {
      o += "    " + pad(std::to_string(w.rank), 6) + pad(w.island.empty() ? "-" : w.island, 12) +
           pad(w.device.empty() ? "-" : w.device, 10) + pad(fmtFixed(w.slowdown, 2), 10) +
           pad(fmtCount(w.tokens_per_s), 12) + pad(core::formatDuration(w.mean_compute_s), 11) +
           pad(core::formatDuration(w.mean_comm_s), 11) + pad(core::formatDuration(w.mean_wait_s), 11) +
           pad(core::formatDuration(w.mean_step_s), 11) + fmtFixed(100.0 * w.utilisation, 1) + " %\n";
    }
    o += "  islands (utilisation = compute / wall):\n";
    for (const auto& is : st.islands) {
      o += "    " + pad(is.island.empty() ? "-" : is.island, 12) + pad(std::to_string(is.workers) + " worker(s)", 14) +
           pad(fmtCount(is.tokens_per_s) + " tokens/s", 20) + fmtFixed(100.0 * is.utilisation, 1) + " %\n";
    }
  }
  if (st.pipeline) {
    const PipelineStats& p = *st.pipeline;
    o += "  pipeline           " + std::to_string(p.stages) + " stages, " + std::to_string(p.micro_batches) +
         " micro-batches per step (1F1B); mean of " + std::to_string(p.steps) + " logged step(s) from step " +
         std::to_string(p.first_step) + "\n";
    o += "    " + pad("stage", 7) + pad("layers", 8) + pad("busy/step", 12) + "bubble\n";
    for (const auto& s : p.per_stage) {
      o += "    " + pad(std::to_string(s.stage), 7) + pad(s.layers > 0 ? std::to_string(s.layers) : "-", 8) +
           pad(std::isfinite(s.busy_s) ? core::formatDuration(s.busy_s) : "n/a", 12) + fmtFixed(100.0 * s.bubble, 1) +
           " %\n";
    }
    o += "    bubble " + fmtFixed(100.0 * p.bubble_mean, 1) + " % measured (stage mean) vs " +
         fmtFixed(100.0 * p.bubble_theory, 1) + " % 1F1B theory (p-1)/(m+p-1); schedule window " +
         (std::isfinite(p.window_s) ? core::formatDuration(p.window_s) : std::string("n/a")) + " per step\n";
  }
  for (const auto& l : st.moe_layers) {
    o += "  moe layer " + pad(std::to_string(l.layer), 9) + fmtCount(l.routed) + " routed, " + fmtCount(l.dropped) +
         " dropped (" + fmtFixed(100.0 * l.drop_fraction, 2) + " %) over " + std::to_string(l.lines) +
         " line(s); step " + std::to_string(l.last_step) + ": per expert [";
    for (size_t e = 0; e < l.last_tokens_per_expert.size(); ++e) {
      o += (e ? "," : "") + fmtCount(l.last_tokens_per_expert[e]);
    }
    o += "], max/mean " + fmtFixed(l.last_imbalance, 2);
    if (!l.last_dropped_per_expert.empty()) {
      o += ", dropped [";
      for (size_t e = 0; e < l.last_dropped_per_expert.size(); ++e) {
        o += (e ? "," : "") + fmtCount(l.last_dropped_per_expert[e]);
      }
      o += "]";
    }
    if (std::isfinite(l.dispatch_bytes)) o += ", dispatch " + core::formatBytes(l.dispatch_bytes);
    o += "\n";
  }
  o += "  events             ";
  if (st.event_counts.empty()) {
    o += "none";
  } else {
    bool first = true;
    for (const auto& [name, n] : st.event_counts) {
      o += (first ? "" : ", ") + std::to_string(n) + " " + name;
      first = false;
    }
  }
  o += "\n";
  if (st.outer_rounds > 0) {
    o += "  outer rounds       " + std::to_string(st.outer_rounds) + ", " + core::formatBytes(st.bytes_strait) +
         " over straits, mean sync " + core::formatDuration(st.mean_sync_s) + "\n";
  } else if (st.bytes_strait > 0) {
    o += "  over straits       " + core::formatBytes(st.bytes_strait) + "\n";
  }
  o += "  metrics lines      " + std::to_string(run.lines);
  if (run.malformed) o += ", " + std::to_string(run.malformed) + " malformed (skipped)";
  if (run.unknown_kinds) {
    o += ", " + std::to_string(run.unknown_kinds) + " of unknown kind (ignored):";
    for (const auto& [kind, n] : run.unknown_kind_names) o += " " + kind;
  }
  o += "\n";
  if (run.has_trace) {
    o += "  trace              " + (run.dir / "trace.json").string() +
         " (open in https://ui.perfetto.dev or chrome://tracing)\n";
  }
  return o;
}

}  // namespace archipelago::report
