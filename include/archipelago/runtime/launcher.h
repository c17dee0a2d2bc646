// Process roles of a training job (DESIGN.md "Process model"):
//  - launchTraining: the embedded default launcher (`archipelago train`):
//    validates the job, prepares data if needed, writes the run directory,
//    runs the coordinator in-process, starts one worker process per device
//    of the cluster spec, shows a live progress line, stops everything
//    cleanly on Ctrl-C, and merges traces at the end.
//  - runWorker: one worker (`archipelago worker`), started by the launcher
//    or by Slurm / Kubernetes / mpirun (rank and world from their usual
//    environment variables when not given).
//  - runCoordinator: the coordinator alone (`archipelago coordinator`).
#pragma once

#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime {

struct LaunchOptions {
  std::string job_path;
  core::LoadOptions load;
  bool resume = false;         // continue the run in run_dir from its newest valid checkpoint
  std::string self_exe;        // path of the archipelago binary (for the worker processes)
  bool progress = true;        // live progress line on stderr
  int64_t exit_after_step = -1;  // test hook, passed to every worker
  int max_restarts = 0;        // restart the whole job from the newest valid checkpoint when it cannot go on
                               // (fewer than strategy.min_workers, coordinator lost, a worker error)
  int max_replacements = 8;    // a worker that dies (or is evicted) is replaced by a `worker --join` in its slot
};
core::Status launchTraining(const LaunchOptions& options);

struct WorkerOptions {
  std::string job_path;        // resolved job (RUN_DIR/job.yaml)
  std::string run_dir;         // default: the job's run_dir
  int rank = -1;               // -1: from the launcher's environment (runtime/launch_env.h)
  int world = -1;              // -1: from the launcher's environment, else the job's devices
  std::string coordinator;     // HOST:PORT; default MASTER_ADDR:MASTER_PORT
  std::string listen;          // override the island's listen / advertise (comm/address.h)
  std::string advertise;
  bool resume = false;
  bool join = false;           // enter a running job: take a failed slot (rank, or any with rank -1) and
                               // receive the live state from a peer
  int64_t exit_after_step = -1;
  int max_rejoins = 8;         // evicted (cut off past the failure timeout while the job went on): start again
                               // as `--join` in the same slot, at most this many times; 0 = exit for a launcher
  // Seconds to keep dialling a coordinator that does not answer (it may
  // start after its workers); < 0: max(10 s, 5 x strategy.failure_timeout),
  // the rule for unreachable peers. Progress is logged every 5 s.
  double wait_coordinator_s = -1;
};
// Exits the process with kExitEvicted / kExitRestartJob (elastic.h) when the
// job went on without this rank or must restart from a checkpoint; an
// evicted worker with rejoins left instead replaces itself (exec) with a
// joiner of its own slot.
core::Status runWorker(const WorkerOptions& options);

struct CoordinatorOptions {
  std::string host = "0.0.0.0";
  int port = 0;
  int world = 0;
  double failure_timeout = 0;  // 0: the job's strategy.failure_timeout, as the workers announce it
  std::string port_file;  // written (atomically) with the port once listening
  bool supervise = false;  // run it as a child and start it again on the same port when it dies
  // Credentials directory (`archipelago secrets init`): TLS required from
  // every worker (the job's security.tls); its `secret` is the job secret
  // when ARCHIPELAGO_SECRET(_FILE) is not set.
  std::string credentials;
};
core::Status runCoordinator(const CoordinatorOptions& options);

}  // namespace archipelago::runtime
