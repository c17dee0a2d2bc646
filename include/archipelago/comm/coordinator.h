// Membership service of a job (DESIGN.md "Process model"): registrations,
// address exchange, heartbeats, the current epoch, a small key-value store
// and failure reports. It holds no tensors. The launcher runs a
// CoordinatorServer in-process (start()/stop()/port()); workers talk to it
// with a CoordinatorClient. Same framing and HMAC handshake as peer links
// (requests and replies are JSON payloads of kRequest/kReply frames).
//
// Epoch rules: the epoch starts at 0; reportFailure(failed, epoch) of the
// current epoch marks `failed` dead and publishes epoch+1 (reports for an
// older epoch are answered with the current state and change nothing, so N
// survivors reporting the same death bump the epoch once). A rank silent
// for heartbeat_timeout is treated the same way.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "archipelago/core/clock.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

class Socket;

struct Membership {
  uint32_t epoch = 0;
  std::vector<std::string> addresses;  // by rank ("" = never registered)
  std::vector<int> islands;            // by rank (-1 = unknown)
  std::vector<int> alive;              // ranks alive in this epoch, ascending
};

struct CoordinatorOptions {
  std::string host = "127.0.0.1";
  int port = 0;                      // 0 = any; port() tells the real one
  double heartbeat_timeout_s = 0;    // 0 = only explicit failure reports end a rank
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

 private:
  void acceptLoop();
  void serve(std::shared_ptr<Socket> sock);
  std::string handle(const std::string& request);
  void bumpEpochLocked(int dead, const std::string& why);

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
  // state (guarded by mu_)
  uint32_t epoch_ = 0;
  std::map<int, std::string> addresses_;
  std::map<int, int> islands_;
  std::map<int, bool> alive_;
  std::map<int, int64_t> last_heartbeat_us_;
  std::map<std::string, std::string> kv_;
};

// Thread-safe (one request at a time on one connection).
class CoordinatorClient {
 public:
  static core::Result<std::unique_ptr<CoordinatorClient>> connect(const std::string& address,
                                                                  const std::string& secret, int rank,
                                                                  const core::Deadline& deadline);
  ~CoordinatorClient();
  core::Result<uint32_t> registerRank(int rank, int island, const std::string& address,
                                      const core::Deadline& deadline);
  // Waits until `world` ranks have registered; returns the table.
  core::Result<Membership> waitForMembers(int world, const core::Deadline& deadline);
  core::Result<Membership> membership(const core::Deadline& deadline);
  core::Result<uint32_t> heartbeat(const core::Deadline& deadline);
  // Says this rank finished cleanly: its heartbeats stop without a failure.
  core::Status leave(const core::Deadline& deadline);
  // Reports that `failed` is gone in `epoch`; returns the membership after it.
  core::Result<Membership> reportFailure(int failed, uint32_t epoch, const core::Deadline& deadline);
  core::Status kvSet(const std::string& key, const std::string& value, const core::Deadline& deadline);
  // Waits until the key exists (or the deadline).
  core::Result<std::string> kvGet(const std::string& key, const core::Deadline& deadline);
  // Background heartbeats every interval (stops with the client).
  void startHeartbeats(double interval_s);

 private:
  CoordinatorClient() = default;
  core::Result<std::string> call(const std::string& request, const core::Deadline& deadline);
  std::unique_ptr<Socket> sock_;
  int rank_ = -1;
  std::mutex mu_;
  std::atomic<bool> stop_{false};
  std::thread hb_;
};

}  // namespace archipelago::comm
