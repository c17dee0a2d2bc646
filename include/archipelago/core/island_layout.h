// Per-island layouts (docs/parallelism.md "Per-island layouts"): islands of
// different devices may run different tensor / pipeline parallelism in one
// job (island a TP=2, island b PP=2). An island names its own layout with
// cluster.islands[i].tensor_parallel / pipeline_stages / stage_layers; what
// it leaves out comes from strategy.*. As soon as one island names one,
// every island is a layout of its own: its pipelines and tensor-parallel
// groups stay inside it, and data parallelism across islands goes by
// tensor name (runtime/parallel/island_bridge.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "archipelago/core/config.h"

namespace archipelago::core {

struct IslandLayoutSpec {
  int64_t tensor_parallel = 1;
  int64_t pipeline_stages = 1;
  std::vector<int64_t> stage_layers;  // empty: from the devices' speed and memory
};

// Whether some island names a layout of its own.
bool perIslandLayouts(const JobConfig& job);
// Island `island`'s effective layout (the strategy's where it names none).
IslandLayoutSpec islandLayoutOf(const JobConfig& job, size_t island);
// The job cuts the model over ranks somewhere: pipeline stages, expert
// groups, tensor-parallel slices, or per-island layouts. Such a job runs one
// process per worker and restarts from a checkpoint instead of shrinking.
bool splitsModel(const JobConfig& job);
// "a: tp=2 pp=1; b: tp=1 pp=2 [3,1]" for logs and notes.
std::string describeIslandLayouts(const JobConfig& job);

}  // namespace archipelago::core
