// Monotonic time, deadlines and the abort flag that every blocking call in
// Archipelago takes (STYLE.md: "Every blocking call takes a deadline and
// honours an abort flag").
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

namespace archipelago::core {

using Clock = std::chrono::steady_clock;
using Duration = Clock::duration;
using TimePoint = Clock::time_point;

inline double secondsSince(TimePoint t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
inline int64_t nowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch()).count();
}
// Wall-clock microseconds since the Unix epoch (for traces and logs that are
// compared across processes).
int64_t wallMicros();

// A point in time after which a wait gives up. Deadline::never() for waits
// that only the abort flag may end.
class Deadline {
 public:
  static Deadline never() { return Deadline(TimePoint::max()); }
  static Deadline after(Duration d) { return Deadline(Clock::now() + d); }
  static Deadline afterSeconds(double s) {
    return after(std::chrono::duration_cast<Duration>(std::chrono::duration<double>(s)));
  }
  explicit Deadline(TimePoint at) : at_(at) {}

  bool expired() const { return at_ != TimePoint::max() && Clock::now() >= at_; }
  TimePoint at() const { return at_; }
  bool isNever() const { return at_ == TimePoint::max(); }
  // Remaining time, clamped to [0, cap].
  Duration remaining(Duration cap = std::chrono::hours(24 * 365)) const;
  int remainingMillisForPoll(int cap_ms = 1000) const;

 private:
  TimePoint at_;
};

// Shared, sticky cancellation flag. Copies share the same flag.
class AbortFlag {
 public:
  AbortFlag() : flag_(std::make_shared<std::atomic<bool>>(false)) {}
  void abort() { flag_->store(true, std::memory_order_release); }
  bool aborted() const { return flag_->load(std::memory_order_acquire); }
  void reset() { flag_->store(false, std::memory_order_release); }

 private:
  std::shared_ptr<std::atomic<bool>> flag_;
};

}  // namespace archipelago::core
