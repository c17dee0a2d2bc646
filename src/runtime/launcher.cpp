#include "archipelago/runtime/launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/clock.h"
#include "archipelago/core/files.h"
#include "archipelago/core/hash.h"
#include "archipelago/core/island_layout.h"
#include "archipelago/core/log.h"
#include "archipelago/core/units.h"
#include "archipelago/data/prepare.h"
#include "archipelago/plan/host_fit.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/report/metrics.h"
#include "archipelago/runtime/trace.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/coordinator_process.h"
#include "runtime/cpu_quota.h"
#include "runtime/security.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_interrupts{0};
void onInterrupt(int) { g_interrupts.fetch_add(1); }

std::string randomSecret() {
  std::random_device rd;
  std::string raw;
  for (int i = 0; i < 8; ++i) {
    uint32_t x = rd();
    raw.append(reinterpret_cast<const char*>(&x), 4);
  }
  return core::sha256Hex(raw);
}

// Prepares data.dir from data.inputs when it holds no manifest yet.
core::Status ensureData(const core::JobConfig& job) {
  if (fs::exists(fs::path(job.data.dir) / "manifest.json")) return core::okStatus();
  if (job.data.inputs.empty()) {
    return core::failedPrecondition("data.dir '" + job.data.dir +
                                    "' holds no prepared dataset (no manifest.json) and data.inputs is empty; run "
                                    "`archipelago data prepare --input TEXT_DIR --out " + job.data.dir +
                                    "` or list raw inputs in data.inputs");
  }
  for (const auto& in : job.data.inputs) {
    if (!fs::exists(in)) {
      return core::notFound("data.inputs entry '" + in + "' does not exist (run scripts/setup.sh to fetch the default corpus)");
    }
  }
  data::PrepareOptions po;
  po.inputs = job.data.inputs;
  po.out = job.data.dir;
  po.tokenizer = job.data.tokenizer;
  po.vocab = job.data.vocab;
  po.val_fraction = job.data.val_fraction;
  po.progress = true;
  ARCH_LOG_INFO("preparing data: {} -> {} ({} tokenizer)", fmt::join(po.inputs, ", "), po.out, po.tokenizer);
  auto rep = data::prepareDataset(po);
  if (!rep.isOk()) return rep.status().withContext("preparing data for the job");
  return core::okStatus();
}

struct Child {
  int rank = 0;
  pid_t pid = -1;
  int exit_code = -1;  // set when reaped
  std::string log;
  bool joiner = false;     // a replacement started with --join
  bool cancelled = false;  // killed by the launcher after the job finished: its exit code means nothing
};

std::string tailOf(const std::string& path, size_t max_bytes = 1500) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (s.size() > max_bytes) s = "..." + s.substr(s.size() - max_bytes);
  return s;
}

// Follows metrics.jsonl (through the report's reader, so it reads what the
// trainers write) and renders one progress line.
class ProgressView {
 public:
  ProgressView(std::string path, const core::JobConfig& job, std::vector<WorkerInfo> workers)
      : path_(std::move(path)), job_(job), workers_(std::move(workers)) {}

  void poll() {
    std::ifstream in(path_);
    if (!in) return;
    in.seekg(offset_);
    std::string line;
    while (std::getline(in, line)) {
      if (in.eof()) break;  // partial line: read again next time
      offset_ += static_cast<std::streamoff>(line.size() + 1);
      auto parsed = report::parseMetricsRecord(line);
      if (!parsed.record) continue;
      if (const auto* s = std::get_if<report::StepRecord>(&*parsed.record)) {
        last_step_ = std::max(last_step_, s->step);
        if (std::isfinite(s->loss)) loss_ = s->loss;
        auto& w = per_rank_[s->rank];
        if (std::isfinite(s->tokens)) w.tokens += static_cast<int64_t>(s->tokens);
        if (std::isfinite(s->compute_s)) w.compute += s->compute_s;
        if (std::isfinite(s->step_s)) w.wall += s->step_s;
        if (std::isfinite(s->time)) {
          if (first_time_ == 0) first_time_ = s->time;
          last_time_ = s->time;
        }
      } else if (const auto* e = std::get_if<report::EvalRecord>(&*parsed.record)) {
        val_loss_ = std::isfinite(e->val_loss) ? e->val_loss : -1.0;
      }
    }
  }

