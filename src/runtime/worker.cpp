#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/comm_dp.h"
#include "archipelago/runtime/launcher.h"
#include "archipelago/runtime/metrics.h"
#include "archipelago/runtime/trainer.h"

namespace archipelago::runtime {

namespace {
std::atomic<bool> g_stop{false};
void onStop(int) { g_stop.store(true); }
}  // namespace

core::Status runWorker(const WorkerOptions& opt) {
  core::LoadOptions lo;
  ARCH_ASSIGN_OR_RETURN(auto loaded, core::loadJob(opt.job_path, lo));
  core::JobConfig job = loaded.job;
  const std::string run_dir = opt.run_dir.empty() ? job.run_dir : opt.run_dir;
  const auto workers = workersOf(job.cluster);
  const int world = opt.world >= 0 ? opt.world : worldFromEnv();
  const int rank = opt.rank >= 0 ? opt.rank : rankFromEnv();
  if (world != static_cast<int>(workers.size())) {
    return core::invalidArgument("world size " + std::to_string(world) + " (from --world or WORLD_SIZE/SLURM_NTASKS) "
                                 "does not match the cluster spec's " + std::to_string(workers.size()) + " devices");
  }
  if (rank < 0 || rank >= world) {
    return core::invalidArgument("rank " + std::to_string(rank) + " is outside [0, " + std::to_string(world) +
                                 "); pass --rank or set RANK / SLURM_PROCID");
  }
  const auto& me = workers[static_cast<size_t>(rank)];
  core::setLogIdentity(me.island + "/" + std::to_string(me.local_index) + " r" + std::to_string(rank));

  struct sigaction sa {};
  sa.sa_handler = onStop;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  const char* secret_env = std::getenv("ARCHIPELAGO_SECRET");
  if (!secret_env || !*secret_env) {
    return core::invalidArgument("ARCHIPELAGO_SECRET is not set: every worker of a job needs the job's shared secret");
  }
  std::string coord = opt.coordinator;
  if (coord.empty()) {
    const char* a = std::getenv("MASTER_ADDR");
    const char* p = std::getenv("MASTER_PORT");
    if (a && p) coord = std::string(a) + ":" + p;
  }
  if (coord.empty()) return core::invalidArgument("no coordinator: pass --coordinator HOST:PORT or set MASTER_ADDR/MASTER_PORT");

  const auto connect_deadline = core::Deadline::afterSeconds(60);
  ARCH_ASSIGN_OR_RETURN(auto client, comm::CoordinatorClient::connect(coord, secret_env, rank, connect_deadline));

  comm::CommConfig cc;
  cc.rank = rank;
  cc.world = world;
  for (const auto& w : workers) cc.island_of_rank.push_back(w.island_index);
  cc.cluster = job.cluster;
  cc.secret = secret_env;
  cc.options.streams = static_cast<int>(job.strategy.streams);
  cc.options.heartbeat_timeout_s = job.strategy.failure_timeout;
  ARCH_ASSIGN_OR_RETURN(auto communicator, comm::Communicator::create(cc));
  ARCH_ASSIGN_OR_RETURN(uint32_t epoch, client->registerRank(rank, me.island_index, communicator->address(), connect_deadline));
  (void)epoch;
  ARCH_ASSIGN_OR_RETURN(auto members, client->waitForMembers(world, connect_deadline));
  ARCH_RETURN_IF_ERROR(communicator->connect(members.addresses, connect_deadline));
  client->startHeartbeats(0.5);
  if (rank == 0) {
    for (const auto& line : communicator->emulationSummary()) ARCH_LOG_INFO("{}", line);
  }

  const bool multi_island = job.cluster.islands.size() > 1;
  const bool hierarchical = job.strategy.allreduce == "hierarchical" || (job.strategy.allreduce == "auto" && multi_island);
  ARCH_ASSIGN_OR_RETURN(auto codec, comm::parseCodec(job.strategy.codec));
  // sync: gradients are summed over the world (hierarchically across
  // straits, through the codec). diloco/streaming: over the island only; the
  // outer sync crosses the straits every few steps.
  const bool per_island = job.strategy.kind != "sync";
  CommDp dp(communicator->world(), hierarchical && !per_island, per_island ? comm::CodecKind::kNone : codec, 0);
  std::unique_ptr<CommDp> inner;
  std::vector<int> inner_ranks;
  if (per_island) {
    ARCH_ASSIGN_OR_RETURN(auto island_group, communicator->world()->islandGroup());
    inner_ranks = island_group->ranks();
    inner = std::make_unique<CommDp>(island_group, false, comm::CodecKind::kNone, 0);
  }

  TrainerOptions to;
  to.job = job;
  to.run_dir = run_dir;
  to.rank = rank;
  to.resume = opt.resume;
  to.dp = &dp;
  to.inner = inner.get();
  to.inner_ranks = inner_ranks;
  to.world_group = communicator->world();
  to.stop = &g_stop;
  to.exit_after_step = opt.exit_after_step;
  auto summary = runTrainer(to);
  if (summary.isOk()) (void)client->leave(core::Deadline::afterSeconds(2));
  if (!summary.isOk()) {
    ARCH_LOG_ERROR("{}", summary.status().toString());
    return summary.status();
  }
  if (rank == 0) {
    MetricsSink sink;
    if (sink.open((std::filesystem::path(run_dir) / "metrics.jsonl").string()).isOk()) {
      sink.write({{"kind", "summary"}, {"steps", summary->steps_done}, {"first_step", summary->first_step},
                  {"wall_s", summary->wall_s}, {"final_loss", summary->final_loss},
                  {"final_val_loss", summary->final_val_loss}, {"measured_step_s", summary->mean_step_s},
                  {"predicted_step_s", summary->predicted_step_s},
                  {"stopped_early", summary->stopped_early}});
    }
    ARCH_LOG_INFO("done: {} steps, final loss {:.4f}, val {:.4f}, {:.3f}s/step", summary->steps_done,
                  summary->final_loss, summary->final_val_loss, summary->mean_step_s);
  }
  return core::okStatus();
}

core::Status runCoordinator(const CoordinatorOptions& opt) {
  const char* secret_env = std::getenv("ARCHIPELAGO_SECRET");
  if (!secret_env || !*secret_env) return core::invalidArgument("ARCHIPELAGO_SECRET is not set: the coordinator needs the job's shared secret");
  comm::CoordinatorOptions co;
  co.host = opt.host;
  co.port = opt.port;
  co.heartbeat_timeout_s = opt.failure_timeout;
  comm::CoordinatorServer server(secret_env, co);
  ARCH_RETURN_IF_ERROR(server.start());
  std::printf("coordinator listening on %s\n", server.address().c_str());
  std::fflush(stdout);
  struct sigaction sa {};
  sa.sa_handler = onStop;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  while (!g_stop.load()) ::usleep(100000);
  server.stop();
  return core::okStatus();
}

}  // namespace archipelago::runtime
