#include "archipelago/core/clock.h"

#include <algorithm>

namespace archipelago::core {

int64_t wallMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Duration Deadline::remaining(Duration cap) const {
  if (at_ == TimePoint::max()) return cap;
  auto now = Clock::now();
  if (now >= at_) return Duration::zero();
  return std::min(cap, at_ - now);
}

int Deadline::remainingMillisForPoll(int cap_ms) const {
  auto r = remaining(std::chrono::milliseconds(cap_ms));
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(r).count();
  if (ms == 0 && r > Duration::zero()) ms = 1;
  return static_cast<int>(ms);
}

}  // namespace archipelago::core
