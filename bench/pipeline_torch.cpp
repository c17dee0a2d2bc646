// bench_pipeline: the pipeline-parallel trainer on EMULATED devices (one CPU
// worker process per stage; a device's `slowdown` stretches each of its
// forward/backward operations by that factor by sleeping).
//
// Part 1 — bubble: p equal stages, 1F1B with m micro-batches per step. The
// measured bubble is the trainer's own "pipeline" metric (1 - a stage's busy
// time / the pipeline's schedule window, mean over stages and over steps
// after the first), printed next to the 1F1B theory (p-1)/(m+p-1).
//
// Part 2 — speed-aware split: two stages on devices of different speed
// (default slowdowns 1 and 3). The even layer split is the baseline; the
// speed-aware split is what the trainer computes from the devices' speed
// (strategy.stage_layers left empty). Both run in this process's run, same
// steps and batch; the speed-up is the ratio of mean step times.
//
// Prints a table plus one "JSON " line per row. Timings on a shared machine
// are noisy: repeat when it matters.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/config.h"
#include "archipelago/core/log.h"
#include "archipelago/data/prepare.h"
#include "archipelago/runtime/comm_dp.h"
#include "archipelago/runtime/parallel_trainer.h"
#include "archipelago/runtime/trainer.h"
#include "comm/launch_local.h"