  std::string line() const {
    const int64_t total = job_.train.steps;
    double elapsed = last_time_ - first_time_;
    int64_t tokens = 0;
    for (const auto& [r, w] : per_rank_) tokens += w.tokens;
    double tps = elapsed > 0 ? static_cast<double>(tokens) / elapsed : 0;
    double eta = last_step_ > 0 && elapsed > 0 ? elapsed / static_cast<double>(last_step_) * static_cast<double>(total - last_step_) : 0;
    // Per-island utilisation: compute / wall over the island's workers.
    std::map<std::string, std::pair<double, double>> isl;
    for (const auto& [r, w] : per_rank_) {
      if (r < 0 || r >= static_cast<int>(workers_.size())) continue;
      auto& p = isl[workers_[static_cast<size_t>(r)].island];
      p.first += w.compute;
      p.second += w.wall;
    }
    std::string util;
    for (const auto& [name, p] : isl) {
      util += fmt::format(" {}:{:.0f}%", name, p.second > 0 ? 100.0 * p.first / p.second : 0.0);
    }
    std::string val = val_loss_ >= 0 ? fmt::format(" val {:.3f}", val_loss_) : "";
    return fmt::format("step {}/{}  loss {:.3f}{}  {:.0f} tok/s  ETA {:.0f}s  util{}", last_step_, total, loss_, val,
                       tps, eta, util);
  }
  int64_t lastStep() const { return last_step_; }

 private:
  struct PerRank {
    int64_t tokens = 0;
    double compute = 0, wall = 0;
  };
  std::string path_;
  const core::JobConfig& job_;
  std::vector<WorkerInfo> workers_;
  std::streamoff offset_ = 0;
  int64_t last_step_ = 0;
  double loss_ = 0, val_loss_ = -1;
  double first_time_ = 0, last_time_ = 0;
  std::map<int, PerRank> per_rank_;
};

// ---- run directory: refuse to mix two runs, refuse to resume nothing ----
core::Status prepareRunDir(const LaunchOptions& opt, const core::JobConfig& job) {
  const std::string& run_dir = job.run_dir;
  if (opt.resume) {
    if (!fs::exists(fs::path(run_dir) / "checkpoints")) {
      return core::failedPrecondition("--resume: run_dir '" + run_dir + "' has no checkpoints to resume from");
    }
    ARCH_ASSIGN_OR_RETURN(auto latest, latestValidCheckpoint(run_dir));
    ARCH_LOG_INFO("resuming from {}", latest);
  } else if (!listCheckpoints(run_dir).empty()) {
    return core::failedPrecondition("run_dir '" + run_dir +
                                    "' already holds a run with checkpoints; pass --resume to continue it, or set "
                                    "run_dir (e.g. --set run_dir=runs/new) to start a new one");
  }
  ARCH_RETURN_IF_ERROR(ensureData(job));

  std::error_code ec;
  fs::create_directories(fs::path(run_dir) / "logs", ec);
  if (ec) return core::unavailable("cannot create run_dir '" + run_dir + "': " + ec.message());
  if (!opt.resume) {
    fs::remove(fs::path(run_dir) / "metrics.jsonl", ec);
    fs::remove_all(fs::path(run_dir) / "trace", ec);
  }
  return core::okStatus();
}

