// Elastic membership of one worker process (docs/runtime.md "Failures and
// elasticity"). An ElasticSession owns the worker's coordinator client and
// communicator and the groups the trainer uses in the current epoch (world,
// island, and the DpComm views of them). When a collective fails, or the
// coordinator publishes a newer epoch (a join), the trainer calls
// reconfigure(): it reports the failure, waits for the next epoch, meets the
// other members in the coordinator's enter-epoch barrier, rebuilds the
// transport over the alive ranks and recreates the groups. The trainer then
// agrees on the replica state (trainer.cpp, syncReplicas) and continues.
//
// Rank numbers are slots of the cluster spec (fixed for the job); a dead
// slot gets batch share 0 until a replacement joins into it.
//
// Threads: everything here runs on the trainer's thread, except the
// coordinator client's heartbeat thread (which only updates latestEpoch()).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "archipelago/comm/coordinator.h"
#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/dp_comm_group.h"

namespace archipelago::runtime {

// Exit codes of a worker that stops because of membership (the launcher
// acts on them): evicted = this rank was declared failed (stalled or cut
// off) while the job went on; it may rejoin as a replacement. below_min =
// fewer than strategy.min_workers remain or the coordinator is gone: the
// survivors checkpointed what they could and the job must restart.
inline constexpr int kExitEvicted = 75;
inline constexpr int kExitRestartJob = 76;

struct ElasticOptions {
  std::string coordinator;  // HOST:PORT, or HOST:PORT,HOST:PORT... (standbys)
  std::string secret;
  int rank = -1;            // slot; with join, -1 = any failed slot
  bool join = false;        // enter a running job (state comes from a peer)
  const core::JobConfig* job = nullptr;
  double connect_timeout_s = 60;
  // Override the island's listen / advertise (comm/address.h); empty: the island's.
  std::string listen, advertise;
};

class ElasticSession {
 public:
  // Connects to the coordinator, creates the communicator, registers (or
  // joins) and builds the first epoch's transport and groups.
  static core::Result<std::unique_ptr<ElasticSession>> start(const ElasticOptions& options);
  ~ElasticSession();

  int rank() const { return rank_; }
  int slots() const { return slots_; }  // ranks of the cluster spec
  uint32_t epoch() const { return membership_.epoch; }
  const comm::Membership& membership() const { return membership_; }
  const std::vector<int>& alive() const { return membership_.alive; }
  bool joined() const { return joined_; }  // this process entered a running job

  // Groups of the current epoch (replaced by reconfigure()).
  std::shared_ptr<comm::Group> worldGroup() const { return world_; }
  std::shared_ptr<comm::Group> innerGroup() const { return island_ ? island_ : world_; }
  GroupDp* dp() { return dp_.get(); }
  GroupDp* inner() { return inner_.get(); }  // null with strategy sync
  std::vector<int> innerRanks() const;

  // The coordinator published an epoch newer than ours (seen in heartbeat replies).
  bool newEpochPending() const { return client_->latestEpoch() > membership_.epoch; }
  // How long a membership change waits for a coordinator (a restarted or
  // standby one) before the job stops with a checkpoint. Training itself
  // goes on without one.
  double coordinatorTimeout() const;

  // Moves to the next epoch. `cause` is the failed collective's status (ok:
  // a planned change such as a join). Errors: kAborted when this rank was
  // declared failed (evicted() is then true), kFailedPrecondition below
  // strategy.min_workers (belowMinimum()), kUnavailable when no coordinator
  // answered for coordinatorTimeout() (while the change waited for one).
  core::Status reconfigure(const core::Status& cause);
  bool evicted() const { return evicted_; }
  bool belowMinimum() const { return below_min_; }

  // Seconds the last reconfigure() took, and when it learned of the failure
  // (for the recovery events).
  double lastReconfigureSeconds() const { return last_reconfigure_s_; }

  // Ends cleanly: the coordinator stops watching this rank.
  void leave();
  comm::Communicator& communicator() { return *comm_; }

 private:
  ElasticSession() = default;
  core::Status installGroups(std::shared_ptr<comm::Group> world);

  ElasticOptions opt_;
  core::JobConfig job_;
  int rank_ = -1;
  int slots_ = 0;
  bool joined_ = false;
  bool evicted_ = false;
  bool below_min_ = false;
  double last_reconfigure_s_ = 0;
  std::unique_ptr<comm::CoordinatorClient> client_;
  std::unique_ptr<comm::Communicator> comm_;
  comm::Membership membership_;
  std::shared_ptr<comm::Group> world_, island_;
  std::unique_ptr<GroupDp> dp_, inner_;
};

// The peer a failed collective names ("lost rank N ..."), or -1.
int suspectOf(const core::Status& st);

}  // namespace archipelago::runtime
