#include "archipelago/runtime/dp_comm.h"

#include <algorithm>

namespace archipelago::runtime {
namespace {
class DoneReduce final : public PendingReduce {
 public:
  core::Status wait() override { return core::okStatus(); }
};
}  // namespace

std::unique_ptr<PendingReduce> LocalDp::allreduceSumAsync(std::span<float>) {
  return std::make_unique<DoneReduce>();
}

core::Status LocalDp::allgather(std::span<const double> mine, std::span<double> all) {
  if (all.size() != mine.size()) return core::invalidArgument("allgather: output size must equal input size for one rank");
  std::copy(mine.begin(), mine.end(), all.begin());
  return core::okStatus();
}

}  // namespace archipelago::runtime