// run.json: who runs where, for the report and for operators.
core::Status writeRunJson(const LaunchOptions& opt, const core::JobConfig& job, const std::vector<WorkerInfo>& workers) {
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& w : workers) {
    ranks.push_back({{"rank", w.rank}, {"island", w.island}, {"device", w.device}, {"slowdown", w.slowdown},
                     {"dtype", w.dtype}, {"threads", w.threads}, {"cpu_quota", w.cpu_quota}});
  }
  nlohmann::json straits = nlohmann::json::array();
  for (const auto& s : job.cluster.straits) {
    straits.push_back({{"a", s.a}, {"b", s.b}, {"bandwidth", core::formatBandwidth(s.bandwidth)},
                       {"latency", core::formatDuration(s.latency)}});
  }
  nlohmann::json run = {{"job", opt.job_path}, {"started", static_cast<double>(core::wallMicros()) / 1e6},
                        {"world", static_cast<int>(workers.size())}, {"ranks", ranks}, {"straits", straits},
                        {"strategy", job.strategy.kind}, {"emulated", true}, {"resumed", opt.resume}};
  return core::writeFileAtomic((fs::path(job.run_dir) / "run.json").string(), run.dump(2));
}

// The launcher's own SIGINT / SIGTERM handler (counts interrupts); returns
// the ones it replaces through old_int / old_term.
void installInterruptHandlers(struct sigaction& old_int, struct sigaction& old_term) {
  struct sigaction sa {};
  sa.sa_handler = onInterrupt;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  g_interrupts = 0;
}

void logEmulation(const core::JobConfig& job, const std::vector<WorkerInfo>& workers) {
  for (const auto& s : job.cluster.straits) {
    if (job.cluster.emulated(s)) {
      ARCH_LOG_INFO("EMULATED strait {}<->{}: {}, {} one way", s.a, s.b, core::formatBandwidth(s.bandwidth),
                    core::formatDuration(s.latency));
    } else {
      ARCH_LOG_INFO("strait {}<->{}: a real link (not shaped; the planner assumes {}, {} one way)", s.a, s.b,
                    core::formatBandwidth(s.bandwidth), core::formatDuration(s.latency));
    }
  }
  for (const auto& w : workers) {
    if (w.slowdown != 1.0) ARCH_LOG_INFO("EMULATED slowdown x{} on rank {} ({})", w.slowdown, w.rank, w.island);
  }
}

// What the phases of one launch share, over all its attempts.
struct Launch {
  Launch(const LaunchOptions& o, const core::JobConfig& j, std::vector<WorkerInfo> w, std::string jf,
         CpuQuotaGroup* q)
      : opt(o),
        job(j),
        run_dir(j.run_dir),
        job_file(std::move(jf)),
        workers(std::move(w)),
        world(static_cast<int>(workers.size())),
        quota(q),
        progress((fs::path(run_dir) / "metrics.jsonl").string(), job, workers),
        // A pipeline or expert-parallel layout holds each tensor on a few ranks
        // and cannot shrink: a lost worker restarts the job from its newest
        // checkpoint instead of being replaced (docs/parallelism.md "Failures").
        replaceable(j.strategy.pipeline_stages <= 1 && j.strategy.expert_parallel <= 1 && !core::perIslandLayouts(j)) {}

  const LaunchOptions& opt;
  const core::JobConfig& job;
  const std::string run_dir;
  const std::string job_file;
  const std::vector<WorkerInfo> workers;
  const int world;
  CpuQuotaGroup* const quota;  // the workers' cgroups (runtime/cpu_quota.h); nullptr: no cpu_quota in the job
  report::MetricsSink events;
  ProgressView progress;
  const core::Clock::time_point t0 = core::Clock::now();
  int forwarded = 0;  // interrupts passed on to the workers
  core::Status failure;
  const bool tty = ::isatty(2);
  core::Clock::time_point last_print = core::Clock::now() - std::chrono::seconds(10);
  std::string last_line;
  int replacements = 0;
  const bool replaceable;
};

// One attempt: a coordinator (a supervised child process, started again
// when it dies) and the workers started against it.
struct Attempt {
  int index = 0;
  bool resume = false;
  std::string secret;
  std::unique_ptr<CoordinatorProcess> coord;
  std::unique_ptr<comm::CoordinatorClient> watch;  // the launcher's own view of the membership (fencing)
  core::Clock::time_point last_watch;
  std::string coord_addr;
  comm::TlsFiles coord_tls;  // {}: the coordinator link is plain
  std::vector<Child> children;
  bool restart = false;
  double finished_at = 0;      // when the first worker finished the job (0: none yet)
  double stopping_since = -1;  // when the launcher began stopping the workers
};

