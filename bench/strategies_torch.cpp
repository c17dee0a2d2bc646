// bench_strategies: sync vs DiLoCo vs streaming DiLoCo across two islands
// joined by one EMULATED strait (default 100 Mbit/s, 50 ms one way: every
// byte between the islands passes the comm layer's userspace shaper), at
// equal tokens (same steps, same global batch, same model and data).
//
// Per strategy it prints: compute utilisation per worker in two forms —
// "loop" (sum of compute_s / sum of step_s over the step lines of
// metrics.jsonl, first step excluded: the training loop, the target)
// and "wall" (sum of compute_s / the worker's whole trainer wall time,
// set-up, calibration and evaluation included) —, final validation loss (the
// final checkpoint, evaluated by this process on the same validation batches
// for every strategy), bytes over the strait (Group::straitBytesSent() of
// both workers at the end: everything the workers sent between islands,
// control values included), tokens trained, and wall time. The baseline is
// `sync` in the same run; the targets of issue 6 are checked against it.
// Also writes <out>/val_curve.csv (strategy, wall seconds, step, validation
// loss), a run.json and a summary line per run directory, and the comparison
// report (validation loss vs wall-clock time and vs tokens for the three
// strategies) to <out>/report/index.html; one "JSON " line per row.
//
// The workers are forked processes that run the trainer directly (as
// `archipelago worker` does), so the strait byte counters can be read.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/config.h"
#include "archipelago/core/log.h"
#include "archipelago/data/dataset.h"
#include "archipelago/data/prepare.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/comm_dp.h"
#include "archipelago/runtime/metrics.h"
#include "archipelago/runtime/report.h"
#include "archipelago/runtime/trainer.h"
#include "comm/launch_local.h"

