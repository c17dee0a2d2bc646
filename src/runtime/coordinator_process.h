// The coordinator as a supervised child process (docs/runtime.md "Control
// plane failover"). `archipelago train` and `archipelago coordinator
// --supervise` run it this way: a coordinator that dies (kill -9, a crash)
// is started again on the same port; the workers reconnect and it rebuilds
// the membership from them (comm/coordinator.h "Failover"). The child is
// forked from the (single-threaded) supervisor without exec.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime {

// The server options of a coordinator on HOST:PORT whose failure timeout is
// `failure_timeout_s`; 0: the job's, as its workers announce it (a
// standalone coordinator does not read the job file).
// `tls`: the credentials every client must use TLS with ({}: plain).
comm::CoordinatorOptions coordinatorServerOptions(const std::string& host, int port, double failure_timeout_s,
                                                  const comm::TlsFiles& tls = {});

class CoordinatorProcess {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    int port = 0;                // 0: any, then kept for every restart
    double failure_timeout = 2;  // heartbeat timeout (also the recovery window); 0: the workers'

    std::string secret;          // passed as ARCHIPELAGO_SECRET
    comm::TlsFiles tls;          // {}: plain; else TLS required from every client
    std::string log;             // stdout + stderr of the coordinator (appended; empty: inherited)
    std::string port_file;       // where the child writes its port
  };
  // A restart poll() made.
  struct Restart {
    int old_pid = 0;
    int new_pid = 0;
    std::string why;   // "killed by signal 9", "exit 1"
    double seconds = 0;  // from noticing the death to listening again
  };

  explicit CoordinatorProcess(Options o) : o_(std::move(o)) {}
  ~CoordinatorProcess() { stop(); }
  // Starts it and waits (up to 30 s) until it listens.
  core::Status start();
  // Non-blocking: if it died, starts it again on the same port.
  core::Result<std::optional<Restart>> poll();
  // SIGTERM, then SIGKILL after 2 s.
  void stop();
  pid_t pid() const { return pid_; }
  int port() const { return o_.port; }
  std::string address() const;
  int restarts() const { return restarts_; }

 private:
  Options o_;
  pid_t pid_ = -1;
  int restarts_ = 0;
};

}  // namespace archipelago::runtime