// In the forked child: the worker's output goes to its log; never returns.
// With a cpu_quota the child first waits (on `go`) until the launcher has
// moved it into its cgroup, so not one instruction of the worker runs
// uncapped; a closed pipe means the launcher could not, and it exits.
[[noreturn]] void execWorker(const LaunchOptions& opt, const std::string& log, const std::string& secret,
                             std::vector<std::string>& args, int go, const std::string& cgroup) {
  // Workers ignore the terminal's SIGINT: the launcher decides how to stop them.
  ::setpgid(0, 0);
  int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd >= 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::close(fd);
  }
  ::setenv("ARCHIPELAGO_SECRET", secret.c_str(), 1);
  if (go >= 0) {
    char c = 0;
    if (::read(go, &c, 1) != 1) std::_Exit(126);
    ::close(go);
    ::setenv(kCpuCgroupEnv, cgroup.c_str(), 1);
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(opt.self_exe.c_str(), argv.data());
  std::fprintf(stderr, "cannot exec '%s': %s\n", opt.self_exe.c_str(), std::strerror(errno));
  std::_Exit(127);
}

// Who is who, for operators and the chaos tests (kill -9 / SIGSTOP a rank).
void writeWorkersJson(const Launch& l, const Attempt& a) {
  nlohmann::json pids = nlohmann::json::object();
  for (const auto& ch : a.children) {
    if (ch.exit_code < 0) pids[std::to_string(ch.rank)] = ch.pid;
  }
  const core::Status st = core::writeFileAtomic(
      (fs::path(l.run_dir) / "workers.json").string(),
      nlohmann::json{{"coordinator", a.coord_addr}, {"coordinator_pid", a.coord ? a.coord->pid() : -1},
                     {"attempt", a.index}, {"pids", pids}}
          .dump());
  if (!st.isOk()) ARCH_LOG_WARN("workers.json not written: {}", st.message());
}

core::Status spawnWorker(const Launch& l, Attempt& a, int rank, bool join) {
  const LaunchOptions& opt = l.opt;
  Child c;
  c.rank = rank;
  c.log = (fs::path(l.run_dir) / "logs" / ("rank" + std::to_string(rank) + ".log")).string();
  std::vector<std::string> args = {opt.self_exe, "worker", "--job", l.job_file, "--run-dir", l.run_dir,
                                   "--rank", std::to_string(rank), "--world", std::to_string(l.world),
                                   "--coordinator", a.coord_addr,
                                   "--max-rejoins", "0"};  // an evicted worker is replaced here (reap)
  if (join) args.push_back("--join");
  if (a.resume && !join) args.push_back("--resume");
  if (opt.exit_after_step >= 0 && a.index == 0 && !join) {
    args.push_back("--exit-after-step");
    args.push_back(std::to_string(opt.exit_after_step));
  }
  const WorkerInfo& w = l.workers[static_cast<size_t>(rank)];
  const QuotaApplied* capped = l.quota ? l.quota->applied(quotaChildName(rank)) : nullptr;
  int go[2] = {-1, -1};
  if (capped && ::pipe2(go, O_CLOEXEC) != 0) return core::unavailable("pipe failed while starting worker " + std::to_string(rank));
  pid_t pid = ::fork();
  if (pid < 0) return core::unavailable("fork failed while starting worker " + std::to_string(rank));
  if (pid == 0) {
    if (go[1] >= 0) ::close(go[1]);  // else the child's own copy keeps its read from ever seeing the end
    execWorker(opt, c.log, a.secret, args, go[0], capped ? capped->path : "");
  }
  if (capped) {
    ::close(go[0]);
    const core::Status st = l.quota->add(quotaChildName(rank), pid);
    if (st.isOk() && ::write(go[1], "g", 1) == 1) {
      ARCH_LOG_INFO("cpu_quota {} on rank {} ({}, {}): {}", w.cpu_quota, rank, w.island, quotaField(w),
                    capped->describe());
    }
    ::close(go[1]);  // unwritten: the child exits without starting the worker
    if (!st.isOk()) {
      ::waitpid(pid, nullptr, 0);
      return st.withContext(fmt::format("{} {} of rank {} cannot be applied", quotaField(w), w.cpu_quota, rank));
    }
  }
  c.pid = pid;
  c.joiner = join;
  a.children.push_back(c);
  writeWorkersJson(l, a);
  return core::okStatus();
}

