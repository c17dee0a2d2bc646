#include "comm/refusal_log.h"

#include <fmt/format.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"

namespace archipelago::comm {

RefusalLog::RefusalLog(std::string who, int burst, double window_s, Sink sink)
    : who_(std::move(who)), burst_(burst), window_s_(window_s), sink_(std::move(sink)) {
  if (!sink_) sink_ = [](const std::string& line) { ARCH_LOG_WARN("{}", line); };
}

std::string RefusalLog::reason(const core::Status& why) {
  // Only the MAC check (wire.cpp verifyClient) speaks of the secret; a
  // refused certificate or a plain client on a TLS link says so itself.
  if (why.code() == core::StatusCode::kPermissionDenied &&
      why.message().find("failed authentication") != std::string::npos) {
    return "wrong job secret (its handshake MAC does not match ours: a worker of another job, or a stale "
           "ARCHIPELAGO_SECRET): " + why.message();
  }
  return why.toString();
}

void RefusalLog::refused(const std::string& peer, const core::Status& why) {
  refusedAt(peer, why, std::chrono::duration<double>(core::Clock::now().time_since_epoch()).count());
}

void RefusalLog::refusedAt(const std::string& peer, const core::Status& why, double now_s) {
  std::string line, summary;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++total_;
    if (window_start_ < 0 || now_s - window_start_ >= window_s_) {
      if (suppressed_ > 0) {
        summary = fmt::format("{}: {} more connection(s) refused in the last {:.0f} s, not shown (latest: {})", who_,
                              suppressed_, now_s - window_start_, last_);
      }
      window_start_ = now_s;
      in_window_ = 0;
      suppressed_ = 0;
    }
    const std::string what = fmt::format("from {}: {}", peer, reason(why));
    if (in_window_ < burst_) {
      ++in_window_;
      line = fmt::format("{}: refused a connection {}{}", who_, what,
                         in_window_ == burst_ ? fmt::format(" (further refusals in the next {:.0f} s are counted, not shown)", window_s_) : "");
    } else {
      ++suppressed_;
      last_ = what;
    }
  }
  if (!summary.empty()) sink_(summary);
  if (!line.empty()) sink_(line);
}

int64_t RefusalLog::total() const {
  std::lock_guard<std::mutex> lock(mu_);
  return total_;
}

}  // namespace archipelago::comm
