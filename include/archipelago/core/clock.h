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
//
// A thread that waits in poll() can watch wakeFd() beside its own file
// descriptors and wake the moment abort() is called, instead of polling the
// flag in slices: with thousands of idle connections (64 workers, four
// streams to every peer) slices of 50 ms are hundreds of thousands of
// wake-ups a second.
class AbortFlag {
 public:
  AbortFlag() : s_(std::make_shared<State>()) {}
  void abort();
  bool aborted() const { return s_->flag.load(std::memory_order_acquire); }
  void reset();
  // An eventfd that is readable from abort() until reset(), made on first
  // use (so the flags that nobody polls cost nothing); -1 if none can be
  // made, and then the caller polls in slices.
  int wakeFd() const;

 private:
  struct State {
    std::atomic<bool> flag{false};
    std::atomic<int> fd{-1};
    ~State();
  };
  std::shared_ptr<State> s_;
};

}  // namespace archipelago::core
