#include "archipelago/core/clock.h"

#include <sys/eventfd.h>
#include <unistd.h>

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

// ---- AbortFlag -------------------------------------------------------------------------

namespace {
void signalFd(int fd) {
  const uint64_t one = 1;
  // Nonblocking: a counter that is already readable needs nothing more.
  [[maybe_unused]] const ssize_t n = ::write(fd, &one, sizeof one);
}
}  // namespace

AbortFlag::State::~State() {
  const int fd = this->fd.load();
  if (fd >= 0) ::close(fd);
}

void AbortFlag::abort() {
  s_->flag.store(true, std::memory_order_seq_cst);
  const int fd = s_->fd.load(std::memory_order_seq_cst);
  if (fd >= 0) signalFd(fd);
}

void AbortFlag::reset() {
  s_->flag.store(false, std::memory_order_seq_cst);
  const int fd = s_->fd.load(std::memory_order_seq_cst);
  if (fd < 0) return;
  uint64_t drained = 0;
  [[maybe_unused]] const ssize_t n = ::read(fd, &drained, sizeof drained);
}

int AbortFlag::wakeFd() const {
  int fd = s_->fd.load(std::memory_order_seq_cst);
  if (fd >= 0) return fd;
  const int made = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (made < 0) return -1;
  int expected = -1;
  if (!s_->fd.compare_exchange_strong(expected, made, std::memory_order_seq_cst)) {
    ::close(made);  // another waiter made one first
    return expected;
  }
  // An abort() that read no descriptor came before the exchange, so its
  // flag store is visible here: signal on its behalf.
  if (s_->flag.load(std::memory_order_seq_cst)) signalFd(made);
  return made;
}

}  // namespace archipelago::core