namespace {

namespace fs = std::filesystem;
namespace ar = archipelago;

struct Args {
  std::string data = "data/prepared/sotu-byte";
  std::string corpus = "data/corpus/sotu";
  std::string out = "runs/bench_pipeline";
  int steps = 8, dim = 64, layers = 8, heads = 4, seq = 64, stages = 4;
  std::string micro = "4,8,16";
  double slowdown = 6.0;
  std::string speeds = "1,3";
  int split_micro = 8;
};

struct Result {
  double step_s = 0;
  double bubble = 0;
  std::vector<int64_t> stage_layers;
  int64_t micro = 0;
};

std::string jobYaml(const Args& a, const std::string& name, const std::string& slowdowns, int stages, int64_t m,
                    const std::string& stage_layers) {
  std::ostringstream o;
  o << "cluster:\n  islands:\n    - {name: emu, count: " << stages << ", slowdowns: [" << slowdowns << "]}\n"
    << "model: {dim: " << a.dim << ", n_layers: " << a.layers << ", n_heads: " << a.heads << ", max_seq_len: " << a.seq << "}\n"
    << "data: {dir: " << fs::absolute(a.data).string() << ", seq_len: " << a.seq << "}\n"
    << "train: {steps: " << a.steps << ", global_batch: " << m << ", micro_batch: 1, lr: 0.003, warmup_steps: 2, "
    << "eval_every: 0, rebalance: false, log_every: 1}\n"
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
  runtime::CommDp dp(cr->world, false, comm::CodecKind::kNone, 0);
  runtime::TrainerOptions to;
  to.job = job;
  to.run_dir = job.run_dir;
  to.rank = r.rank;
  to.dp = &dp;
  to.world_group = cr->world;
  auto s = runtime::runTrainer(to);
  return s.isOk() ? "" : s.status().toString();
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
  comm::LocalLaunchOptions lo;
  lo.world = stages;
  lo.timeout_s = 1200;
  ARCH_ASSIGN_OR_RETURN(auto outcomes, comm::launchLocal(lo, [&](const comm::LocalRank& r) { return workerMain(job, r); }));
  for (size_t r = 0; r < outcomes.size(); ++r) {
    if (!outcomes[r].message.empty() || outcomes[r].exit_code != 0) {
      return core::internalError(name + " rank " + std::to_string(r) + ": " + outcomes[r].message);
    }
  }
  Result res;
  res.micro = m;
  double step_sum = 0, bubble_sum = 0;
  int n_step = 0, n_bubble = 0;
  std::ifstream f(dir / "metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    const std::string kind = j.value("kind", "");
    if (kind == "parallel") res.stage_layers = j["stage_layers"].get<std::vector<int64_t>>();
    if (j.value("step", 0) <= 1) continue;  // the first step warms up allocations
    if (kind == "step" && j.value("rank", -1) == 0) {
      step_sum += j.value("step_s", 0.0);
      ++n_step;
    } else if (kind == "pipeline") {
      bubble_sum += j.value("bubble_mean", 0.0);
      ++n_bubble;
    }
  }
  if (n_step == 0 || n_bubble == 0) return core::internalError(name + ": no step/pipeline metrics");
  res.step_s = step_sum / n_step;
  res.bubble = bubble_sum / n_bubble;
  return res;
}

std::vector<std::string> splitList(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ',')) out.push_back(x);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ar;
  Args a;
  CLI::App app{"pipeline parallelism: 1F1B bubble vs theory, speed-aware vs even layer split (EMULATED devices)"};
  app.add_option("--data", a.data, "prepared dataset (prepared from --corpus if missing)");
  app.add_option("--corpus", a.corpus);
  app.add_option("--out", a.out, "run directories go here");
  app.add_option("--steps", a.steps);
  app.add_option("--dim", a.dim);
  app.add_option("--layers", a.layers);
  app.add_option("--seq", a.seq);
  app.add_option("--stages", a.stages, "part 1: pipeline stages");
  app.add_option("--micro", a.micro, "part 1: micro-batches per step (comma list)");
  app.add_option("--slowdown", a.slowdown, "part 1: EMULATED slowdown of every device");
  app.add_option("--speeds", a.speeds, "part 2: EMULATED slowdowns of the two stages' devices");
  app.add_option("--split-micro", a.split_micro, "part 2: micro-batches per step");
  CLI11_PARSE(app, argc, argv);
  core::setLogLevel("warn");
  if (!fs::exists(fs::path(a.data) / "manifest.json")) {
    std::printf("preparing %s from %s ...\n", a.data.c_str(), a.corpus.c_str());
    data::PrepareOptions po;
    po.inputs = {a.corpus};
    po.out = a.data;
    auto rep = data::prepareDataset(po);
    if (!rep.isOk()) {
      std::fprintf(stderr, "error: cannot prepare %s: %s\n", a.data.c_str(), rep.status().toString().c_str());
      return 1;
    }
  }
  fs::create_directories(a.out);

  // ---- part 1: bubble ----
  std::string slow;
  std::string even;
  for (int s = 0; s < a.stages; ++s) {
    slow += (s ? "," : "") + std::to_string(a.slowdown);
    even += (s ? "," : "") + std::to_string(a.layers / a.stages + (s < a.layers % a.stages ? 1 : 0));
  }
  std::printf("part 1: %d EMULATED equal devices (slowdown %.1f), %d layers split [%s], 1F1B, %d steps\n", a.stages,
              a.slowdown, a.layers, even.c_str(), a.steps);
  std::printf("%8s %12s %16s %16s %10s\n", "micro", "step_s", "bubble_measured", "bubble_theory", "diff");
  for (const auto& ms : splitList(a.micro)) {
    const int64_t m = std::stoll(ms);
    auto r = runOne(a, "bubble_m" + ms, slow, a.stages, m, even);
    if (!r.isOk()) {
      std::fprintf(stderr, "error: %s\n", r.status().toString().c_str());
      return 1;
    }
    const double theory = runtime::oneFOneBBubble(a.stages, m);
    std::printf("%8lld %12.3f %15.1f%% %15.1f%% %+9.1f%%\n", static_cast<long long>(m), r->step_s, 100 * r->bubble,
                100 * theory, 100 * (r->bubble - theory));
    nlohmann::json j{{"bench", "pipeline_bubble"}, {"stages", a.stages}, {"micro_batches", m},
                     {"step_s", r->step_s}, {"bubble_measured", r->bubble}, {"bubble_theory", theory},
                     {"slowdown", a.slowdown}, {"emulated", true}};
    std::printf("JSON %s\n", j.dump().c_str());
  }

  // ---- part 2: speed-aware vs even split ----
  const auto sp = splitList(a.speeds);
  if (sp.size() != 2) {
    std::fprintf(stderr, "error: --speeds takes two slowdowns\n");
    return 1;
  }
  const std::string even2 = std::to_string(a.layers / 2) + "," + std::to_string(a.layers - a.layers / 2);
  std::printf("\npart 2: 2 stages on EMULATED devices with slowdowns [%s], %d layers, %d micro-batches, %d steps\n",
              a.speeds.c_str(), a.layers, a.split_micro, a.steps);
  auto base = runOne(a, "split_even", a.speeds, 2, a.split_micro, even2);
  auto aware = runOne(a, "split_speed", a.speeds, 2, a.split_micro, "");
  if (!base.isOk() || !aware.isOk()) {
    std::fprintf(stderr, "error: %s\n", (!base.isOk() ? base.status() : aware.status()).toString().c_str());
    return 1;
  }
  auto fmtLayers = [](const std::vector<int64_t>& v) {
    std::string s;
    for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
    return "[" + s + "]";
  };
  std::printf("%-14s %12s %12s %12s\n", "split", "layers", "step_s", "bubble");
  std::printf("%-14s %12s %12.3f %11.1f%%\n", "even", fmtLayers(base->stage_layers).c_str(), base->step_s, 100 * base->bubble);
  std::printf("%-14s %12s %12.3f %11.1f%%\n", "speed-aware", fmtLayers(aware->stage_layers).c_str(), aware->step_s,
              100 * aware->bubble);
  const double speedup = base->step_s / aware->step_s;
  std::printf("speed-aware split: %.2fx faster than the even split (same run)\n", speedup);
  nlohmann::json j{{"bench", "pipeline_split"}, {"slowdowns", a.speeds}, {"even_layers", base->stage_layers},
                   {"aware_layers", aware->stage_layers}, {"even_step_s", base->step_s},
                   {"aware_step_s", aware->step_s}, {"speedup", speedup}, {"emulated", true}};
  std::printf("JSON %s\n", j.dump().c_str());
  return 0;
}
