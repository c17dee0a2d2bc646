// What a listener says about connections it refused (a failed handshake: a
// wrong job secret, a stale epoch, a port scanner, a half-open TCP probe).
// Each line names the peer's address and the reason, a wrong secret as
// such; at most `burst` lines per `window_s` seconds, then one line that
// counts what was left out, so a misconfigured peer retrying in a loop
// cannot flood the log (it used to print one line per attempt).
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>

#include "archipelago/core/status.h"

namespace archipelago::comm {

class RefusalLog {
 public:
  using Sink = std::function<void(const std::string&)>;
  // `who`: the listener, as the lines name it ("comm rank 3", "coordinator").
  // The default sink is the warning log.
  explicit RefusalLog(std::string who, int burst = 5, double window_s = 60, Sink sink = {});

  // A refused connection from `peer`, `why` as the handshake said.
  void refused(const std::string& peer, const core::Status& why);
  // The same at `now_s` seconds on any monotonic clock (tests).
  void refusedAt(const std::string& peer, const core::Status& why, double now_s);
  int64_t total() const;

  // What a refusal means, for the log line: a wrong secret is named.
  static std::string reason(const core::Status& why);

 private:
  std::string who_;
  int burst_;
  double window_s_;
  Sink sink_;
  mutable std::mutex mu_;
  double window_start_ = -1;
  int in_window_ = 0;
  int64_t suppressed_ = 0;
  int64_t total_ = 0;
  std::string last_;  // the latest suppressed refusal, for the summary
};

}  // namespace archipelago::comm
