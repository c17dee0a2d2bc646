// Framework overhead of the trainer (issue 19: "step time of one worker <=
// 1.05x a bare libtorch loop of the same model, device and dtype"). One
// process, the same model, device, dtype, batch and threads:
//   (a) a bare libtorch loop: forward, backward, torch::optim::AdamW on one
//       fixed batch already on the device; bf16 is PyTorch's autocast (fp32
//       parameters, bf16 matmuls: model/torch_compat.h AutocastScope), what
//       a libtorch user writes, not our own bf16 path;
//   (b) the trainer (runTrainer, no communicator): sampler, batch copies to
//       the device, fp32 masters with a compute-dtype twin, flat AdamW,
//       metrics, trace.
// With --rounds R the two loops alternate R times and each figure is the
// median of the rounds' means: on a shared machine the load drifts between
// two back-to-back runs. CPU seconds per step (the whole process) are
// printed beside the wall time: they do not grow when the loop waits for a
// core another process holds.
// Prints both step times, the ratio, where the trainer's step goes
// (compute / data / optimizer / the rest, from its metrics.jsonl) next to
// the bare loop's forward+backward and optimizer, the model size, tokens/s
// and, with --peak KIND, MFU against that catalog kind's dense peak; then
// one JSON line.
//   bench_overhead_torch [DATA_DIR] [STEPS] [--device cuda] [--dtype bf16] [--threads N]
//                        [--dim D --layers L --heads H --seq T --batch B] [--peak h200] [--rounds R]
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/config.h"
#include "archipelago/core/cpu_time.h"
#include "archipelago/core/host_memory.h"
#include "archipelago/data/dataset.h"
#include "archipelago/model/device.h"
#include "archipelago/model/layers.h"
#include "archipelago/model/torch_compat.h"
#include "archipelago/model/training.h"
#include "archipelago/model/transformer.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/report/metrics.h"
#include "archipelago/runtime/trainer.h"

using namespace archipelago;

namespace {

struct Options {
  std::string data = "data/prepared/sotu-byte";
  int steps = 30;
  std::string device = "cpu";
  std::string dtype = "fp32";
  int64_t threads = 1;
  int64_t dim = 128, layers = 4, heads = 4, seq = 128, batch = 16;
  std::string peak;  // catalog kind for MFU; empty: no MFU line
  int rounds = 1;
};

// Seconds per step, the first (allocations, kernel selection) not counted.
struct BareTimes {
  double step_s = 0, fwd_bwd_s = 0, optimizer_s = 0, cpu_s = 0;
};

// Means over the trainer's step records after its first step.
struct TrainerTimes {
  double step_s = 0, compute_s = 0, data_s = 0, optimizer_s = 0, comm_s = 0, cpu_s = 0;
};

core::JobConfig makeJob(const Options& o, int64_t vocab) {
  core::JobConfig job;
  core::IslandSpec island;
  island.name = "local";
  island.torch_device = o.device;
  island.dtype = o.dtype;
  island.threads = o.threads;
  job.cluster.islands = {island};
  job.model.dim = o.dim;
  job.model.n_layers = o.layers;
  job.model.n_heads = o.heads;
  job.model.max_seq_len = o.seq;
  job.model.vocab_size = vocab;
  job.model.dtype = o.dtype;
  job.data.dir = o.data;
  job.data.seq_len = o.seq;
  job.train.steps = o.steps;
  job.train.global_batch = o.batch;
  job.train.threads_per_worker = o.threads;
  job.train.eval_every = 0;
  job.train.grad_clip = 0;
  job.train.weight_decay = 0;
  job.train.rebalance = false;
  job.train.check_ops = false;  // a check before the first step is not a step cost
  job.checkpoint.at_exit = false;
  job.checkpoint.every = 0;
  return job;
}

core::Result<BareTimes> runBare(const Options& o, const core::JobConfig& job, data::PreparedDataset& ds) {
  ARCH_ASSIGN_OR_RETURN(const torch::Device device, model::parseDevice(o.device));
  ARCH_ASSIGN_OR_RETURN(const torch::ScalarType dtype, model::computeScalarType(o.dtype));
  ARCH_ASSIGN_OR_RETURN(auto net, model::buildModel(job.model, static_cast<uint64_t>(job.train.seed)));
  net->to(device);
  ARCH_ASSIGN_OR_RETURN(auto sampler, ds.trainSampler(1, o.seq));
  auto b = sampler.batchAt(0, {o.batch}, 0);
  auto in = torch::from_blob(b.input.data(), {o.batch, o.seq}, torch::kInt64).to(device);
  auto tg = torch::from_blob(b.target.data(), {o.batch, o.seq}, torch::kInt64).to(device);
  const auto& t = job.train;
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(t.lr)
                                                 .betas({t.beta1, t.beta2})
                                                 .eps(t.adam_eps)
                                                 .weight_decay(t.weight_decay));
  BareTimes sum;
  for (int s = 0; s < o.steps; ++s) {
    const auto t0 = core::Clock::now();
    const double cpu0 = core::processCpuSeconds();
    opt.zero_grad();
    torch::Tensor loss;
    if (dtype == torch::kFloat32) {
      loss = net->lossAndStats(in, tg).loss;
    } else {
      model::compat::AutocastScope autocast(device.type(), dtype);
      loss = net->lossAndStats(in, tg).loss;
    }
    loss.backward();
    model::compat::synchronize(device);
    const auto t1 = core::Clock::now();
    opt.step();
    model::compat::synchronize(device);
    if (s == 0) continue;
    sum.fwd_bwd_s += std::chrono::duration<double>(t1 - t0).count();
    sum.optimizer_s += core::secondsSince(t1);
    sum.step_s += core::secondsSince(t0);
    sum.cpu_s += core::processCpuSeconds() - cpu0;
  }
  const double n = o.steps - 1;
  return BareTimes{sum.step_s / n, sum.fwd_bwd_s / n, sum.optimizer_s / n, sum.cpu_s / n};
}