// Reap. A worker that crashed, was killed, or was evicted (declared
// failed while the job went on) is replaced by a joiner in its slot;
// any other non-zero exit fails the job (or restarts it). Returns the ranks
// to replace; counts the workers still running in `alive`.
std::vector<int> reapWorkers(Launch& l, Attempt& a, int& alive) {
  std::vector<int> to_replace;
  for (auto& c : a.children) {
    if (c.exit_code >= 0) continue;
    int status = 0;
    pid_t r = ::waitpid(c.pid, &status, WNOHANG);
    if (r != c.pid) {
      ++alive;
      continue;
    }
    c.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (c.exit_code == 0) {
      if (a.finished_at == 0) a.finished_at = core::secondsSince(l.t0);
      continue;
    }
    if (c.cancelled) continue;
    const bool crashed = WIFSIGNALED(status) || c.exit_code == kExitEvicted;
    if (c.exit_code == kExitRestartJob) {
      a.restart = true;
      ARCH_LOG_WARN("worker {} stopped: too few workers left or the coordinator was lost; the job restarts from "
                    "its newest checkpoint", c.rank);
    } else if (crashed && l.forwarded == 0 && !l.replaceable) {
      a.restart = true;
      ARCH_LOG_WARN("worker {} died (exit {}); the pipeline / expert-parallel layout cannot go on without it: "
                    "the job restarts from its newest checkpoint", c.rank, c.exit_code);
    } else if (crashed && l.forwarded == 0) {
      to_replace.push_back(c.rank);
      ARCH_LOG_WARN("worker {} {} (exit {}); the others continue", c.rank,
                    c.exit_code == kExitEvicted ? "was evicted" : "died", c.exit_code);
    } else if (l.failure.isOk() && l.forwarded == 0) {
      l.failure = core::unavailable("worker " + std::to_string(c.rank) + " exited with code " +
                                    std::to_string(c.exit_code) + "; its log (" + c.log + ") ends with:\n" +
                                    tailOf(c.log));
    }
  }
  return to_replace;
}

// Starts a joiner in each slot of `ranks` while the job goes on and
// --max-replacements allows; with nobody left to hand the state over, the
// job restarts instead.
core::Status replaceWorkers(Launch& l, Attempt& a, const std::vector<int>& ranks, int& alive) {
  for (int r : ranks) {
    if (a.finished_at > 0) continue;  // the job is done: nothing to join
    if (alive == 0) {
      a.restart = true;  // nobody left to hand the state over
      continue;
    }
    if (l.replacements >= l.opt.max_replacements) {
      ARCH_LOG_WARN("not replacing worker {}: the {} replacement(s) allowed by --max-replacements are used; the "
                    "others go on without it", r, l.opt.max_replacements);
      continue;
    }
    ++l.replacements;
    ARCH_LOG_INFO("starting a replacement for rank {} (--join)", r);
    l.events.write(report::EventRecord{
        .event = "replace", .step = l.progress.lastStep(), .rank = r,
        .detail = fmt::format("launcher started a replacement worker for rank {}", r)});
    ARCH_RETURN_IF_ERROR(spawnWorker(l, a, r, true));
    ++alive;
  }
  return core::okStatus();
}

