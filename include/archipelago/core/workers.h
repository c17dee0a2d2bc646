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
};

// Ranks in island order (island 0's devices, then island 1's, ...).
std::vector<WorkerInfo> workersOf(const ClusterSpec& cluster);

}  // namespace archipelago::core
