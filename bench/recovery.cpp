// Recovery benchmark (issue: fault tolerance and elasticity). Trains the
// demo model (configs/demo.yaml: 3 CPU workers in 2 islands, EMULATED
// slowdown and strait) through the real launcher twice in the same run:
//   baseline: no faults (step time, checkpoint stall, final loss);
//   chaos:    kill -9 of rank 1 at step K (the launcher starts a replacement
//             that joins with the live state), then SIGSTOP of rank 2 past
//             the failure bound (declared failed, fenced, replaced).
// Prints: detection time (fault -> a survivor or the coordinator declares
// it), recovery (fault -> first completed step after it), time for the
// joiner to be in step (replacement started -> its first completed step),
// checkpoint stall per step as % of the step time. Targets: recovery < 5 s,
// join < 10 s, stall < 2%. A table, then one JSON line.
//
//   build/bench/bench_recovery [--binary build/src/cli/archipelago] [--steps 80]
//                              [--data data/prepared/sotu-byte] [--failure-timeout 2]
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct Args {
  std::string binary = "build/src/cli/archipelago";
  std::string data = "data/prepared/sotu-byte";
  int steps = 80;
  double failure_timeout = 2.0;
};

double now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::vector<json> lines(const fs::path& run) {
  std::vector<json> out;
  std::ifstream f(run / "metrics.jsonl");
  std::string l;
  while (std::getline(f, l)) {
    auto j = json::parse(l, nullptr, false);
    if (!j.is_discarded()) out.push_back(j);
  }
  return out;
}

int64_t lastStep(const fs::path& run) {
  int64_t s = 0;
  for (const auto& j : lines(run)) {
    if (j.value("kind", "") == "step") s = std::max(s, j.value("step", int64_t{0}));
  }
  return s;
}

std::map<int, int> pids(const fs::path& run) {
  std::map<int, int> out;
  std::ifstream f(run / "workers.json");
  auto j = json::parse(f, nullptr, false);
  if (j.is_discarded() || !j.contains("pids")) return out;
  for (auto& [k, v] : j["pids"].items()) out[std::stoi(k)] = v.get<int>();
  return out;
}

std::string jobYaml(const Args& a, const fs::path& run) {
  return "cluster:\n  name: demo-2-islands\n  islands:\n"
         "    - {name: fast, device: cpu, count: 2}\n"
         "    - {name: slow, device: cpu, count: 1, slowdown: 2.0}\n"
         "  straits: [{a: fast, b: slow, bandwidth: 1Gbit/s, latency: 5ms}]\n"
         "model: {dim: 128, n_layers: 4, n_heads: 4, max_seq_len: 128}\n"
         "data: {dir: " + fs::absolute(a.data).string() + ", seq_len: 128}\n"
         "train: {steps: " + std::to_string(a.steps) + ", global_batch: 24, lr: 3.0e-3, min_lr: 3.0e-4, "
         "warmup_steps: 20, eval_every: 0, rebalance: false}\n"
         "strategy: {kind: sync, failure_timeout: " + std::to_string(a.failure_timeout) + "s}\n"
         "checkpoint: {every: 10, keep_last: 2}\n"
         "run_dir: " + run.string() + "\n";
}

