// Membership service of a job (DESIGN.md "Process model"): registrations,
// address exchange, heartbeats, the current epoch, a small key-value store
// and failure reports. It holds no tensors. The launcher runs a
// CoordinatorServer in-process (start()/stop()/port()); workers talk to it
// with a CoordinatorClient. Same framing and HMAC handshake as peer links
// (requests and replies are JSON payloads of kRequest/kReply frames).
//
// The state machine (MembershipTable, no sockets, unit-tested on its own):
//
//   rank slot:  unknown --register--> alive --report/silence--> failed --join--> alive ...
//   (leave: a rank that finished cleanly stays alive but is no longer watched)
//
//  - The epoch starts at 0. Initial registrations do not change it.
//  - reportFailure(failed, epoch) of the CURRENT epoch marks `failed` dead and
//    publishes epoch+1. Reports naming an older epoch, or a rank already
//    dead, change nothing (N survivors reporting one death bump the epoch
//    once; a failure reported while the survivors are still rebuilding the
//    previous epoch names that epoch and is not lost: it bumps again).
//    failed = -1 is a transient fault (a corrupt frame, a rebuild that did
//    not complete): epoch+1 with the same members.
//  - A registered, alive rank silent for heartbeat_timeout is failed the
//    same way (a dead or stopped process; one bump per silent rank, so two
//    deaths at once give two bumps and the survivors go to the newest).
//  - join(rank) takes a failed slot, or the lowest such slot for
//    rank -1, marks it alive with its new address and publishes epoch+1. A
//    join for a slot still alive (a restarted process whose predecessor was
//    not detected yet) replaces it in that same bump.
//  - enterEpoch(e) is a barrier: it returns once every alive rank of epoch e
//    has entered e (all of them then build the epoch's transport at the same
//    time), or at once with the newer membership if the epoch moved on.
//
// Failover (docs/comm.md "Coordinator failover"): the coordinator keeps
// nothing on disk; the workers hold the truth. A client whose connection
// broke reconnects (to the same address, or the next of a comma-separated
// list) and first sends `reattach`: its rank, address, pid, the newest epoch
// it has heard of (seen) and the membership of the newest epoch it entered
// (its view). A table that knows the rank takes that as a heartbeat. An
// empty table (a restarted or standby coordinator) enters recovery:
//
//  - requests that read or change membership wait (or get "recovering")
//    while reattaches are collected;
//  - recovery ends once every alive rank of the newest view reattached and
//    nobody has seen a newer epoch than that view: the table is that view,
//    same epoch, nothing changes for the workers (their data plane never
//    stopped);
//  - or when the window (the heartbeat timeout) has passed: ranks alive in
//    the view that did not reattach are failed, and the epoch published is
//    max(view, seen) + 1, so no epoch a worker has seen is handed out again
//    with another membership, and an older view never replaces a newer one.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "archipelago/comm/tls.h"
#include "archipelago/core/clock.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

class RefusalLog;
class Socket;

struct Membership {
  uint32_t epoch = 0;
  std::vector<std::string> addresses;  // by rank ("" = never registered)
  std::vector<int> islands;            // by rank (-1 = unknown)
  std::vector<int64_t> pids;           // by rank: process id of the latest registration (0 = unknown)
  std::vector<int> alive;              // ranks alive in this epoch, ascending
  std::vector<int> failed;             // ranks declared failed (not rejoined), ascending
  bool isAlive(int rank) const;
};

// One membership change, as the coordinator logs it.
struct MembershipEvent {
  uint32_t epoch = 0;     // the epoch it published
  std::string kind;       // "failure" | "transient" | "join" | "recovery" (a restarted coordinator's table)
  int rank = -1;
  std::string why;
  int64_t time_us = 0;    // wall clock (core::wallMicros)
};

// What a reconnecting worker tells the coordinator (see "Failover" above).
struct Reattach {
  int rank = -1;
  int island = -1;
  std::string address;
  int64_t pid = 0;
  uint32_t seen = 0;        // newest epoch this worker has heard of
  bool has_view = false;    // false: registered but still starting (no membership yet)
  Membership view;          // membership of the newest epoch it entered
};

// The coordinator's state machine (see the header comment). Not
// thread-safe: the server guards it with its mutex. Times are passed in, so
// tests drive it without clocks or sockets.
class MembershipTable {
 public:
  enum class State { kUnknown, kAlive, kFailed };

  // recovery_window_s: how long a restarted coordinator waits for
  // reattaches (0: the heartbeat timeout, or 5 s without one).
  explicit MembershipTable(double heartbeat_timeout_s = 0, double recovery_window_s = 0);

