// Userspace emulation of a strait (a slow link between two islands) for
// single-machine runs, tests and benchmarks. EMULATION ONLY: it shapes what
// our own transport sends; it does not touch the kernel or the real network.
//
// Model, per direction of a strait:
//  - bandwidth: a token bucket in virtual time. Each frame reserves the
//    interval [start, start + bytes/rate) on the link's timeline, where start =
//    max(now, end of the previous reservation) (so a burst of at most
//    `burst_bytes` may go at once). The sender sleeps until its frame has been
//    "serialised". The timeline lives in a small shared-memory segment named
//    after the job and strait, so every process on this machine that sends
//    across the same strait in the same direction shares the bandwidth, as on
//    a real link (falls back to a per-process timeline if shm is unavailable).
//  - latency: the frame is stamped with deliver_at = serialised + latency
//    (+ uniform jitter, clamped so frames on one stream stay in order); the
//    receiver holds it until then (a delay queue, in effect). CLOCK_MONOTONIC
//    is shared by all processes on one machine, so no clock sync is needed.
//  - loss: TCP is reliable, so a lost segment shows up as a retransmission
//    delay: with probability `loss` a frame is delayed by an extra
//    retransmit timeout (max(200 ms, 2 x latency) like Linux's minimum RTO).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <string>

#include "archipelago/core/clock.h"
#include "archipelago/core/config.h"

namespace archipelago::comm {

struct LinkParams {
  double bandwidth = 0;  // bytes/s; 0 = unlimited
  double latency = 0;    // seconds one way
  double jitter = 0;     // seconds, uniform +-
  double loss = 0;       // probability per frame of a retransmission delay
  bool tls = false;
  // One-line human description, e.g. "1 Gbit/s, 20 ms, jitter 0 s, loss 0".
  std::string describe() const;
};

LinkParams linkParamsFromStrait(const core::StraitSpec& s);

// Shapes one direction of one strait. Thread-safe: all streams of all peers
// that cross this strait from this process share one LinkShaper.
class LinkShaper {
 public:
  // shared_name: a shm segment name ("/arch-<job>-<a>-<b>") shared by all
  // processes of the job; empty = per-process timeline.
  LinkShaper(LinkParams params, const std::string& shared_name, uint64_t seed);
  ~LinkShaper();
  LinkShaper(const LinkShaper&) = delete;
  LinkShaper& operator=(const LinkShaper&) = delete;

  // Reserves the link for `bytes`, sleeps until they are serialised (or the
  // abort flag is set), and returns the steady-clock microsecond at which
  // the receiver may deliver them. `stream_last` keeps one stream's frames in
  // order under jitter (pass the previous return value of the same stream).
  int64_t send(size_t bytes, int64_t stream_last, const core::AbortFlag* abort);
  const LinkParams& params() const { return params_; }
  bool sharedAcrossProcesses() const { return shared_ != nullptr; }

 private:
  LinkParams params_;
  std::atomic<int64_t>* shared_ = nullptr;  // virtual time (ns) when the link is next free
  std::atomic<int64_t> local_{0};
  std::mutex rng_mu_;
  std::mt19937_64 rng_;
};

// Sleeps until the steady-clock microsecond `at` (used by receivers).
void sleepUntilMicros(int64_t at, const core::AbortFlag* abort);

}  // namespace archipelago::comm