// Fencing: a process whose slot the coordinator declared failed (it
// stalled, e.g. SIGSTOP) must not come back into the job: kill it; it
// is then replaced like a crashed one.
void fenceFailedWorkers(Attempt& a) {
  // Asked over the protocol every 200 ms; while the coordinator is away (or
  // rebuilding its table) nobody is declared failed, so nothing is fenced.
  if (core::secondsSince(a.last_watch) < 0.2) return;
  a.last_watch = core::Clock::now();
  if (!a.watch) {
    auto c = comm::CoordinatorClient::connect(a.coord_addr, a.secret, -1, core::Deadline::afterSeconds(0.2),
                                              a.coord_tls);
    if (!c.isOk()) return;
    a.watch = std::move(c).value();
  }
  const auto mr = a.watch->membership(core::Deadline::afterSeconds(0.2));
  if (!mr.isOk()) return;
  const comm::Membership& m = *mr;
  for (auto& c : a.children) {
    if (c.exit_code >= 0 || c.rank >= static_cast<int>(m.pids.size())) continue;
    if (std::binary_search(m.failed.begin(), m.failed.end(), c.rank) && m.pids[static_cast<size_t>(c.rank)] == c.pid) {
      ARCH_LOG_WARN("worker {} (pid {}) was declared failed but still runs: killing it", c.rank, c.pid);
      ::kill(c.pid, SIGKILL);
      ::kill(c.pid, SIGCONT);
    }
  }
}

// A replacement still waiting to join when the others have finished the
// job has nothing to join: stop it (after a grace period in which a
// joiner that is in step finishes by itself).
void stopLateJoiners(const Launch& l, Attempt& a) {
  if (a.finished_at > 0 && core::secondsSince(l.t0) - a.finished_at > 10) {
    for (auto& c : a.children) {
      if (c.exit_code < 0 && c.joiner && !c.cancelled) {
        ARCH_LOG_INFO("stopping replacement worker {}: the job finished before it could join", c.rank);
        c.cancelled = true;
        ::kill(c.pid, SIGKILL);
      }
    }
  }
}

// The others cannot finish without a failed worker: stop them (SIGTERM:
// stop at the next step boundary and checkpoint; SIGKILL after 3 s).
void stopWorkers(const Launch& l, Attempt& a) {
  if (a.stopping_since < 0) {
    a.stopping_since = core::secondsSince(l.t0);
    for (auto& c : a.children) if (c.exit_code < 0) ::kill(c.pid, SIGTERM);
  } else if (core::secondsSince(l.t0) - a.stopping_since > 3) {
    for (auto& c : a.children) if (c.exit_code < 0) { ::kill(c.pid, SIGKILL); ::kill(c.pid, SIGCONT); }
  }
}

void forwardInterrupts(Launch& l, Attempt& a) {
  int ints = g_interrupts.load();
  if (ints > l.forwarded) {
    // First Ctrl-C: workers stop at the next step boundary and checkpoint.
    // Second: stop now.
    int sig = ints == 1 ? SIGINT : SIGKILL;
    ARCH_LOG_WARN(ints == 1 ? "interrupt: workers stop after this step and write a checkpoint (Ctrl-C again to kill)"
                            : "second interrupt: killing workers");
    for (auto& c : a.children) if (c.exit_code < 0) ::kill(c.pid, sig);
    l.forwarded = ints;
  }
}

void printProgress(Launch& l) {
  l.progress.poll();
  if (l.opt.progress && core::Clock::now() - l.last_print > std::chrono::milliseconds(l.tty ? 500 : 10000)) {
    l.last_line = l.progress.line();
    std::fprintf(stderr, l.tty ? "\r\033[K%s" : "%s\n", l.last_line.c_str());
    std::fflush(stderr);
    l.last_print = core::Clock::now();
  }
}

// A coordinator that died is started again on the same port at once; the
// workers trained on meanwhile and reattach to it (docs/runtime.md
// "Control plane failover").
core::Status restartCoordinator(Launch& l, Attempt& a) {
  ARCH_ASSIGN_OR_RETURN(auto restarted, a.coord->poll());
  if (!restarted) return core::okStatus();
  ARCH_LOG_WARN("coordinator (pid {}) {}; started again as pid {} on {} in {:.2f} s; the workers reattach",
                restarted->old_pid, restarted->why, restarted->new_pid, a.coord_addr, restarted->seconds);
  l.events.write(report::EventRecord{
      .event = "coordinator_restart", .step = l.progress.lastStep(),
      .detail = fmt::format("coordinator pid {} {}; pid {} listens on {} again after {:.2f} s", restarted->old_pid,
                            restarted->why, restarted->new_pid, a.coord_addr, restarted->seconds),
      .pid = restarted->new_pid});
  writeWorkersJson(l, a);
  return core::okStatus();
}

