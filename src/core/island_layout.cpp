#include "archipelago/core/island_layout.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace archipelago::core {

bool perIslandLayouts(const JobConfig& job) {
  for (const auto& isl : job.cluster.islands) {
    if (isl.tensor_parallel != 0 || isl.pipeline_stages != 0 || !isl.stage_layers.empty()) return true;
  }
  return false;
}

IslandLayoutSpec islandLayoutOf(const JobConfig& job, size_t island) {
  const auto& s = job.strategy;
  IslandLayoutSpec out;
  out.tensor_parallel = s.tensor_parallel;
  out.pipeline_stages = s.pipeline_stages;
  if (island >= job.cluster.islands.size()) {
    out.stage_layers = s.stage_layers;
    return out;
  }
  const auto& isl = job.cluster.islands[island];
  if (isl.tensor_parallel != 0) out.tensor_parallel = isl.tensor_parallel;
  if (isl.pipeline_stages != 0) out.pipeline_stages = isl.pipeline_stages;
  if (!isl.stage_layers.empty()) {
    out.stage_layers = isl.stage_layers;
  } else if (out.pipeline_stages == s.pipeline_stages) {
    out.stage_layers = s.stage_layers;
  }
  return out;
}

bool splitsModel(const JobConfig& job) {
  const auto& s = job.strategy;
  return s.pipeline_stages > 1 || s.expert_parallel > 1 || s.tensor_parallel > 1 || perIslandLayouts(job);
}

std::string describeIslandLayouts(const JobConfig& job) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < job.cluster.islands.size(); ++i) {
    const IslandLayoutSpec l = islandLayoutOf(job, i);
    parts.push_back(fmt::format("{}: tp={} pp={}{}", job.cluster.islands[i].name, l.tensor_parallel, l.pipeline_stages,
                                l.stage_layers.empty() ? "" : fmt::format(" [{}]", fmt::join(l.stage_layers, ","))));
  }
  return fmt::format("{}", fmt::join(parts, "; "));
}

}  // namespace archipelago::core