TrainerTimes trainerBreakdown(const std::string& metrics_path) {
  TrainerTimes sum;
  int n = 0;
  std::ifstream in(metrics_path);
  for (std::string line; std::getline(in, line);) {
    auto parsed = report::parseMetricsRecord(line);
    if (!parsed.record) continue;
    const auto* r = std::get_if<report::StepRecord>(&*parsed.record);
    if (!r || r->step <= 1) continue;
    sum.step_s += r->step_s, sum.compute_s += r->compute_s, sum.data_s += r->data_s;
    sum.optimizer_s += r->optimizer_s, sum.comm_s += r->comm_s, sum.cpu_s += r->cpu_s;
    ++n;
  }
  if (n == 0) return sum;
  return TrainerTimes{sum.step_s / n, sum.compute_s / n, sum.data_s / n, sum.optimizer_s / n, sum.comm_s / n,
                      sum.cpu_s / n};
}

core::Result<TrainerTimes> runFramework(const core::JobConfig& job) {
  runtime::TrainerOptions o;
  o.job = job;
  o.run_dir = (std::filesystem::temp_directory_path() / "arch_bench_overhead").string();
  std::filesystem::remove_all(o.run_dir);
  std::filesystem::create_directories(o.run_dir);
  auto sum = runtime::runTrainer(o);
  TrainerTimes t = trainerBreakdown((std::filesystem::path(o.run_dir) / "metrics.jsonl").string());
  std::filesystem::remove_all(o.run_dir);
  if (!sum.isOk()) return sum.status();
  t.step_s = sum->mean_step_s;  // the trainer's own figure, as every bench reports it
  return t;
}

// Dense peak of `kind` in `dtype` from the device catalog; 0 when unknown.
double peakFlops(const std::string& kind, const std::string& dtype) {
  if (kind.empty()) return 0;
  auto cat = plan::DeviceCatalog::builtin();
  if (!cat.isOk()) return 0;
  auto spec = cat->get(kind);
  auto d = plan::parseDtype(dtype);
  if (!spec.isOk() || !d.isOk()) return 0;
  return spec->peakFlops(*d);
}

