#include "archipelago/comm/link_emulator.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <thread>

#include "archipelago/core/units.h"

namespace archipelago::comm {

std::string LinkParams::describe() const {
  std::string s = bandwidth > 0 ? core::formatBandwidth(bandwidth) : std::string("unlimited");
  s += ", latency " + core::formatDuration(latency);
  if (jitter > 0) s += ", jitter " + core::formatDuration(jitter);
  if (loss > 0) s += ", loss " + std::to_string(loss);
  if (tls) s += ", TLS";
  return s;
}

LinkParams linkParamsFromStrait(const core::StraitSpec& s) {
  LinkParams p;
  p.bandwidth = s.bandwidth;
  p.latency = s.latency;
  p.jitter = s.jitter;
  p.loss = s.loss;
  p.tls = s.tls;
  return p;
}

LinkShaper::LinkShaper(LinkParams params, const std::string& shared_name, uint64_t seed)
    : params_(params), rng_(seed) {
  if (!shared_name.empty()) {
    int fd = ::shm_open(shared_name.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd >= 0) {
      if (::ftruncate(fd, 64) == 0) {
        void* p = ::mmap(nullptr, 64, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) shared_ = static_cast<std::atomic<int64_t>*>(p);
      }
      ::close(fd);
    }
  }
}

LinkShaper::~LinkShaper() {
  if (shared_) ::munmap(shared_, 64);
}

static int64_t nowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(core::Clock::now().time_since_epoch()).count();
}

void sleepUntilMicros(int64_t at, const core::AbortFlag* abort) {
  while (true) {
    int64_t now = core::nowMicros();
    if (now >= at) return;
    if (abort && abort->aborted()) return;
    std::this_thread::sleep_for(std::chrono::microseconds(std::min<int64_t>(at - now, 20000)));
  }
}

// Test hook of the chaos tests: while the file named by
// ARCHIPELAGO_TEST_STRAIT_DOWN_FILE exists, every emulated strait is down:
// data frames wait (as TCP would retransmit into a black hole) and flow again
// when it is removed. Costs nothing when the variable is unset.
static void waitWhileStraitDown(const core::AbortFlag* abort) {
  static const char* path = std::getenv("ARCHIPELAGO_TEST_STRAIT_DOWN_FILE");
  if (!path || !*path) return;
  while (::access(path, F_OK) == 0 && !(abort && abort->aborted())) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

int64_t LinkShaper::send(size_t bytes, int64_t stream_last, const core::AbortFlag* abort) {
  waitWhileStraitDown(abort);
  int64_t done_ns = nowNanos();
  if (params_.bandwidth > 0) {
    const int64_t cost = static_cast<int64_t>(static_cast<double>(bytes) / params_.bandwidth * 1e9);
    // A small burst allowance: the link may have been idle up to 1 ms ago.
    const int64_t burst_ns = 1000000;
    std::atomic<int64_t>& free_at = shared_ ? *shared_ : local_;
    int64_t now = nowNanos();
    int64_t cur = free_at.load();
    int64_t start, end;
    do {
      start = std::max(cur, now - burst_ns);
      end = start + cost;
    } while (!free_at.compare_exchange_weak(cur, end));
    done_ns = end;
    sleepUntilMicros(end / 1000, abort);
  }
  double extra = params_.latency;
  if (params_.jitter > 0 || params_.loss > 0) {
    std::lock_guard<std::mutex> lock(rng_mu_);
    if (params_.jitter > 0) extra += std::uniform_real_distribution<double>(-params_.jitter, params_.jitter)(rng_);
    if (params_.loss > 0 && std::uniform_real_distribution<double>(0, 1)(rng_) < params_.loss) {
      extra += std::max(0.2, 2 * params_.latency);
    }
  }
  int64_t deliver = done_ns / 1000 + static_cast<int64_t>(std::max(0.0, extra) * 1e6);
  return std::max(deliver, stream_last);
}

}  // namespace archipelago::comm
