// Internal: forks N rank processes on this machine that rendezvous through a
// coordinator running in the parent (127.0.0.1, port 0), or in a process of
// its own that a test can kill -9 and restart (coordinator_process). Used by
// the multi-process tests (one shared fixture) and by `archipelago bench comm`.
// A rank may be placed in a network namespace (a "host" of the multi-host
// test bed, tests/netns/hosts.sh): it then listens on the address that
// routes to the coordinator, which must listen where every namespace
// reaches it (`coordinator.host`).
// Each child runs `fn` and reports a one-line result ("" = success) through
// a pipe, then _exit()s without running the parent's destructors.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "archipelago/comm/coordinator.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

// Shared memory visible to the parent and every child (timestamps, flags).
struct SharedBlock {
  std::atomic<int64_t> slot[64];
};

struct LocalRank {
  int rank = 0;
  int world = 1;
  std::string coordinator;  // "127.0.0.1:port"
  std::string secret;
  std::string listen;       // this rank's own address when in a network namespace, else ""
  SharedBlock* shared = nullptr;
};

struct RankOutcome {
  bool reported = false;
  std::string message;  // "" = success
  int exit_code = -1;
  int signal = 0;
};

// A coordinator in a forked process (LocalLaunchOptions::coordinator_process).
class LocalCoordinator {
 public:
  LocalCoordinator(std::string secret, CoordinatorOptions options) : secret_(std::move(secret)), options_(std::move(options)) {}
  ~LocalCoordinator() { kill(); }
  // Forks it (on options.port; 0 = any, then kept for restarts) and waits until it listens.
  core::Status start();
  void kill();  // SIGKILL and reap (the process is gone when this returns)
  bool running() const { return pid_ > 0; }
  int pid() const { return pid_; }
  int starts() const { return starts_; }
  std::string address() const;

 private:
  std::string secret_;
  CoordinatorOptions options_;
  int pid_ = -1;
  int starts_ = 0;
};

struct LocalLaunchOptions {
  int world = 2;
  std::string secret = "test-secret";
  double timeout_s = 60;
  // Ranks allowed to die or stall: once every other rank has finished they
  // are SIGKILLed instead of waited for.
  std::set<int> expendable;
  // Network namespace of each rank (names under /var/run/netns; "" = this
  // one); empty = every rank here.
  std::vector<std::string> netns;
  // The coordinator runs as a process of its own; on_poll (if set) is
  // called from the parent's wait loop, every few ms, to kill or restart it.
  bool coordinator_process = false;
  CoordinatorOptions coordinator;
  std::function<void(LocalCoordinator&, SharedBlock&)> on_poll;
};

using LocalRankFn = std::function<std::string(const LocalRank&)>;

core::Result<std::vector<RankOutcome>> launchLocal(const LocalLaunchOptions& options, const LocalRankFn& fn,
                                                   SharedBlock** shared_out = nullptr);

// Inside a child: creates a Communicator (listening on `r.listen` when set),
// registers with the coordinator, waits for the table and connects (the
// usual worker start-up).
struct ConnectedRank {
  std::unique_ptr<CoordinatorClient> client;
  std::unique_ptr<Communicator> comm;
  std::shared_ptr<Group> world;
};
core::Result<ConnectedRank> connectRank(const LocalRank& r, CommConfig config, const core::Deadline& deadline);

}  // namespace archipelago::comm
