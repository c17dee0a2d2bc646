// bench_pipeline: the pipeline-parallel trainer on EMULATED devices (one CPU
// worker process per stage, one compute thread each; a device's `slowdown`
// stretches each of its forward/backward operations to that factor times the
// host's fastest time for the operation by sleeping, which uses no CPU,
// before the result is sent on; docs/parallelism.md).
//
// Part 1 — bubble: p equal stages, 1F1B with m micro-batches per step. The
// measured bubble is the trainer's own "pipeline" metric, read back with the
// report's reader (report::pipelineStats): per stage 1 - busy / the
// pipeline's schedule window (first operation start to last send done),
// mean over stages; the median over the steps after the first (load bursts
// of other processes on the shared host stretch single steps). It is printed
// next to the 1F1B theory (p-1)/(m+p-1), which counts the hops between
// stages as free, and next to the receive wait per micro-batch of the stage
// that waits least (from the trace).
//
// Part 2 — speed-aware split: two stages on devices of different speed
// (default slowdowns 1 and 3). The even layer split is the baseline; the
// speed-aware split is what the trainer computes from the devices' speed
// (strategy.stage_layers left empty). Both run in this invocation, same
// steps and batch, as back-to-back pairs (even, aware) `--repeats` times; a
// run's step time is the median over its steps after the first (slowest
// rank), the speed-up the median of the pairs' ratios (a pair shares the
// host's load of the moment). Printed next to the ideal from a compute-only
// 1F1B model: per-stage time t_s = layers_s x slowdown_s per micro-batch,
// step time (m-1) max_s t_s + sum_s t_s.
//
// Default slowdowns are large (8 in part 1; 4 and 12 in part 2, speed ratio
// 3 as `--speeds 1,3`): an emulated operation takes slowdown x the host's
// fastest time for it, so a host slowed down by other processes by up to
// that factor still yields steady device times (on a shared 2-core host
// compute bursts of 5-10x were measured); the layer split depends only on
// the speed ratio.
//
// Prints tables plus one "JSON " line per row. Timings on a shared machine
// are noisy: note the load (uptime) next to the numbers.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/config.h"
#include "archipelago/core/log.h"
#include "archipelago/report/report.h"
#include "archipelago/runtime/dp_comm_group.h"
#include "archipelago/runtime/parallel/layout.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "archipelago/runtime/trainer.h"
#include "bench_runs.h"
#include "comm/launch_local.h"