// Watches the attempt's workers until none runs. Errors: a replacement
// could not be started, or the coordinator could not be started again.
core::Status superviseWorkers(Launch& l, Attempt& a) {
  while (true) {
    ARCH_RETURN_IF_ERROR(restartCoordinator(l, a));
    int alive = 0;
    const std::vector<int> to_replace = reapWorkers(l, a, alive);
    ARCH_RETURN_IF_ERROR(replaceWorkers(l, a, to_replace, alive));
    fenceFailedWorkers(a);
    stopLateJoiners(l, a);
    if (alive == 0) break;
    if (!l.failure.isOk() || a.restart) stopWorkers(l, a);
    forwardInterrupts(l, a);
    printProgress(l);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return core::okStatus();
}

// ---- coordinator + workers ----
// Runs one attempt to its end; returns whether its workers asked for a
// restart (the job's failure, if any, is in l.failure).
core::Result<bool> runAttempt(Launch& l, int attempt) {
  const LaunchOptions& opt = l.opt;
  Attempt a;
  a.index = attempt;
  a.resume = opt.resume || (attempt > 0 && latestValidCheckpoint(l.run_dir).isOk());
  a.secret = randomSecret();
  CoordinatorProcess::Options co;
  co.failure_timeout = l.job.strategy.failure_timeout;
  co.secret = a.secret;
  a.coord_tls = co.tls = coordinatorTlsOf(l.job);
  co.log = (fs::path(l.run_dir) / "logs" / "coordinator.log").string();
  co.port_file = (fs::path(l.run_dir) / "coordinator.port").string();
  a.coord = std::make_unique<CoordinatorProcess>(co);
  ARCH_RETURN_IF_ERROR(a.coord->start());
  a.coord_addr = a.coord->address();
  ARCH_LOG_INFO("job '{}': {} workers in {} islands; coordinator at {}; run dir {}{}", l.job.cluster.name, l.world,
                l.job.cluster.islands.size(), a.coord_addr, l.run_dir,
                attempt > 0 ? fmt::format(" (restart {} of {})", attempt, opt.max_restarts) : "");
  for (const auto& w : l.workers) ARCH_RETURN_IF_ERROR(spawnWorker(l, a, w.rank, false));
  l.failure = core::okStatus();
  const core::Status st = superviseWorkers(l, a);
  a.watch.reset();
  a.coord->stop();
  ARCH_RETURN_IF_ERROR(st);
  return a.restart;
}

// Whether the job starts another attempt (and says so in the log and the
// metrics); when --max-restarts are used up, the failure says why.
bool restartAfter(Launch& l, int attempt, bool restart) {
  const LaunchOptions& opt = l.opt;
  if (l.forwarded > 0 || (l.failure.isOk() && !restart)) return false;
  if (attempt >= opt.max_restarts) {
    if (l.failure.isOk()) {
      l.failure = core::unavailable("the job stopped (too few workers or no coordinator) and the " +
                                    std::to_string(opt.max_restarts) + " restart(s) allowed by --max-restarts are used up");
    }
    return false;
  }
  const auto latest = latestValidCheckpoint(l.run_dir);
  const std::string from = latest.isOk() ? *latest : std::string("the beginning (no valid checkpoint)");
  ARCH_LOG_WARN("restarting the job from {} ({} of {} restarts)", from, attempt + 1, opt.max_restarts);
  l.events.write(report::EventRecord{
      .event = "restart", .step = l.progress.lastStep(),
      .detail = fmt::format("restart {} of {} from {}{}", attempt + 1, opt.max_restarts, from,
                            l.failure.isOk() ? "" : ": " + l.failure.message().substr(0, 200))});
  return true;
}

// After Ctrl-C: which checkpoint a --resume continues from, said only once
// it verified on disk (a second Ctrl-C kills the workers, maybe before
// they wrote one).
core::Status interrupted(const Launch& l) {
  const std::string what = "interrupted after step " + std::to_string(l.progress.lastStep());
  const auto latest = latestValidCheckpoint(l.run_dir);
  if (!latest.isOk()) {
    return core::aborted(what + "; no valid checkpoint is on disk (the workers stopped before writing one), so "
                                "`--resume` has nothing to continue from: run the job again from the start");
  }
  return core::aborted(what + "; the newest valid checkpoint on disk is " + fs::path(*latest).filename().string() +
                       " (verified): continue from it with `archipelago train " + l.opt.job_path + " --resume`");
}

// The last progress line, the terminal's handlers back, the merged trace and
// the launch's outcome.
core::Status finishLaunch(Launch& l, const struct sigaction& old_int, const struct sigaction& old_term) {
  l.progress.poll();
  if (l.opt.progress && (l.tty || l.progress.line() != l.last_line)) {
    std::fprintf(stderr, l.tty ? "\r\033[K%s\n" : "%s\n", l.progress.line().c_str());
  }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);

  std::vector<std::string> traces;
  for (int r = 0; r < l.world; ++r) {
    traces.push_back((fs::path(l.run_dir) / "trace" / ("rank" + std::to_string(r) + ".json")).string());
  }
  // The merged trace is a diagnostic: a run that trained is not failed for it.
  if (const core::Status st = TraceRecorder::merge(traces, (fs::path(l.run_dir) / "trace.json").string()); !st.isOk()) {
    ARCH_LOG_WARN("trace.json not written: {}", st.message());
  }
  if (!l.failure.isOk()) return l.failure;
  if (l.forwarded > 0) return interrupted(l);
  ARCH_LOG_INFO("run finished in {:.1f}s; run dir {}", core::secondsSince(l.t0), l.run_dir);
  return core::okStatus();
}

}  // namespace

