// The training loop of one worker, for every layout (docs/runtime.md "The
// loop"; parallelism as parts: docs/parallelism.md "Parts").
//
// Every step: this rank (or its pipeline) takes its share of the global
// batch (shares are integers summing to train.global_batch, proportional to
// measured speed), runs forward/backward with the loss scaled by (its
// tokens / the inner group's tokens), so that summing gradients over the
// ranks holding a tensor gives exactly the gradient of the single-process
// big-batch loss; gradient buckets are summed while backward still runs
// where nothing else talks during backward; then every rank clips by the
// same global norm and applies the same AdamW update, so replicas stay
// identical without broadcasting weights.
//
// With an ElasticSession (worker processes) a step interrupted by a failure
// is rolled back to the in-memory copy taken before it and retried in the
// next membership epoch; joiners receive the live state from a peer
// (docs/runtime.md "Failures and elasticity"). Layouts that split the model
// (pipeline stages, expert groups) restart from the newest checkpoint
// instead (docs/parallelism.md "Failures").
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/core/workers.h"
#include "archipelago/runtime/dp_comm.h"

namespace archipelago::comm {
class Group;
}

namespace archipelago::runtime {

class ElasticSession;

// The rank list lives in core (the planner derives it too).
using core::WorkerInfo;
using core::workersOf;

struct TrainerOptions {
  core::JobConfig job;
  std::string run_dir;
  int rank = 0;
  bool resume = false;                    // continue from the newest valid checkpoint
  DpComm* dp = nullptr;                   // world; null: single process (LocalDp)
  // Gradient group of the inner steps when the strategy is not sync (the
  // rank's island); null = the world. inner_ranks: its global ranks.
  DpComm* inner = nullptr;
  std::vector<int> inner_ranks;
  std::shared_ptr<comm::Group> world_group;  // for strategies (DiLoCo, streaming)
  std::string host = "127.0.0.1";         // this worker's advertised address (a native island backend binds there)
  // Elastic membership (worker processes): when set, dp/inner/world_group
  // are ignored and come from the session's current epoch; a failed step is
  // abandoned and retried after the survivors moved to the next epoch, and
  // joiners receive the live state (docs/runtime.md "Failures and elasticity").
  ElasticSession* elastic = nullptr;
  std::atomic<bool>* stop = nullptr;      // set by a signal handler: stop at the next step boundary
  int64_t exit_after_step = -1;           // test hook: _exit(3) right after this step (a crash)
  bool write_metrics = true;
};

struct TrainSummary {
  int64_t first_step = 0;
  int64_t steps_done = 0;   // last completed step count
  double final_loss = 0;
  double final_val_loss = -1;
  double wall_s = 0;
  double mean_step_s = 0;       // measured, excluding the first step
  double predicted_step_s = 0;  // the planner's prediction (rank 0; 0 if none)
  std::vector<double> losses;  // per completed step, global mean loss
  bool stopped_early = false;
  std::string replica_digest;  // sha256 of the final parameters (elastic runs)
};

core::Result<TrainSummary> runTrainer(const TrainerOptions& options);

}  // namespace archipelago::runtime
