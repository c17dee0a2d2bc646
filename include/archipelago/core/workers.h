// The ranks of a job, derived from its cluster spec: one rule for the
// launcher, the trainers, the elastic session and the planner's replay of a
// local run, so that rank r means the same device everywhere.
#pragma once

#include <string>
#include <vector>

#include "archipelago/core/config.h"

namespace archipelago::core {

struct WorkerInfo {
  int rank = 0;
  std::string island;
  int island_index = 0;
  int local_index = 0;     // index inside the island
  std::string device = "cpu";
  double slowdown = 1.0;   // EMULATION factor (IslandSpec::slowdownOf)
  std::string torch_device = "auto";  // IslandSpec::torch_device
  std::string dtype = "fp32";         // compute dtype: the island's, else model.dtype
  int64_t threads = 1;                // intra-op threads: the island's, else train.threads_per_worker
  double cpu_quota = 0;               // share of one core (0 = no cap)
};

// Ranks in island order (island 0's devices, then island 1's, ...). With
// the job, dtype and threads fall back to model.dtype and
// train.threads_per_worker; without it to fp32 and 1.
std::vector<WorkerInfo> workersOf(const ClusterSpec& cluster);
std::vector<WorkerInfo> workersOf(const JobConfig& job);

}  // namespace archipelago::core