void printReport(const Options& o, const core::JobConfig& job, const BareTimes& bare, const TrainerTimes& ours) {
  auto resolved = model::resolveModelConfig(job.model);
  const core::ModelConfig& mc = resolved.isOk() ? *resolved : job.model;
  const double params = static_cast<double>(model::countParameters(mc).total);
  const double flops_token = model::flopsPerToken(mc, o.seq).total();
  const double tokens = static_cast<double>(o.batch * o.seq);
  const double peak = peakFlops(o.peak, o.dtype);
  const double ratio = ours.step_s / bare.step_s;
  auto mfu = [&](double step_s) { return peak > 0 ? flops_token * tokens / step_s / peak : 0.0; };
  std::printf("model %.3g parameters (dim %lld, %lld layers, %lld heads), %lld x %lld tokens, %s %s, %lld thread(s)\n",
              params, static_cast<long long>(o.dim), static_cast<long long>(o.layers),
              static_cast<long long>(o.heads), static_cast<long long>(o.batch), static_cast<long long>(o.seq),
              o.device.c_str(), o.dtype.c_str(), static_cast<long long>(o.threads));
  std::printf("%-28s %9s %9s %9s %9s %9s %11s %7s\n", "loop (median of rounds)", "s/step", "cpu s", "fwd+bwd",
              "data", "optimizer", "tokens/s", "MFU");
  std::printf("%-28s %9.4f %9.4f %9.4f %9s %9.4f %11.0f %6.1f%%\n", "bare libtorch (fixed batch)", bare.step_s,
              bare.cpu_s, bare.fwd_bwd_s, "-", bare.optimizer_s, tokens / bare.step_s, 100 * mfu(bare.step_s));
  std::printf("%-28s %9.4f %9.4f %9.4f %9.4f %9.4f %11.0f %6.1f%%\n", "archipelago trainer", ours.step_s, ours.cpu_s,
              ours.compute_s, ours.data_s, ours.optimizer_s, tokens / ours.step_s, 100 * mfu(ours.step_s));
  std::printf("trainer step beyond compute+data+optimizer: %.4f s (metrics, trace, control values; comm %.4f s)\n",
              ours.step_s - ours.compute_s - ours.data_s - ours.optimizer_s, ours.comm_s);
  if (peak > 0) {
    std::printf("MFU: %.3g FLOPs/token (model::flopsPerToken) x tokens/s over %s %s dense peak %.4g TFLOP/s\n",
                flops_token, o.peak.c_str(), o.dtype.c_str(), peak / 1e12);
  }
  std::printf("ratio %.3f (target <= 1.05); CPU seconds per step %.3f; %d round(s) of %d steps\n", ratio,
              ours.cpu_s / bare.cpu_s, o.rounds, o.steps);
  std::printf("{\"bench\":\"overhead\",\"device\":\"%s\",\"dtype\":\"%s\",\"threads\":%lld,\"params\":%.0f,"
              "\"tokens_per_step\":%.0f,\"flops_per_token\":%.6g,\"bare_step_s\":%.5f,\"trainer_step_s\":%.5f,\"ratio\":%.4f,"
              "\"bare_tokens_per_s\":%.1f,\"trainer_tokens_per_s\":%.1f,\"peak_kind\":\"%s\",\"bare_mfu\":%.4f,"
              "\"trainer_mfu\":%.4f,\"trainer_compute_s\":%.5f,\"trainer_data_s\":%.5f,\"trainer_optimizer_s\":%.5f,"
              "\"bare_fwd_bwd_s\":%.5f,\"bare_optimizer_s\":%.5f,\"bare_cpu_s\":%.5f,\"trainer_cpu_s\":%.5f,"
              "\"cpu_ratio\":%.4f,\"rounds\":%d}\n",
              o.device.c_str(), o.dtype.c_str(), static_cast<long long>(o.threads), params, tokens, flops_token, bare.step_s,
              ours.step_s, ratio, tokens / bare.step_s, tokens / ours.step_s, o.peak.c_str(), mfu(bare.step_s),
              mfu(ours.step_s), ours.compute_s, ours.data_s, ours.optimizer_s, bare.fwd_bwd_s, bare.optimizer_s,
              bare.cpu_s, ours.cpu_s, ours.cpu_s / bare.cpu_s, o.rounds);
}