namespace {

namespace fs = std::filesystem;
namespace ar = archipelago;

struct Args {
  std::string data = "data/prepared/sotu-byte";
  std::string corpus = "data/corpus/sotu";
  std::string out = "runs/bench_pipeline";
  int steps = 8, dim = 128, layers = 8, heads = 4, seq = 128, stages = 4, micro_batch = 1;
  std::string micro = "4,8,16";
  double slowdown = 8.0;
  std::string speeds = "4,12";
  int split_micro = 8, repeats = 5;
};

struct Result {
  double step_s = 0;  // median over steps after the first of the slowest rank's step_s
  double bubble = 0;  // median over steps after the first of the stage-mean bubble
  std::optional<ar::report::PipelineStats> pipe;
  std::vector<int64_t> stage_layers;
  double hop_s = 0;  // per micro-batch receive wait of the least-waiting non-first stage (trace)
};

std::string jobYaml(const Args& a, const std::string& name, const std::string& slowdowns, int stages, int64_t m,
                    const std::string& stage_layers) {
  std::ostringstream o;
  o << "cluster:\n  islands:\n    - {name: emu, count: " << stages << ", slowdowns: [" << slowdowns << "]}\n"
    << "model: {dim: " << a.dim << ", n_layers: " << a.layers << ", n_heads: " << a.heads << ", max_seq_len: " << a.seq
    << "}\n"
    << "data: {dir: " << fs::absolute(a.data).string() << ", seq_len: " << a.seq << "}\n"
    << "train: {steps: " << a.steps << ", global_batch: " << m * a.micro_batch << ", micro_batch: " << a.micro_batch
    << ", lr: 0.003, warmup_steps: 2, eval_every: 0, rebalance: false, log_every: 1, threads_per_worker: 1}\n"
    << "strategy: {pipeline_stages: " << stages << (stage_layers.empty() ? "" : ", stage_layers: [" + stage_layers + "]")
    << "}\n"
    << "checkpoint: {every: 0, keep_last: 1, at_exit: false}\n"
    << "run_dir: " << fs::absolute(fs::path(a.out) / name).string() << "\n";
  return o.str();
}

std::string workerMain(const ar::core::JobConfig& job, const ar::comm::LocalRank& r) {
  using namespace ar;
  const auto workers = runtime::workersOf(job.cluster);
  comm::CommConfig cc;
  for (const auto& w : workers) cc.island_of_rank.push_back(w.island_index);
  cc.cluster = job.cluster;
  auto cr = comm::connectRank(r, cc, core::Deadline::afterSeconds(60));
  if (!cr.isOk()) return cr.status().toString();
  runtime::GroupDp dp(cr->world, false, comm::CodecKind::kNone, 0);
  runtime::TrainerOptions to;
  to.job = job;
  to.run_dir = job.run_dir;
  to.rank = r.rank;
  to.dp = &dp;
  to.world_group = cr->world;
  auto s = runtime::runTrainer(to);
  return s.isOk() ? "" : s.status().toString();
}

// Per micro-batch receive wait ("recv activation/gradient" spans of the
// trace) of every rank but the first, steps after the first excluded by
// skipping the first 2 x m waits of each kind; the smallest over ranks.
double hopLatency(const fs::path& run_dir, int stages, int64_t m) {
  double best = -1;
  for (int r = 1; r < stages; ++r) {
    std::ifstream f(run_dir / "trace" / ("rank" + std::to_string(r) + ".json"));
    auto j = nlohmann::json::parse(f, nullptr, false);
    if (j.is_discarded()) continue;
    const auto& ev = j.is_object() && j.contains("traceEvents") ? j["traceEvents"] : j;
    if (!ev.is_array()) continue;
    double sum = 0;
    int64_t n = 0, seen = 0;
    for (const auto& e : ev) {
      const std::string name = e.value("name", "");
      if (name.rfind("recv activation", 0) != 0) continue;
      if (seen++ < m) continue;  // first step
      sum += e.value("dur", 0.0) * 1e-6;
      ++n;
    }
    if (n > 0 && (best < 0 || sum / static_cast<double>(n) < best)) best = sum / static_cast<double>(n);
  }
  return std::max(0.0, best);
}

ar::core::Result<Result> runOne(const Args& a, const std::string& name, const std::string& slowdowns, int stages,
                                int64_t m, const std::string& stage_layers) {
  using namespace ar;
  const fs::path dir = fs::path(a.out) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path yaml = fs::path(a.out) / (name + ".yaml");
  std::ofstream(yaml) << jobYaml(a, name, slowdowns, stages, m, stage_layers);
  ARCH_ASSIGN_OR_RETURN(auto loaded, core::loadJob(yaml.string()));
  const core::JobConfig job = loaded.job;
  bench::writeRunJson(dir, yaml.string(), job, "sync");
  comm::LocalLaunchOptions lo;
  lo.world = stages;
  lo.timeout_s = 1200;
  ARCH_RETURN_IF_ERROR(
      bench::launchRun(name, lo, [&](const comm::LocalRank& r) { return workerMain(job, r); }).status());
  ARCH_ASSIGN_OR_RETURN(auto run, report::loadRunDir(dir));
  Result res;
  res.pipe = report::pipelineStats(run);
  if (run.parallel) res.stage_layers = run.parallel->stage_layers;
  std::map<int64_t, double> slowest;  // step -> max step_s over ranks, steps after the first
  for (const auto& s : run.steps) {
    if (s.step > 1 && std::isfinite(s.step_s)) slowest[s.step] = std::max(slowest[s.step], s.step_s);
  }
  std::map<int64_t, double> bubble;  // step -> bubble_mean (a replayed step: the last line)
  for (const auto& p : run.pipeline) {
    if (p.step > 1 && std::isfinite(p.bubble_mean)) bubble[p.step] = p.bubble_mean;
  }
  if (slowest.empty() || bubble.empty() || !res.pipe) {
    return core::internalError(name + ": no step/pipeline metrics in " + dir.string());
  }
  std::vector<double> v;
  for (const auto& [step, x] : slowest) v.push_back(x);
  res.step_s = bench::median(v);
  v.clear();
  for (const auto& [step, x] : bubble) v.push_back(x);
  res.bubble = bench::median(v);
  res.hop_s = hopLatency(dir, stages, m);
  return res;
}

std::string fmtLayers(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return "[" + s + "]";
}

// Compute-only 1F1B step time in layer units: (m-1) max t + sum t, t_s = layers_s x slowdown_s.
double idealUnits(const std::vector<int64_t>& layers, const std::vector<double>& slowdowns, int64_t m) {
  double mx = 0, sum = 0;
  for (size_t s = 0; s < layers.size() && s < slowdowns.size(); ++s) {
    const double t = static_cast<double>(layers[s]) * slowdowns[s];
    mx = std::max(mx, t);
    sum += t;
  }
  return static_cast<double>(m - 1) * mx + sum;
}

double loadAverage() {
  std::ifstream f("/proc/loadavg");
  double l = -1;
  f >> l;
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ar;
  Args a;
  CLI::App app{"pipeline parallelism: 1F1B bubble vs theory, speed-aware vs even layer split (EMULATED devices)"};
  app.add_option("--data", a.data, "prepared dataset (prepared from --corpus if missing)");
  app.add_option("--corpus", a.corpus);
  app.add_option("--out", a.out, "run directories go here");
  app.add_option("--steps", a.steps, "optimizer steps per run (the first is left out of every mean)");
  app.add_option("--dim", a.dim);
  app.add_option("--layers", a.layers);
  app.add_option("--heads", a.heads);
  app.add_option("--seq", a.seq);
  app.add_option("--micro-batch", a.micro_batch, "sequences per micro-batch");
  app.add_option("--stages", a.stages, "part 1: pipeline stages");
  app.add_option("--micro", a.micro, "part 1: micro-batches per step (comma list)");
  app.add_option("--slowdown", a.slowdown, "part 1: EMULATED slowdown of every device");
  app.add_option("--speeds", a.speeds, "part 2: EMULATED slowdowns of the two stages' devices");
  app.add_option("--split-micro", a.split_micro, "part 2: micro-batches per step");
  app.add_option("--repeats", a.repeats, "part 2: back-to-back (even, aware) pairs; the median ratio counts");
  CLI11_PARSE(app, argc, argv);
  core::setLogLevel("warn");
  if (auto st = bench::ensureDataset(a.data, a.corpus); !st.isOk()) {
    std::fprintf(stderr, "error: %s\n", st.toString().c_str());
    return 1;
  }
  fs::create_directories(a.out);
  std::printf("load average at start: %.2f (2 cores; other processes stretch the compute)\n", loadAverage());

  // ---- part 1: bubble ----
  std::string slow, even;
  for (int s = 0; s < a.stages; ++s) {
    slow += (s ? "," : "") + std::to_string(a.slowdown);
    even += (s ? "," : "") + std::to_string(a.layers / a.stages + (s < a.layers % a.stages ? 1 : 0));
  }
  std::printf("part 1: %d EMULATED equal devices (slowdown %.1f), %d layers split [%s], dim %d, micro-batch %d x %d "
              "tokens, 1F1B, %d steps (first left out)\n",
              a.stages, a.slowdown, a.layers, even.c_str(), a.dim, a.micro_batch, a.seq, a.steps);
  std::printf("%6s %9s %10s %11s %10s %10s %8s %12s\n", "micro", "step_s", "window_s", "busy/stage", "measured",
              "theory", "diff", "hop_wait_ms");
  for (const auto& ms : bench::splitList(a.micro)) {
    const int64_t m = std::stoll(ms);
    auto r = runOne(a, "bubble_m" + ms, slow, a.stages, m, even);
    if (!r.isOk()) {
      std::fprintf(stderr, "error: %s\n", r.status().toString().c_str());
      return 1;
    }
    const auto& p = *r->pipe;
    double busy = 0;
    for (const auto& s : p.per_stage) busy += s.busy_s / static_cast<double>(p.per_stage.size());
    const double theory = runtime::parallel::oneFOneBBubble(a.stages, m);
    std::printf("%6lld %9.3f %10.3f %11.3f %9.1f%% %9.1f%% %+7.1f%% %12.2f\n", static_cast<long long>(m), r->step_s,
                p.window_s, busy, 100 * r->bubble, 100 * theory, 100 * (r->bubble - theory), 1e3 * r->hop_s);
    std::vector<double> per_stage;
    for (const auto& s : p.per_stage) per_stage.push_back(s.bubble);
    nlohmann::json j{{"bench", "pipeline_bubble"}, {"stages", a.stages},      {"micro_batches", m},
                     {"step_s", r->step_s},        {"window_s", p.window_s},  {"busy_s_mean", busy},
                     {"bubble_measured", r->bubble}, {"bubble_mean_of_steps", p.bubble_mean},
                     {"bubble_per_stage", per_stage},
                     {"bubble_theory", theory},    {"hop_wait_s", r->hop_s},  {"slowdown", a.slowdown},
                     {"steps_averaged", p.steps},  {"emulated", true}};
    std::printf("JSON %s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  std::printf("(step_s, measured: medians over steps 2..%d; window_s, busy/stage: means. measured = 1 - busy / "
              "schedule window per stage, stage mean; busy = forward/backward incl. the emulated slowdown; the "
              "window also holds the hops between stages, which the theory counts as free; hop_wait_ms: receive "
              "wait per micro-batch of the least-waiting stage)\n",
              a.steps);

  // ---- part 2: speed-aware vs even split ----
  const auto sp = bench::splitList(a.speeds);
  if (sp.size() != 2) {
    std::fprintf(stderr, "error: --speeds takes two slowdowns\n");
    return 1;
  }
  const std::vector<double> slowdowns{std::stod(sp[0]), std::stod(sp[1])};
  const std::string even2 = std::to_string(a.layers / 2) + "," + std::to_string(a.layers - a.layers / 2);
  std::printf("\npart 2: 2 stages on EMULATED devices with slowdowns [%s], %d layers, %d micro-batches, %d steps, "
              "%d back-to-back (even, speed-aware) pairs\n",
              a.speeds.c_str(), a.layers, a.split_micro, a.steps, a.repeats);
  std::vector<double> even_s, aware_s, even_bubble, aware_bubble, ratios;
  std::vector<int64_t> even_layers, aware_layers;
  std::printf("%7s %12s %12s %8s\n", "repeat", "even_step_s", "aware_step_s", "ratio");
  for (int k = 0; k < a.repeats; ++k) {
    auto base = runOne(a, "split_even", a.speeds, 2, a.split_micro, even2);
    auto aware = runOne(a, "split_speed", a.speeds, 2, a.split_micro, "");
    if (!base.isOk() || !aware.isOk()) {
      std::fprintf(stderr, "error: %s\n", (!base.isOk() ? base.status() : aware.status()).toString().c_str());
      return 1;
    }
    even_s.push_back(base->step_s);
    aware_s.push_back(aware->step_s);
    even_bubble.push_back(base->bubble);
    aware_bubble.push_back(aware->bubble);
    ratios.push_back(base->step_s / aware->step_s);
    even_layers = base->stage_layers;
    aware_layers = aware->stage_layers;
    std::printf("%7d %12.3f %12.3f %7.2fx\n", k + 1, base->step_s, aware->step_s, ratios.back());
    std::fflush(stdout);
  }
  const double ideal_even = idealUnits(even_layers, slowdowns, a.split_micro);
  const double ideal_aware = idealUnits(aware_layers, slowdowns, a.split_micro);
  const double ideal = ideal_aware > 0 ? ideal_even / ideal_aware : 0;
  const double ideal_inf = idealUnits(even_layers, slowdowns, 1000000) / idealUnits(aware_layers, slowdowns, 1000000);
  std::printf("%-12s %8s %14s %10s %12s\n", "split", "layers", "step_s median", "bubble", "ideal_units");
  std::printf("%-12s %8s %14.3f %9.1f%% %12.0f\n", "even", fmtLayers(even_layers).c_str(), bench::median(even_s),
              100 * bench::median(even_bubble), ideal_even);
  std::printf("%-12s %8s %14.3f %9.1f%% %12.0f\n", "speed-aware", fmtLayers(aware_layers).c_str(),
              bench::median(aware_s), 100 * bench::median(aware_bubble), ideal_aware);
  const double speedup = bench::median(ratios);
  const double of_medians = bench::median(even_s) / bench::median(aware_s);
  std::printf("speed-aware split: %.2fx faster than the even split (median of %d back-to-back pairs, range "
              "%.2f..%.2f; ratio of median step times %.2fx); ideal %.2fx (compute-only 1F1B, m=%d), %.2fx for "
              "m -> infinity\n",
              speedup, a.repeats, *std::min_element(ratios.begin(), ratios.end()),
              *std::max_element(ratios.begin(), ratios.end()), of_medians, ideal, a.split_micro, ideal_inf);
  nlohmann::json j{{"bench", "pipeline_split"},      {"slowdowns", slowdowns},
                   {"even_layers", even_layers},     {"aware_layers", aware_layers},
                   {"even_step_s", even_s},          {"aware_step_s", aware_s},
                   {"even_step_s_median", bench::median(even_s)}, {"aware_step_s_median", bench::median(aware_s)},
                   {"speedup", speedup},             {"speedup_per_repeat", ratios},
                   {"speedup_of_medians", of_medians},
                   {"ideal_speedup", ideal},         {"ideal_speedup_limit", ideal_inf},
                   {"micro_batches", a.split_micro}, {"emulated", true}};
  std::printf("JSON %s\n", j.dump().c_str());
  std::printf("load average at end: %.2f\n", loadAverage());
  return 0;
}
