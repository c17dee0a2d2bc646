#include "archipelago/core/workers.h"

namespace archipelago::core {

std::vector<WorkerInfo> workersOf(const ClusterSpec& cluster) {
  std::vector<WorkerInfo> out;
  int rank = 0;
  for (size_t i = 0; i < cluster.islands.size(); ++i) {
    const auto& is = cluster.islands[i];
    for (int64_t k = 0; k < is.count; ++k) {
      WorkerInfo w;
      w.rank = rank++;
      w.island = is.name;
      w.island_index = static_cast<int>(i);
      w.local_index = static_cast<int>(k);
      w.device = is.device;
      w.slowdown = is.slowdownOf(k);
      out.push_back(w);
    }
  }
  return out;
}

}  // namespace archipelago::core