namespace {

namespace fs = std::filesystem;
namespace ar = archipelago;

struct Args {
  std::string data = "data/prepared/sotu-byte";
  std::string corpus = "data/corpus/sotu";
  std::string out = "runs/bench_strategies";
  std::string bandwidth = "100Mbit/s";
  std::string latency = "50ms";
  std::string strategies = "sync,diloco,streaming";
  std::string codec = "int8";
  // Outer lr 1, no momentum (plain averaging of the islands' models) and H
  // 50: the best validation loss of the sweep in docs/strategies.md for
  // runs of a few hundred to a thousand steps (the DiLoCo paper's 0.7 /
  // Nesterov 0.9 needs many more outer steps). Overlap 5 steps covers the
  // strait's one-way latency plus the transfer with room for the islands
  // drifting apart between syncs.
  int steps = 300, dim = 64, layers = 2, heads = 4, seq = 64, batch = 16, inner = 50, fragments = 4, overlap = 5;
  int eval_every = 25, eval_batches = 16, warmup = 10;
  double lr = 3e-3, outer_lr = 1.0, outer_momentum = 0.0;
  bool nesterov = false, report = true;
  // Speed-aware batch shares (the trainer's rebalancer; with DiLoCo and
  // streaming re-derived at outer-step boundaries only). Off by default:
  // the bench's islands are equal, and on a shared machine their speed
  // differences are bursts of CPU contention that a per-round rebalance does
  // not follow (measured: no better; docs/strategies.md).
  bool rebalance = false;
};

struct Row {
  std::string strategy;
  double wall_s = 0;
  std::vector<double> util;       // per rank: sum compute_s / sum step_s (training loop)
  std::vector<double> wall_util;  // per rank: sum compute_s / trainer wall time
  double tokens = 0;              // trained, all ranks
  double val_loss = -1;
  uint64_t strait_bytes = 0;
  double outer_wait_s = 0;    // rank-mean time blocked on outer results
  int64_t outer_steps = 0;
};

std::string jobYaml(const Args& a, const std::string& strategy) {
  std::ostringstream o;
  o << "cluster:\n  islands:\n    - {name: east, count: 1}\n    - {name: west, count: 1}\n"
    << "  straits: [{a: east, b: west, bandwidth: " << a.bandwidth << ", latency: " << a.latency << "}]\n"
    << "model: {dim: " << a.dim << ", n_layers: " << a.layers << ", n_heads: " << a.heads << ", max_seq_len: " << a.seq << "}\n"
    << "data: {dir: " << fs::absolute(a.data).string() << ", seq_len: " << a.seq << "}\n"
    << "train: {steps: " << a.steps << ", global_batch: " << a.batch << ", lr: " << a.lr
    << ", warmup_steps: " << a.warmup << ", eval_every: " << a.eval_every << ", eval_batches: 4, rebalance: " << (a.rebalance ? "true" : "false")
    << ", log_every: 1}\n"
    << "strategy: {kind: " << strategy << ", inner_steps: " << a.inner << ", fragments: " << a.fragments
    << ", overlap_steps: " << a.overlap << ", codec: " << (strategy == "sync" ? "none" : a.codec)
    << ", outer_lr: " << a.outer_lr << ", outer_momentum: " << a.outer_momentum
    << ", nesterov: " << (a.nesterov ? "true" : "false") << "}\n"
    << "checkpoint: {every: 0, keep_last: 1}\n"
    << "run_dir: " << fs::absolute(fs::path(a.out) / strategy).string() << "\n";
  return o.str();
}

// One worker: the same set-up as runWorker, plus reading the strait counter.
std::string workerMain(const ar::core::JobConfig& job, const ar::comm::LocalRank& r) {
  using namespace ar;
  const auto workers = runtime::workersOf(job.cluster);
  comm::CommConfig cc;
  for (const auto& w : workers) cc.island_of_rank.push_back(w.island_index);
  cc.cluster = job.cluster;
  cc.options.streams = static_cast<int>(job.strategy.streams);
  auto cr = comm::connectRank(r, cc, core::Deadline::afterSeconds(60));
  if (!cr.isOk()) return cr.status().toString();
  const bool per_island = job.strategy.kind != "sync";
  auto codec = comm::parseCodec(job.strategy.codec);
  if (!codec.isOk()) return codec.status().toString();
  runtime::CommDp dp(cr->world, !per_island, per_island ? comm::CodecKind::kNone : *codec, 0);
  std::unique_ptr<runtime::CommDp> inner;
  std::vector<int> inner_ranks;
  if (per_island) {
    auto g = cr->world->islandGroup();
    if (!g.isOk()) return g.status().toString();
    inner_ranks = (*g)->ranks();
    inner = std::make_unique<runtime::CommDp>(*g, false, comm::CodecKind::kNone, 0);
  }
  runtime::TrainerOptions to;
  to.job = job;
  to.run_dir = job.run_dir;
  to.rank = r.rank;
  to.dp = &dp;
  to.inner = inner.get();
  to.inner_ranks = inner_ranks;
  to.world_group = cr->world;
  auto s = runtime::runTrainer(to);
  if (!s.isOk()) return s.status().toString();
  r.shared->slot[r.rank].store(static_cast<int64_t>(cr->world->straitBytesSent()));
  r.shared->slot[16 + r.rank].store(static_cast<int64_t>(s->wall_s * 1e6));
  return "";
}

// Validation loss of the run's final checkpoint, one process, fixed batches.
ar::core::Result<double> evaluateFinal(const std::string& run_dir, const Args& a, ar::core::ModelConfig mc) {
  using namespace ar;
  ARCH_ASSIGN_OR_RETURN(auto dir, runtime::latestValidCheckpoint(run_dir));
  ARCH_ASSIGN_OR_RETURN(auto ck, runtime::loadCheckpoint(dir));
  ARCH_ASSIGN_OR_RETURN(auto ds, data::PreparedDataset::open(a.data));
  if (mc.vocab_size == 0) mc.vocab_size = ds->vocabSize();  // as the trainer resolves it
  ARCH_ASSIGN_OR_RETURN(auto net, model::buildModel(mc, 0));
  std::map<std::string, torch::Tensor> by(ck.weights.begin(), ck.weights.end());
  torch::NoGradGuard ng;
  for (auto& [name, t] : net->namedTensors()) {
    auto it = by.find(name);
    if (it == by.end() || it->second.sizes() != t.sizes()) return core::dataLoss("checkpoint lacks " + name + " of the model's shape");
    t.copy_(it->second);
  }
  ARCH_ASSIGN_OR_RETURN(auto vs, ds->valSampler(a.seq));
  double ce = 0, tokens = 0;
  const std::vector<int64_t> shares{a.batch};
  for (int i = 0; i < a.eval_batches; ++i) {
    auto b = vs.batchAt(static_cast<int64_t>(i) * a.batch, shares, 0);
    if (b.n == 0) continue;
    auto in = torch::from_blob(b.input.data(), {b.n, a.seq}, torch::kInt64);
    auto tg = torch::from_blob(b.target.data(), {b.n, a.seq}, torch::kInt64);
    auto out = net->lossAndStats(in, tg);
    ce += out.ce_sum.item<double>();
    tokens += static_cast<double>(out.tokens);
  }
  return tokens > 0 ? ce / tokens : -1.0;
}

std::vector<nlohmann::json> readMetrics(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded()) out.push_back(j);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ar;
  Args a;
  CLI::App app{"sync vs diloco vs streaming over an emulated strait"};
  app.add_option("--data", a.data, "prepared dataset (prepared from --corpus if missing)");
  app.add_option("--corpus", a.corpus);
  app.add_option("--out", a.out, "run directories go here");
  app.add_option("--bandwidth", a.bandwidth);
  app.add_option("--latency", a.latency);
  app.add_option("--strategies", a.strategies);
  app.add_option("--codec", a.codec, "codec of diloco/streaming on the strait");
  app.add_option("--steps", a.steps);
  app.add_option("--dim", a.dim);
  app.add_option("--layers", a.layers);
  app.add_option("--seq", a.seq);
  app.add_option("--batch", a.batch, "global batch (sequences)");
  app.add_option("--inner-steps", a.inner, "H");
  app.add_option("--fragments", a.fragments);
  app.add_option("--overlap", a.overlap);
  app.add_option("--eval-every", a.eval_every);
  app.add_option("--lr", a.lr, "peak inner learning rate (same schedule for every strategy)");
  app.add_option("--warmup", a.warmup, "inner warm-up steps");
  app.add_option("--outer-lr", a.outer_lr);
  app.add_option("--outer-momentum", a.outer_momentum);
  app.add_option("--nesterov", a.nesterov, "Nesterov outer momentum (true) or heavy ball (false)");
  app.add_option("--eval-batches", a.eval_batches, "validation batches of the final evaluation");
  app.add_option("--report", a.report, "write the comparison report to <out>/report");
  app.add_option("--rebalance", a.rebalance, "speed-aware batch shares (train.rebalance) for every strategy");
  CLI11_PARSE(app, argc, argv);
  core::setLogLevel("warn");