core::Status launchTraining(const LaunchOptions& opt) {
  ARCH_ASSIGN_OR_RETURN(auto loaded, core::loadJob(opt.job_path, opt.load));
  core::JobConfig job = loaded.job;
  auto workers = workersOf(job);
  // Every worker runs here: refuse what cannot, before anything is written.
  ARCH_RETURN_IF_ERROR(plan::checkFitsHost(job, static_cast<int64_t>(workers.size()), plan::thisHost())
                           .status()
                           .withContext("job '" + opt.job_path + "'"));
  // Owned here so that the cgroups go on every way out, a failed job's too.
  ARCH_ASSIGN_OR_RETURN(const std::unique_ptr<CpuQuotaGroup> quota, cpuQuotaForWorkers(workers));
  // Credentials the job names must be usable before anything is written.
  if (!job.security.credentials.empty()) ARCH_RETURN_IF_ERROR(checkSecurity(job));
  ARCH_RETURN_IF_ERROR(prepareRunDir(opt, job));
  ARCH_RETURN_IF_ERROR(provideCredentials(job));  // before job.yaml: the workers read the directory from it
  const std::string job_file = (fs::path(job.run_dir) / "job.yaml").string();
  ARCH_RETURN_IF_ERROR(core::writeFileAtomic(job_file, core::dumpJobYaml(job)));
  ARCH_RETURN_IF_ERROR(writeRunJson(opt, job, workers));

  struct sigaction old_int {}, old_term {};
  installInterruptHandlers(old_int, old_term);
  logEmulation(job, workers);
  Launch l(opt, job, std::move(workers), job_file, quota.get());
  // The launcher's own events (replace, restart); the workers open the file themselves.
  if (const core::Status st = l.events.open((fs::path(l.run_dir) / "metrics.jsonl").string()); !st.isOk()) {
    ARCH_LOG_WARN("launcher events not written: {}", st.message());
  }
  for (int attempt = 0;; ++attempt) {
    ARCH_ASSIGN_OR_RETURN(const bool restart, runAttempt(l, attempt));
    if (!restartAfter(l, attempt, restart)) break;
  }
  return finishLaunch(l, old_int, old_term);
}

}  // namespace archipelago::runtime