// Runs one loop in a fresh child process and returns its times: each loop
// starts as a user's program would, with no allocator state, thread pools
// or device context left by the other (measured: in one process the
// trainer after the bare loop spent ~40 ms per 0.16 s step off the CPU,
// while alone its step matched the bare loop's). Nothing touches libtorch
// in the parent, so a CUDA context is only ever made in a child. Both get
// the trainer's process settings: its compute threads
// (model::setComputeThreads also bounds OpenBLAS's own pool, which
// torch::set_num_threads does not reach) and freed memory kept in the
// process (core::holdFreedMemory).
template <class T>
core::Result<T> inChild(const std::function<core::Result<T>()>& loop, int64_t threads) {
  int fds[2];
  if (::pipe(fds) != 0) return core::internalError("pipe: " + std::string(std::strerror(errno)));
  const pid_t pid = ::fork();
  if (pid < 0) return core::internalError("fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    ::close(fds[0]);
    model::setComputeThreads(threads);
    core::holdFreedMemory();
    auto r = loop();
    std::string msg = r.isOk() ? std::string("k") + std::string(reinterpret_cast<const char*>(&*r), sizeof(T))
                               : "e" + r.status().toString();
    ssize_t off = 0;
    while (off < static_cast<ssize_t>(msg.size())) {
      const ssize_t n = ::write(fds[1], msg.data() + off, msg.size() - static_cast<size_t>(off));
      if (n <= 0) break;
      off += n;
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) got.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int wst = 0;
  ::waitpid(pid, &wst, 0);
  if (got.size() == 1 + sizeof(T) && got[0] == 'k') {
    T t;
    std::memcpy(&t, got.data() + 1, sizeof(T));
    return t;
  }
  if (!got.empty() && got[0] == 'e') return core::internalError(got.substr(1));
  return core::internalError("the loop's process ended without a result (wait status " + std::to_string(wst) + ")");
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Field by field: each figure is the median of the rounds' means.
template <class T, class... M>
T medianOf(const std::vector<T>& rounds, M T::*... fields) {
  T out;
  auto one = [&](double T::*f) {
    std::vector<double> v;
    for (const auto& r : rounds) v.push_back(r.*f);
    out.*f = median(std::move(v));
  };
  (one(fields), ...);
  return out;
}
BareTimes medianOf(const std::vector<BareTimes>& r) {
  return medianOf(r, &BareTimes::step_s, &BareTimes::fwd_bwd_s, &BareTimes::optimizer_s, &BareTimes::cpu_s);
}
TrainerTimes medianOf(const std::vector<TrainerTimes>& r) {
  return medianOf(r, &TrainerTimes::step_s, &TrainerTimes::compute_s, &TrainerTimes::data_s,
                  &TrainerTimes::optimizer_s, &TrainerTimes::comm_s, &TrainerTimes::cpu_s);
}

void addOptions(CLI::App& app, Options& o) {
  app.add_option("data", o.data, "prepared data directory (archipelago data prepare)")->capture_default_str();
  app.add_option("steps", o.steps, "steps of each loop (the first is not timed)")->capture_default_str()
      ->check(CLI::Range(2, 1000000));
  app.add_option("--device", o.device, "torch device of both loops: cpu, cuda, cuda:1, ...")->capture_default_str();
  app.add_option("--dtype", o.dtype, "compute dtype of both loops")->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--threads", o.threads, "intra-op threads of both loops")->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--dim", o.dim, "model width")->capture_default_str();
  app.add_option("--layers", o.layers, "decoder layers")->capture_default_str();
  app.add_option("--heads", o.heads, "attention heads")->capture_default_str();
  app.add_option("--seq", o.seq, "tokens per sequence")->capture_default_str();
  app.add_option("--batch", o.batch, "sequences per step")->capture_default_str();
  app.add_option("--rounds", o.rounds, "alternate the two loops this many times; report medians")
      ->capture_default_str()->check(CLI::Range(1, 100));
  app.add_option("--peak", o.peak, "device catalog kind whose dense peak MFU is measured against (h100, h200, ...)");
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"trainer step vs a bare libtorch loop of the same model, device, dtype and batch"};
  addOptions(app, o);
  CLI11_PARSE(app, argc, argv);
  auto ds = data::PreparedDataset::open(o.data);
  if (!ds.isOk()) {
    std::fprintf(stderr, "bench_overhead: %s (prepare it with `archipelago data prepare`)\n",
                 ds.status().toString().c_str());
    return 1;
  }
  const core::JobConfig job = makeJob(o, (*ds)->vocabSize());
  std::vector<BareTimes> bares;
  std::vector<TrainerTimes> ours;
  for (int r = 0; r < o.rounds; ++r) {
    auto bare = inChild<BareTimes>([&] { return runBare(o, job, **ds); }, o.threads);
    if (!bare.isOk()) {
      std::fprintf(stderr, "bench_overhead: bare loop: %s\n", bare.status().toString().c_str());
      return 1;
    }
    bares.push_back(*bare);
    auto t = inChild<TrainerTimes>([&] { return runFramework(job); }, o.threads);
    if (!t.isOk()) {
      std::fprintf(stderr, "bench_overhead: trainer: %s\n", t.status().toString().c_str());
      return 1;
    }
    ours.push_back(*t);
  }
  printReport(o, job, medianOf(bares), medianOf(ours));
  return 0;
}
