// Whether a job's workers can run on this host at all, checked before
// anything starts (the launcher) and by `config check`: a model that
// cannot fit the memory, or more processes or sockets than the host's
// limits allow, is refused with the numbers, instead of failing minutes
// later inside libtorch's allocator or a fork.
//
// The bounds are lower bounds, so nothing that could run is refused:
// every replica of a tensor needs its fp32 weights and gradient (8 bytes per
// parameter), one full copy of the AdamW moments exists however they are
// sharded (8 bytes), and every worker process costs at least
// kWorkerProcessBytes (a worker of a 41k-parameter model measured 180-190
// MB resident: libtorch, its thread pools and our comm buffers).
#pragma once

#include <cstdint>
#include <string>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::plan {

inline constexpr double kWorkerProcessBytes = 150e6;
// Threads and sockets per worker, also lower bounds: its compute, comm and
// background threads (8-9 measured), and one stream to every peer.
inline constexpr int64_t kWorkerThreads = 8;

struct HostResources {
  double memory_bytes = 0;     // MemAvailable, capped by this cgroup's memory limit
  std::string memory_source;   // where memory_bytes came from ("MemAvailable", "cgroup memory.max")
  int64_t max_processes = 0;   // RLIMIT_NPROC soft limit; 0: unlimited
  int64_t max_open_files = 0;  // RLIMIT_NOFILE soft limit; 0: unlimited
};

// This machine's resources (Linux: /proc/meminfo, the cgroup v2 / v1
// memory limit, getrlimit).
HostResources thisHost();

struct HostFit {
  double parameters = 0;   // of the whole model
  double memory_lower_bytes = 0;
  int64_t local_workers = 0;
};

// `local_workers` of the job's workers run on a host with `host`'s
// resources. kResourceExhausted with the numbers and what to change.
core::Result<HostFit> checkFitsHost(const core::JobConfig& job, int64_t local_workers, const HostResources& host);

}  // namespace archipelago::plan
