#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "archipelago/comm/address.h"
#include "archipelago/comm/coordinator.h"
#include "archipelago/core/files.h"
#include "archipelago/core/host_memory.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/dp_comm_group.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/runtime/launch_env.h"
#include "archipelago/runtime/launcher.h"
#include "archipelago/runtime/placement.h"
#include "archipelago/report/metrics.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/coordinator_process.h"
#include "runtime/cpu_quota.h"
#include "runtime/security.h"

namespace archipelago::runtime {

namespace {
std::atomic<bool> g_stop{false};
void onStop(int) { g_stop.store(true); }

// SIGINT / SIGTERM: stop at the next step boundary (g_stop).
void installStopHandlers() {
  struct sigaction sa {};
  sa.sa_handler = onStop;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

void setLogIdentityOf(const std::vector<core::WorkerInfo>& workers, int rank) {
  const auto& me = workers[static_cast<size_t>(rank)];
  core::setLogIdentity(me.island + "/" + std::to_string(me.local_index) + " r" + std::to_string(rank));
}

// Rank and world size: --rank / --world, else the launcher's environment
// (launch_env.h), else (world only) the job's devices.
struct Placement {
  LaunchValue rank, world, local;
};

core::Result<Placement> placementOf(const WorkerOptions& opt, size_t devices) {
  Placement p;
  ARCH_ASSIGN_OR_RETURN(p.rank, rankFromEnv());
  ARCH_ASSIGN_OR_RETURN(p.world, worldFromEnv());
  ARCH_ASSIGN_OR_RETURN(p.local, localRankFromEnv());
  if (opt.rank >= 0) p.rank = {opt.rank, "--rank"};
  if (opt.world >= 0) p.world = {opt.world, "--world"};
  if (p.world.from.empty()) p.world = {static_cast<int>(devices), "the job's devices"};
  return p;
}

core::Status checkRankAndWorld(const Placement& p, size_t devices, bool join) {
  if (p.world.value != static_cast<int>(devices)) {
    return core::invalidArgument("world size " + std::to_string(p.world.value) + " (from " + p.world.from +
                                 ") does not match the cluster spec's " + std::to_string(devices) +
                                 " devices: start one worker per device of the job file");
  }
  if ((p.rank.value < 0 && !join) || p.rank.value >= p.world.value) {
    return core::invalidArgument("rank " + std::to_string(p.rank.value) +
                                 (p.rank.from.empty() ? "" : " (from " + p.rank.from + ")") + " is outside [0, " +
                                 std::to_string(p.world.value) +
                                 "); pass --rank or set RANK (Slurm, mpirun and Kubernetes set theirs)");
  }
  return core::okStatus();
}

void logPlacement(const Placement& p) {
  if (p.rank.value < 0) return;
  ARCH_LOG_INFO("rank {} of {} ({}, {}){}", p.rank.value, p.world.value, p.rank.from, p.world.from,
                p.local.from.empty() ? std::string()
                                     : fmt::format(", local rank {} ({})", p.local.value, p.local.from));
}

// --coordinator, else MASTER_ADDR:MASTER_PORT.
core::Result<std::string> coordinatorAddress(const WorkerOptions& opt) {
  std::string coord = opt.coordinator;
  if (coord.empty()) {
    const char* a = std::getenv("MASTER_ADDR");
    const char* p = std::getenv("MASTER_PORT");
    if (a && p) coord = std::string(a) + ":" + p;
  }
  if (coord.empty()) return core::invalidArgument("no coordinator: pass --coordinator HOST:PORT or set MASTER_ADDR/MASTER_PORT");
  return coord;
}

TrainerOptions trainerOptions(const core::JobConfig& job, const std::string& run_dir, const WorkerOptions& opt,
                              ElasticSession& session) {
  TrainerOptions to;
  to.job = job;
  to.run_dir = run_dir;
  to.rank = session.rank();
  to.resume = opt.resume;
  to.elastic = &session;
  // The epoch-0 groups, for trainers without elasticity (pipeline / expert
  // parallelism: a failure there stops the job; --max-restarts restarts it).
  to.dp = session.dp();
  to.inner = session.inner();
  to.inner_ranks = session.innerRanks();
  to.world_group = session.worldGroup();
  auto at = comm::splitHostPort(session.communicator().address());
  if (at.isOk()) to.host = at->first;
  to.stop = &g_stop;
  to.exit_after_step = opt.exit_after_step;
  return to;
}

// A worker cut off past the failure timeout (a partition) was evicted while
// the job went on. Without a launcher to replace it, it replaces itself:
// the same command as a joiner of its slot, which receives the live state
// from a peer. exec ends every thread of the session, blocked or not, and
// no connection of the old process survives into the new one.
[[noreturn]] void rejoinInPlace(const WorkerOptions& opt, int rank) {
  std::vector<std::string> args = {"/proc/self/exe", "worker", "--job", opt.job_path, "--rank", std::to_string(rank),
                                   "--join", "--max-rejoins", std::to_string(opt.max_rejoins - 1)};
  auto add = [&](const char* flag, const std::string& v) {
    if (!v.empty()) args.insert(args.end(), {flag, v});
  };
  add("--run-dir", opt.run_dir);
  add("--coordinator", opt.coordinator);
  add("--listen", opt.listen);
  add("--advertise", opt.advertise);
  if (opt.world >= 0) add("--world", std::to_string(opt.world));
  ARCH_LOG_WARN("evicted: the job went on without rank {} (cut off past the failure timeout); rejoining it ({} "
                "rejoin{} left)", rank, opt.max_rejoins - 1, opt.max_rejoins == 2 ? "" : "s");
  std::fflush(nullptr);
  ::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(argv[0], argv.data());
  ARCH_LOG_ERROR("evicted, and could not start again as a joiner: {}", std::strerror(errno));
  std::fflush(nullptr);
  std::_Exit(kExitEvicted);
}

// Exit codes the launcher acts on (elastic.h); threads of the session may
// still be blocked, so no destructors run: the worker's own cgroup
// (`quota`) is removed by hand first. Returns the failure otherwise.
core::Status exitForLauncher(const WorkerOptions& opt, const ElasticSession& session, const core::Status& failure,
                             std::unique_ptr<CpuQuotaGroup>& quota) {
  const bool restart_job = session.belowMinimum() || failure.code() == core::StatusCode::kUnavailable ||
                           failure.code() == core::StatusCode::kFailedPrecondition;
  if (session.evicted() || restart_job) quota.reset();  // a rejoin applies it again in the new image
  if (session.evicted()) {
    if (opt.max_rejoins > 0) rejoinInPlace(opt, session.rank());
    ARCH_LOG_ERROR("evicted: the job went on without rank {}; exiting for the launcher to replace it", session.rank());
    std::fflush(nullptr);
    std::_Exit(kExitEvicted);
  }
  if (restart_job) {
    std::fflush(nullptr);
    std::_Exit(kExitRestartJob);
  }
  return failure;
}

// The run's summary record (metrics.jsonl) and its last log line.
void reportSummary(const std::string& run_dir, const TrainSummary& summary) {
  report::MetricsSink sink;
  if (sink.open((std::filesystem::path(run_dir) / "metrics.jsonl").string()).isOk()) {
    // TrainSummary's "none" values (no prediction: 0, no evaluation: -1)
    // are left out rather than reported as numbers.
    const auto predicted = summary.predicted_step_s > 0 ? std::optional<double>(summary.predicted_step_s)
                                                        : std::nullopt;
    const auto val = summary.final_val_loss >= 0 ? std::optional<double>(summary.final_val_loss) : std::nullopt;
    sink.write(report::SummaryRecord{.steps = summary.steps_done, .first_step = summary.first_step,
                                     .wall_s = summary.wall_s, .final_loss = summary.final_loss,
                                     .final_val_loss = val, .predicted_step_s = predicted,
                                     .measured_step_s = summary.mean_step_s,
                                     .stopped_early = summary.stopped_early});
  }
  ARCH_LOG_INFO("done: {} steps, final loss {:.4f}, val {:.4f}, {:.3f}s/step", summary.steps_done,
                summary.final_loss, summary.final_val_loss, summary.mean_step_s);
}
}  // namespace

core::Status runWorker(const WorkerOptions& opt) {
  core::holdFreedMemory();  // before any thread allocates (core/host_memory.h)
  core::LoadOptions lo;
  ARCH_ASSIGN_OR_RETURN(auto loaded, core::loadJob(opt.job_path, lo));
  core::JobConfig job = loaded.job;
  const std::string run_dir = opt.run_dir.empty() ? job.run_dir : opt.run_dir;
  ARCH_RETURN_IF_ERROR(checkSecurity(job));  // before anything starts: a bad credentials directory stops here
  const auto workers = workersOf(job);  // with each island's dtype and threads resolved
  ARCH_ASSIGN_OR_RETURN(const Placement placement, placementOf(opt, workers.size()));
  ARCH_RETURN_IF_ERROR(checkRankAndWorld(placement, workers.size(), opt.join));
  const int rank = placement.rank.value;
  if (rank >= 0) setLogIdentityOf(workers, rank);
  logPlacement(placement);
  installStopHandlers();

  if (rank >= 0) {
    // Before registering: a worker whose device is missing must not start
    // the job half-way (the others would wait for it or go on without it).
    auto device = placeWorker(job, workers[static_cast<size_t>(rank)], job.train.check_ops);
    if (!device.isOk()) return device.status();
    ARCH_LOG_INFO("device {}", device->describe());
  }

  ARCH_ASSIGN_OR_RETURN(const std::string secret, jobSecret(job.security.credentials, "every worker of a job"));
  ARCH_ASSIGN_OR_RETURN(const std::string coord, coordinatorAddress(opt));

  // cpu_quota, before the worker computes (runtime/cpu_quota.h); a joiner
  // without a rank learns it from the coordinator first.
  std::unique_ptr<CpuQuotaGroup> quota;
  if (rank >= 0) {
    ARCH_ASSIGN_OR_RETURN(quota, applyOwnCpuQuota(workers[static_cast<size_t>(rank)]));
  }

  if (job.security.tls) {
    ARCH_LOG_INFO("TLS on every link, peers and coordinator (TLS 1.3, mutual, CA {})", tlsFilesOf(job).ca);
  }
  ElasticOptions eo;
  eo.coordinator = coord;
  eo.connect_timeout_s =
      opt.wait_coordinator_s >= 0 ? opt.wait_coordinator_s : std::max(10.0, 5 * job.strategy.failure_timeout);
  eo.listen = opt.listen;
  eo.advertise = opt.advertise;
  eo.secret = secret;
  eo.rank = rank;
  eo.join = opt.join;
  eo.job = &job;
  ARCH_ASSIGN_OR_RETURN(auto session, ElasticSession::start(eo));
  setLogIdentityOf(workers, session->rank());
  if (rank < 0) {
    ARCH_ASSIGN_OR_RETURN(quota, applyOwnCpuQuota(workers[static_cast<size_t>(session->rank())]));
  }
  if (session->rank() == 0) {
    for (const auto& line : session->communicator().emulationSummary()) ARCH_LOG_INFO("{}", line);
  }

  auto summary = runTrainer(trainerOptions(job, run_dir, opt, *session));
  if (!summary.isOk()) {
    ARCH_LOG_ERROR("{}", summary.status().toString());
    return exitForLauncher(opt, *session, summary.status(), quota);
  }
  session->leave();
  if (session->alive().empty() || session->alive().front() == session->rank()) reportSummary(run_dir, *summary);
  return core::okStatus();
}

// --supervise: the coordinator runs as a child, started again on the same
// port whenever it dies; the workers reattach to the new one.
core::Status superviseCoordinator(const CoordinatorOptions& opt, const std::string& secret, const comm::TlsFiles& tls) {
  CoordinatorProcess::Options po;
  po.tls = tls;
  po.host = opt.host;
  po.port = opt.port;
  po.failure_timeout = opt.failure_timeout;
  po.secret = secret;
  po.port_file = opt.port_file.empty()
                     ? (std::filesystem::temp_directory_path() / ("archipelago-coordinator-" + std::to_string(::getpid()) + ".port")).string()
                     : opt.port_file;
  CoordinatorProcess child(po);
  ARCH_RETURN_IF_ERROR(child.start());
  std::printf("coordinator listening on %s (supervised, pid %d)\n", child.address().c_str(), static_cast<int>(child.pid()));
  std::fflush(stdout);
  installStopHandlers();
  while (!g_stop.load()) {
    ARCH_ASSIGN_OR_RETURN(auto restarted, child.poll());
    if (restarted) {
      ARCH_LOG_WARN("coordinator (pid {}) {}; started again as pid {} on {} in {:.2f} s", restarted->old_pid,
                    restarted->why, restarted->new_pid, child.address(), restarted->seconds);
    }
    ::usleep(50000);
  }
  child.stop();
  std::error_code ec;
  if (opt.port_file.empty()) std::filesystem::remove(po.port_file, ec);  // ours, not the operator's
  return core::okStatus();
}

core::Status runCoordinator(const CoordinatorOptions& opt) {
  ARCH_ASSIGN_OR_RETURN(const std::string secret, jobSecret(opt.credentials, "the coordinator"));
  const comm::TlsFiles tls = opt.credentials.empty() ? comm::TlsFiles{} : comm::credentialFiles(opt.credentials);
  if (!tls.empty()) ARCH_RETURN_IF_ERROR(comm::checkCredentials(tls, "--credentials"));
  if (opt.supervise) return superviseCoordinator(opt, secret, tls);
  comm::CoordinatorServer server(secret, coordinatorServerOptions(opt.host, opt.port, opt.failure_timeout, tls));
  ARCH_RETURN_IF_ERROR(server.start());
  if (!opt.port_file.empty()) {
    ARCH_RETURN_IF_ERROR(core::writeFileAtomic(opt.port_file, std::to_string(server.port())).withContext("--port-file"));
  }
  std::printf("coordinator listening on %s\n", server.address().c_str());
  std::fflush(stdout);
  installStopHandlers();
  while (!g_stop.load()) ::usleep(100000);
  server.stop();
  return core::okStatus();
}

}  // namespace archipelago::runtime
