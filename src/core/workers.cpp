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
      w.torch_device = is.torch_device;
      if (!is.dtype.empty()) w.dtype = is.dtype;
      if (is.threads > 0) w.threads = is.threads;
      w.cpu_quota = is.cpu_quota;
      out.push_back(w);
    }
  }
  return out;
}

std::vector<WorkerInfo> workersOf(const JobConfig& job) {
  auto out = workersOf(job.cluster);
  for (size_t r = 0; r < out.size(); ++r) {
    const auto& is = job.cluster.islands[static_cast<size_t>(out[r].island_index)];
    if (is.dtype.empty()) out[r].dtype = job.model.dtype;
    if (is.threads <= 0) out[r].threads = job.train.threads_per_worker;
  }
  return out;
}

}  // namespace archipelago::core