  // Initial registration (no epoch change), or a re-registration of a
  // failed slot, which is a join.
  uint32_t registerRank(int rank, int island, const std::string& address, int64_t pid, int64_t now_us);
  // A new or restarted worker entering a running job; returns its rank.
  core::Result<int> join(int rank, int island, const std::string& address, int64_t pid, int64_t now_us);
  void heartbeat(int rank, int64_t now_us);
  void leave(int rank);
  // True if it published a new epoch.
  bool reportFailure(int failed, uint32_t epoch, int reporter, const std::string& why, int64_t now_us);
  // Fails every alive rank silent for longer than the timeout; returns them.
  std::vector<int> expire(int64_t now_us);
  // Marks `rank` as having entered `epoch` (the barrier of enterEpoch).
  void enter(int rank, uint32_t epoch);
  // Every alive rank has entered the current epoch.
  bool allEntered() const;
  // A worker reconnecting (see "Failover"); returns the epoch.
  uint32_t reattach(const Reattach& r, int64_t now_us);
  bool recovering() const { return recovering_; }
  // Ends recovery when it is complete or its window has passed; true if it ended now.
  bool settleRecovery(int64_t now_us);
  double recoverySeconds(int64_t now_us) const;

  // The heartbeat timeout (0: none). raiseTimeout takes a longer one (a
  // standalone coordinator learning the job's from its workers).
  double timeout() const { return timeout_s_; }
  void raiseTimeout(double s);

  uint32_t epoch() const { return epoch_; }
  int registered() const;  // slots ever registered
  State state(int rank) const;
  Membership snapshot() const;
  const std::vector<MembershipEvent>& events() const { return events_; }

 private:
  struct Slot {
    State state = State::kUnknown;
    std::string address;
    int island = -1;
    int64_t pid = 0;
    int64_t last_heartbeat_us = 0;
    bool watched = false;     // heartbeats expected
    uint32_t entered = 0;     // highest epoch entered + 1 (0 = none)
  };
  void bump(const std::string& kind, int rank, const std::string& why);
  // Marks a slot alive for a (re)started process: address, island, pid, fresh heartbeat.
  static void occupy(Slot& s, int island, const std::string& address, int64_t pid, int64_t now_us);

  // Recovery: the reattaches collected, the newest view among them.
  struct Recovery {
    int64_t since_us = 0;
    bool has_best = false;
    Membership best;
    uint32_t max_seen = 0;
    std::map<int, Reattach> members;
  };
  bool recoveryComplete() const;
  void finishRecovery(int64_t now_us);
  // The slots of rec_.best and of reattached ranks it does not know;
  // returns the ranks lost (alive in the view, not reattached) and added.
  std::pair<std::vector<int>, std::vector<int>> adoptView(int64_t now_us);

  double timeout_s_;
  double window_s_;
  bool window_is_timeout_;  // the window follows the timeout (none was given)
  bool recovering_ = false;
  Recovery rec_;
  uint32_t epoch_ = 0;
  std::map<int, Slot> slots_;
  std::vector<MembershipEvent> events_;
};

struct CoordinatorOptions {
  std::string host = "127.0.0.1";
  int port = 0;                      // 0 = any; port() tells the real one
  double heartbeat_timeout_s = 0;    // 0 = only explicit failure reports end a rank
  double recovery_window_s = 0;      // after a restart (see "Failover"); 0 = heartbeat_timeout_s
  // A standalone coordinator does not read the job: it takes the longest
  // failure_timeout its workers announce (register, join, reattach) when
  // that is longer than heartbeat_timeout_s.
  bool adopt_worker_timeout = false;
  // TLS credentials (archipelago/comm/tls.h); when set, every client must
  // use TLS with a certificate of the same CA.
  TlsFiles tls;
};

class CoordinatorServer {
 public:
  CoordinatorServer(std::string secret, CoordinatorOptions options = {});
  ~CoordinatorServer();
  core::Status start();
  void stop();
  int port() const { return port_; }
  std::string address() const;
  Membership membership() const;
  std::vector<MembershipEvent> events() const;
  // Test hook / operator action: declare `rank` failed now (as a report would).
  void declareFailed(int rank, const std::string& why);

 private:
  void acceptLoop();
  void serve(std::shared_ptr<Socket> sock);
  std::string handle(const std::string& request);
  // The one test seam: tests/fuzz/fuzz_coordinator_request.cpp calls
  // handle() directly, without sockets.
  friend class CoordinatorHandleForTesting;
  // Handlers of the requests that wait (mu_ held through `lock`, released
  // while waiting on cv_); each returns the JSON reply.
  // Waits until `world` ranks have registered; replies with the table.
  std::string waitMembers(int world, const core::Deadline& deadline, std::unique_lock<std::mutex>& lock);
  // Enters `rank` into epoch `epoch` and waits for every alive rank to enter it too.
  std::string enterAndWait(int rank, uint32_t epoch, const core::Deadline& deadline,
                         std::unique_lock<std::mutex>& lock);
  // Waits until `key` is set in the key-value store; replies with its value.
  std::string waitKey(const std::string& key, const core::Deadline& deadline, std::unique_lock<std::mutex>& lock);
  // The membership table as an "ok" reply (mu_ held).
  std::string stateReply() const;
  // While the table recovers: waits (at most 2 s of `deadline`); "" once
  // recovered, else the "recovering" reply to send.
  std::string waitRecovered(const core::Deadline& deadline, std::unique_lock<std::mutex>& lock);
  std::string handleReattach(const nlohmann::json& req);
  void adoptWorkerTimeout(const nlohmann::json& req);
  void monitorLoop();