pid_t launch(const Args& a, const fs::path& yaml, const fs::path& out) {
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execl(a.binary.c_str(), a.binary.c_str(), "train", yaml.c_str(), static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  return pid;
}

template <typename F>
bool waitUntil(pid_t job, double seconds, F cond) {
  const double t0 = now();
  while (now() - t0 < seconds) {
    if (cond()) return true;
    int st = 0;
    if (::waitpid(job, &st, WNOHANG) == job) return cond();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

int finish(pid_t job, double seconds) {
  const double t0 = now();
  while (now() - t0 < seconds) {
    int st = 0;
    if (::waitpid(job, &st, WNOHANG) == job) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(job, SIGKILL);
  ::waitpid(job, nullptr, 0);
  return -1;
}

struct StepStats {
  double mean_step_s = 0;
  double stall_mean_s = 0;
  int checkpoints = 0;
  double final_loss = 0;
  double commit_s = 0;  // median per-step in-memory commit (the elastic rollback copy)
};

StepStats stepStats(const fs::path& run, int64_t steps) {
  StepStats s;
  std::vector<double> step_s, commit_s;
  double stall = 0;
  for (const auto& j : lines(run)) {
    const std::string kind = j.value("kind", "");
    if (kind == "step" && j.value("rank", -1) == 0 && j.value("step", 0) > 3) {
      step_s.push_back(j.value("step_s", 0.0));
      commit_s.push_back(j.value("commit_s", 0.0));
    }
    if (kind == "step" && j.value("step", int64_t{0}) == steps) s.final_loss = j.value("loss", 0.0);
    if (kind == "event" && j.value("event", "") == "checkpoint") {
      stall += j.value("stall_s", 0.0);
      ++s.checkpoints;
    }
  }
  std::sort(step_s.begin(), step_s.end());
  if (!step_s.empty()) s.mean_step_s = step_s[step_s.size() / 2];  // median: robust to the recovery steps
  std::sort(commit_s.begin(), commit_s.end());
  if (!commit_s.empty()) s.commit_s = commit_s[commit_s.size() / 2];
  if (s.checkpoints) s.stall_mean_s = stall / s.checkpoints;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--binary") a.binary = v;
    else if (k == "--steps") a.steps = std::stoi(v);
    else if (k == "--data") a.data = v;
    else if (k == "--failure-timeout") a.failure_timeout = std::stod(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (!fs::exists(fs::path(a.data) / "manifest.json")) {
    std::fprintf(stderr, "no prepared data in %s: run `%s data prepare --input data/corpus/sotu --out %s`\n",
                 a.data.c_str(), a.binary.c_str(), a.data.c_str());
    return 2;
  }
  const fs::path tmp = fs::temp_directory_path() / ("arch_bench_recovery_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  std::printf("recovery benchmark: demo model, 3 CPU workers in 2 islands (EMULATED slowdown 2x and 1 Gbit/s 5 ms "
              "strait), %d steps, failure_timeout %.1f s\n", a.steps, a.failure_timeout);

  // ---- baseline: no faults ----
  const fs::path base = tmp / "baseline";
  std::ofstream(tmp / "baseline.yaml") << jobYaml(a, base);
  pid_t b = launch(a, tmp / "baseline.yaml", tmp / "baseline.out");
  if (finish(b, 600) != 0) {
    std::fprintf(stderr, "baseline run failed; see %s\n", (tmp / "baseline.out").c_str());
    return 1;
  }
  const StepStats bs = stepStats(base, a.steps);

  // ---- chaos: kill -9, then SIGSTOP ----
  const fs::path run = tmp / "chaos";
  std::ofstream(tmp / "chaos.yaml") << jobYaml(a, run);
  pid_t job = launch(a, tmp / "chaos.yaml", tmp / "chaos.out");
  auto events = [&](const std::string& name) {
    std::vector<json> out;
    for (const auto& j : lines(run)) {
      if (j.value("kind", "") == "event" && j.value("event", "") == name) out.push_back(j);
    }
    return out;
  };
  struct Fault {
    std::string what;
    int rank = 0;
    double at = 0;
    double detect_s = -1, recovery_s = -1, join_s = -1, transfer_s = -1;
  };
  std::vector<Fault> faults;
  const int64_t kill_step = a.steps / 5, stop_step = a.steps / 2;
  for (int f = 0; f < 2; ++f) {
    Fault ft;
    ft.what = f == 0 ? "kill -9" : "SIGSTOP";
    ft.rank = f == 0 ? 1 : 2;
    const size_t failures0 = events("failure").size(), joins0 = events("join").size(), rec0 = events("recovered").size();
    const size_t repl0 = events("replace").size();
    if (!waitUntil(job, 300, [&] { return lastStep(run) >= (f == 0 ? kill_step : stop_step); })) break;
    const int pid = pids(run)[ft.rank];
    ft.at = now();
    ::kill(pid, f == 0 ? SIGKILL : SIGSTOP);
    if (waitUntil(job, 60, [&] { return events("failure").size() > failures0; })) {
      ft.detect_s = events("failure").back().value("detected_at", 0.0) - ft.at;
    }
    if (waitUntil(job, 60, [&] { return events("recovered").size() > rec0; })) {
      ft.recovery_s = events("recovered").back().value("time", 0.0) - ft.at;
    }
    if (waitUntil(job, 120, [&] { return events("join").size() > joins0 && events("replace").size() > repl0; })) {
      const double started = events("replace").back().value("time", 0.0);
      ft.transfer_s = events("join").back().value("transfer_s", 0.0);
      const int r = events("join").back().value("rank", -1);
      // The joiner's first completed step (a step line of its rank after it started).
      waitUntil(job, 60, [&] {
        for (const auto& j : lines(run)) {
          if (j.value("kind", "") == "step" && j.value("rank", -1) == r && j.value("time", 0.0) > started) {
            ft.join_s = j.value("time", 0.0) - started;
            return true;
          }
        }
        return false;
      });
    }
    faults.push_back(ft);
  }
  const int rc = finish(job, 600);
  const StepStats cs = stepStats(run, a.steps);

  std::printf("\n%-10s %12s %14s %14s %14s\n", "fault", "detect [s]", "recovery [s]", "join [s]", "transfer [s]");
  for (const auto& f : faults) {
    std::printf("%-10s %12.3f %14.3f %14.3f %14.3f\n", f.what.c_str(), f.detect_s, f.recovery_s, f.join_s, f.transfer_s);
  }
  const double stall_pct = bs.mean_step_s > 0 ? 100.0 * bs.stall_mean_s / bs.mean_step_s / 10.0 : 0;
  std::printf("\nbaseline (no faults): %.3f s/step (median), final loss %.4f\n", bs.mean_step_s, bs.final_loss);
  std::printf("chaos run: exit %d, final loss %.4f (%+.2f%% vs baseline)\n", rc, cs.final_loss,
              bs.final_loss > 0 ? 100.0 * (cs.final_loss - bs.final_loss) / bs.final_loss : 0.0);
  std::printf("checkpoint stall: %.1f ms per checkpoint (in-memory snapshot) = %.2f%% of one step; every 10 steps = "
              "%.3f%% of step time\n", 1e3 * bs.stall_mean_s, bs.mean_step_s > 0 ? 100 * bs.stall_mean_s / bs.mean_step_s : 0.0,
              stall_pct);
  std::printf("elastic rollback copy per step: %.2f ms = %.2f%% of step time\n", 1e3 * bs.commit_s,
              bs.mean_step_s > 0 ? 100 * bs.commit_s / bs.mean_step_s : 0.0);
  std::printf("(detect = fault until a survivor's training step saw the error, which waits for that step's compute; "
              "the transport sees a closed socket within ms)\n");
  double worst_rec = 0, worst_join = 0;
  for (const auto& f : faults) {
    worst_rec = std::max(worst_rec, f.recovery_s);
    worst_join = std::max(worst_join, f.join_s);
  }
  std::printf("targets: recovery < 5 s: %s (worst %.2f s); join < 10 s: %s (worst %.2f s); stall < 2%%: %s\n",
              worst_rec > 0 && worst_rec < 5 ? "met" : "NOT met", worst_rec,
              worst_join > 0 && worst_join < 10 ? "met" : "NOT met", worst_join, stall_pct < 2 ? "met" : "NOT met");
  json out{{"bench", "recovery"}, {"steps", a.steps}, {"failure_timeout_s", a.failure_timeout},
           {"baseline_step_s", bs.mean_step_s}, {"baseline_final_loss", bs.final_loss},
           {"chaos_final_loss", cs.final_loss}, {"chaos_exit", rc},
           {"checkpoint_stall_s", bs.stall_mean_s}, {"checkpoint_stall_pct_of_step", stall_pct},
           {"commit_s", bs.commit_s}};
  for (const auto& f : faults) {
    out["faults"].push_back({{"fault", f.what}, {"rank", f.rank}, {"detect_s", f.detect_s}, {"recovery_s", f.recovery_s},
                             {"join_s", f.join_s}, {"transfer_s", f.transfer_s}});
  }
  std::printf("%s\n", out.dump().c_str());
  if (rc == 0) fs::remove_all(tmp);
  else std::fprintf(stderr, "chaos run failed; kept %s\n", tmp.c_str());
  return rc == 0 ? 0 : 1;
}
