// The loop's rebalancer (docs/runtime.md "Heterogeneous data parallelism").
#pragma once

#include <cstdint>
#include <vector>

#include "archipelago/core/shares.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/dp_comm.h"

namespace archipelago::runtime::loop {

// Measures speed per rank and turns it into integer batch shares. Every rank
// runs the same computation on the same allgathered numbers, so all ranks
// agree on the shares without a leader.
class Rebalancer {
 public:
  // period_mean: outer-step strategies (core::SpeedEstimate).
  Rebalancer(int64_t interval, bool period_mean) : interval_(interval), mine_(period_mean) {}
  void observe(double compute_s, int64_t samples) { mine_.observe(compute_s, samples); }
  bool due(int64_t step) const { return interval_ > 0 && step > 0 && step % interval_ == 0; }
  // Shares by slot: the members of `dp` (the ranks `members`, in group
  // order) split the global batch; every other slot gets 0. `current` (by
  // slot) is kept unless the new split is predicted clearly faster
  // (core::rebalancedShares, which the planner's replay uses too).
  core::Result<std::vector<int64_t>> shares(DpComm* dp, int64_t global_batch, const std::vector<int>& members,
                                            int slots, const std::vector<int64_t>& current) {
    std::vector<double> all(static_cast<size_t>(dp->size()));
    const double m = mine_.value();
    mine_.endPeriod();
    ARCH_RETURN_IF_ERROR(dp->allgather(std::span<const double>(&m, 1), all));
    std::vector<int64_t> cur;
    for (size_t i = 0; i < members.size(); ++i) {
      const auto slot = static_cast<size_t>(members[i]);
      cur.push_back(slot < current.size() ? current[slot] : 0);
    }
    ARCH_ASSIGN_OR_RETURN(auto sh, core::rebalancedShares(cur, all, global_batch));
    if (sh == cur) return current;
    std::vector<int64_t> out(static_cast<size_t>(slots), 0);
    for (size_t i = 0; i < members.size() && i < sh.size(); ++i) out[static_cast<size_t>(members[i])] = sh[i];
    return out;
  }

 private:
  int64_t interval_;
  core::SpeedEstimate mine_;
};

}  // namespace archipelago::runtime::loop