  if (!fs::exists(fs::path(a.data) / "manifest.json") && !fs::exists(a.data)) {
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
  std::vector<std::string> strategies;
  {
    std::stringstream ss(a.strategies);
    std::string s;
    while (std::getline(ss, s, ',')) strategies.push_back(s);
  }
  fs::create_directories(a.out);
  std::ofstream curve(fs::path(a.out) / "val_curve.csv");
  curve << "strategy,wall_s,step,val_loss\n";
  std::vector<Row> rows;
  for (const auto& strategy : strategies) {
    fs::remove_all(fs::path(a.out) / strategy);
    fs::create_directories(fs::path(a.out) / strategy);
    const fs::path yaml = fs::path(a.out) / (strategy + ".yaml");
    std::ofstream(yaml) << jobYaml(a, strategy);
    auto loaded = core::loadJob(yaml.string());
    if (!loaded.isOk()) {
      std::fprintf(stderr, "error: %s\n", loaded.status().toString().c_str());
      return 1;
    }
    const core::JobConfig job = loaded->job;
    std::printf("running %s (%d steps, EMULATED strait %s %s) ...\n", strategy.c_str(), a.steps, a.bandwidth.c_str(),
                a.latency.c_str());
    std::fflush(stdout);
    {
      nlohmann::json ranks = nlohmann::json::array();
      for (const auto& w : runtime::workersOf(job.cluster)) {
        ranks.push_back({{"rank", w.rank}, {"island", w.island}, {"device", w.device}, {"slowdown", w.slowdown}});
      }
      nlohmann::json run = {{"job", yaml.string()}, {"started", static_cast<double>(core::wallMicros()) / 1e6},
                            {"world", 2}, {"ranks", ranks}, {"strategy", strategy}, {"emulated", true}};
      std::ofstream(fs::path(a.out) / strategy / "run.json") << run.dump() << "\n";
    }
    comm::LocalLaunchOptions lo;
    lo.world = 2;
    lo.timeout_s = 1800;
    comm::SharedBlock* shared = nullptr;
    auto outcomes = comm::launchLocal(lo, [&](const comm::LocalRank& r) { return workerMain(job, r); }, &shared);
    if (!outcomes.isOk()) {
      std::fprintf(stderr, "error: %s\n", outcomes.status().toString().c_str());
      return 1;
    }
    for (size_t r = 0; r < outcomes->size(); ++r) {
      if (!(*outcomes)[r].message.empty() || (*outcomes)[r].exit_code != 0) {
        std::fprintf(stderr, "error: %s rank %zu: %s (exit %d)\n", strategy.c_str(), r, (*outcomes)[r].message.c_str(),
                     (*outcomes)[r].exit_code);
        return 1;
      }
    }
    Row row;
    row.strategy = strategy;
    double worker_wall[2] = {0, 0};
    for (int r = 0; r < 2; ++r) {
      row.strait_bytes += static_cast<uint64_t>(shared->slot[r].load());
      worker_wall[r] = static_cast<double>(shared->slot[16 + r].load()) / 1e6;
      row.wall_s = std::max(row.wall_s, worker_wall[r]);
    }
    std::map<int, std::pair<double, double>> cs;  // rank -> (compute, step), steps > 1
    std::map<int, double> all_compute;            // rank -> compute of every step
    double t0 = 1e300;
    auto lines = readMetrics(fs::path(a.out) / strategy / "metrics.jsonl");
    for (const auto& j : lines) {
      if (j.value("kind", "") == "step") t0 = std::min(t0, j.value("time", 1e300) - j.value("step_s", 0.0));
    }
    for (const auto& j : lines) {
      const std::string kind = j.value("kind", "");
      if (kind == "step") {
        all_compute[j.value("rank", 0)] += j.value("compute_s", 0.0);
        row.tokens += j.value("tokens", 0.0);
      }
      if (kind == "step" && j.value("step", 0) > 1) {
        auto& p = cs[j.value("rank", 0)];
        p.first += j.value("compute_s", 0.0);
        p.second += j.value("step_s", 0.0);
      } else if (kind == "eval") {
        curve << strategy << "," << j.value("time", 0.0) - t0 << "," << j.value("step", 0) << "," << j.value("val_loss", 0.0) << "\n";
      } else if (kind == "outer") {
        row.outer_wait_s += j.value("wait_s", 0.0) / 2;
        if (j.value("rank", 0) == 0) ++row.outer_steps;
      }
    }
    for (auto& [r, p] : cs) row.util.push_back(p.second > 0 ? p.first / p.second : 0);
    for (auto& [r, c] : all_compute) row.wall_util.push_back(r < 2 && worker_wall[r] > 0 ? c / worker_wall[r] : 0);
    auto vl = evaluateFinal((fs::path(a.out) / strategy).string(), a, job.model);
    if (!vl.isOk()) {
      std::fprintf(stderr, "error: evaluating %s: %s\n", strategy.c_str(), vl.status().toString().c_str());
      return 1;
    }
    row.val_loss = *vl;
    {
      // For `archipelago report`: this run's totals (the strait counter is not in the step lines).
      runtime::MetricsSink sink;
      if (sink.open((fs::path(a.out) / strategy / "metrics.jsonl").string()).isOk()) {
        sink.write({{"kind", "summary"}, {"steps", a.steps}, {"wall_s", row.wall_s}, {"tokens", row.tokens},
                    {"final_val_loss", row.val_loss}, {"bytes_strait", row.strait_bytes}});
      }
    }
    rows.push_back(row);
  }

  const Row* sync = nullptr;
  for (const auto& r : rows) {
    if (r.strategy == "sync") sync = &r;
  }
  std::printf("\nTwo islands x 1 CPU worker, EMULATED strait %s / %s one way; %d steps x %d seq x %d tokens each; "
              "model dim %d, %d layers; inner AdamW lr %g (warm-up %d, cosine); codec %s, H %d, fragments %d, overlap %d, "
              "outer lr %g, momentum %g%s\n",
              a.bandwidth.c_str(), a.latency.c_str(), a.steps, a.batch, a.seq, a.dim, a.layers, a.lr, a.warmup,
              a.codec.c_str(), a.inner, a.fragments, a.overlap, a.outer_lr, a.outer_momentum, a.nesterov ? " (Nesterov)" : "");
  std::printf("%-10s %8s %10s %17s %17s %10s %14s %9s %6s %10s\n", "strategy", "wall_s", "tokens", "loop_util(r0/r1)",
              "wall_util(r0/r1)", "val_loss", "strait_bytes", "vs_sync", "outer", "outer_wait");
  auto at = [](const std::vector<double>& v, size_t i) { return 100 * (v.size() > i ? v[i] : 0); };
  for (const auto& r : rows) {
    const double ratio = sync && r.strait_bytes > 0 ? static_cast<double>(sync->strait_bytes) / static_cast<double>(r.strait_bytes) : 0;
    std::printf("%-10s %8.1f %10.0f %7.1f%% /%6.1f%% %7.1f%% /%6.1f%% %10.4f %14llu %8.1fx %6lld %9.2fs\n",
                r.strategy.c_str(), r.wall_s, r.tokens, at(r.util, 0), at(r.util, 1), at(r.wall_util, 0),
                at(r.wall_util, 1), r.val_loss, static_cast<unsigned long long>(r.strait_bytes), ratio,
                static_cast<long long>(r.outer_steps), r.outer_wait_s);
  }
  std::printf("\ntargets (issue 6):\n");
  for (const auto& r : rows) {
    if (r.strategy == "sync" || !sync) continue;
    double umin = 1;
    for (double u : r.util) umin = std::min(umin, u);
    const double need_util = r.strategy == "streaming" ? 0.95 : 0.90;
    const double rel = (r.val_loss - sync->val_loss) / sync->val_loss;
    const double ratio = r.strait_bytes > 0 ? static_cast<double>(sync->strait_bytes) / static_cast<double>(r.strait_bytes) : 0;
    std::printf("  %-10s loop utilisation %.1f%% >= %.0f%%: %s | val loss %+.2f%% vs sync (within 3%%): %s | strait bytes %.0fx fewer (>= 100x): %s\n",
                r.strategy.c_str(), 100 * umin, 100 * need_util, umin >= need_util ? "met" : "NOT met", 100 * rel,
                rel <= 0.03 ? "met" : "NOT met", ratio, ratio >= 100 ? "met" : "NOT met");
  }
  for (const auto& r : rows) {
    nlohmann::json j{{"bench", "strategies"}, {"strategy", r.strategy}, {"wall_s", r.wall_s}, {"utilisation", r.util},
                     {"wall_utilisation", r.wall_util}, {"tokens", r.tokens}, {"val_loss", r.val_loss}, {"strait_bytes", r.strait_bytes}, {"outer_steps", r.outer_steps},
                     {"outer_wait_s", r.outer_wait_s}, {"emulated", true}, {"bandwidth", a.bandwidth},
                     {"latency", a.latency}, {"steps", a.steps}, {"codec", r.strategy == "sync" ? "none" : a.codec},
                     {"inner_steps", a.inner}, {"fragments", a.fragments}, {"overlap", a.overlap},
                     {"outer_lr", a.outer_lr}, {"outer_momentum", a.outer_momentum}};
    std::printf("JSON %s\n", j.dump().c_str());
  }
  std::printf("validation curve: %s\n", (fs::path(a.out) / "val_curve.csv").string().c_str());
  if (a.report) {
    std::vector<fs::path> dirs;
    for (const auto& r : rows) dirs.push_back(fs::path(a.out) / r.strategy);
    runtime::ReportOptions ro;
    ro.out_dir = fs::path(a.out) / "report";
    auto rep = runtime::writeReport(dirs, ro);
    if (!rep.isOk()) {
      std::fprintf(stderr, "error: report: %s\n", rep.status().toString().c_str());
      return 1;
    }
    std::printf("report (validation loss vs wall-clock and vs tokens per strategy): %s\n", rep->index_html.c_str());
  }
  return 0;
}