  std::string secret_;
  CoordinatorOptions options_;
  int listen_fd_ = -1;
  int port_ = 0;
  core::AbortFlag stop_;
  std::thread accept_thread_, monitor_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> clients_;
  std::vector<std::shared_ptr<Socket>> sockets_;
  std::unique_ptr<RefusalLog> refusals_;
  // state (guarded by mu_)
  MembershipTable table_;
  std::map<std::string, std::string> kv_;
};

// Thread-safe (one request at a time on one connection). A broken
// connection is re-opened by the next request, to `address` or, when it is
// a comma-separated list (a standby), the first of its entries that
// answers; once registered, the client then reattaches (see "Failover")
// before the request, and a request whose connection broke is sent once more.
class CoordinatorClient {
 public:
  // `tls`: the job's credentials when the coordinator link is encrypted
  // (security.tls); empty: plain.
  static core::Result<std::unique_ptr<CoordinatorClient>> connect(const std::string& address,
                                                                  const std::string& secret, int rank,
                                                                  const core::Deadline& deadline,
                                                                  TlsFiles tls = {});
  ~CoordinatorClient();
  // The job's failure timeout, sent with register, join and reattach (a
  // standalone coordinator adopts it; see CoordinatorOptions). Before those.
  void announceFailureTimeout(double seconds) { failure_timeout_s_ = seconds; }
  core::Result<uint32_t> registerRank(int rank, int island, const std::string& address,
                                      const core::Deadline& deadline);
  // Enters a running job in slot `rank` (-1: any failed slot); returns the
  // slot and the epoch it published. The client then speaks for that rank.
  struct Joined {
    int rank = -1;
    uint32_t epoch = 0;
  };
  core::Result<Joined> join(int rank, int island, const std::string& address, const core::Deadline& deadline);
  // Waits until `world` ranks have registered; returns the table.
  core::Result<Membership> waitForMembers(int world, const core::Deadline& deadline);
  core::Result<Membership> membership(const core::Deadline& deadline);
  // Barrier of epoch `epoch` (see the header comment). The returned
  // membership's epoch is `epoch` when everyone entered, newer if it moved.
  core::Result<Membership> enterEpoch(uint32_t epoch, const core::Deadline& deadline);
  core::Result<uint32_t> heartbeat(const core::Deadline& deadline);
  // Says this rank finished cleanly: its heartbeats stop without a failure.
  core::Status leave(const core::Deadline& deadline);
  // Reports that `failed` is gone in `epoch` (-1: a transient fault, new
  // epoch with the same members); returns the membership after it.
  core::Result<Membership> reportFailure(int failed, uint32_t epoch, const core::Deadline& deadline,
                                         const std::string& why = "");
  core::Status kvSet(const std::string& key, const std::string& value, const core::Deadline& deadline);
  // Waits until the key exists (or the deadline).
  core::Result<std::string> kvGet(const std::string& key, const core::Deadline& deadline);
  // Background heartbeats every interval (stops with the client).
  void startHeartbeats(double interval_s);
  // Newest epoch any reply carried (heartbeats keep it fresh).
  uint32_t latestEpoch() const { return latest_epoch_.load(); }
  // Seconds since the coordinator last answered (0 before the first call).
  double secondsSinceContact() const;
  int rank() const { return rank_.load(); }
  // Connections re-opened after one broke (each one reattached).
  int reconnects() const { return reconnects_.load(); }

 private:
  CoordinatorClient() = default;
  // retry: send once more on a fresh connection if this one broke (not for join, which is not idempotent).
  core::Result<std::string> call(const std::string& request, const core::Deadline& deadline, bool retry = true);
  // A connection to the first coordinator address that answers, reattached when registered.
  core::Result<std::unique_ptr<Socket>> open(const core::Deadline& deadline);
  // The reattach request of this client ("" before it registered).
  std::string reattachRequest() const;
  // Records identity / view from a reply (register, join, enter, members).
  void remember(int island, const std::string& address);
  void rememberView(const Membership& m);
  std::unique_ptr<Socket> sock_;
  std::vector<std::string> addresses_;
  std::atomic<size_t> current_{0};  // index of the address last answered
  std::string secret_;
  TlsFiles tls_;
  mutable std::mutex id_mu_;  // guards the identity below (read by the heartbeat thread)
  bool registered_ = false;
  int island_ = -1;
  std::string my_address_;
  bool has_view_ = false;
  Membership view_;
  std::atomic<int> reconnects_{0};
  std::atomic<double> failure_timeout_s_{0};
  std::atomic<int> rank_{-1};
  std::mutex mu_;
  std::atomic<bool> stop_{false};
  std::atomic<uint32_t> latest_epoch_{0};
  std::atomic<int64_t> last_contact_us_{0};
  std::thread hb_;
};

}  // namespace archipelago::comm
