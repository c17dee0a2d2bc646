#include "archipelago/runtime/parallel/optimizer_shard.h"

#include "archipelago/core/clock.h"
#include "archipelago/runtime/host_view.h"

namespace archipelago::runtime::parallel {

OptimizerShard::OptimizerShard(FlatParams& flat) : flat_(flat), begin_(0), end_(flat.numel()) {}

std::vector<int64_t> OptimizerShard::sliceOffsets(int64_t numel, int n) {
  std::vector<int64_t> out;
  for (int r = 0; r <= n; ++r) out.push_back(numel * r / n);
  return out;
}

OptimizerShard::OptimizerShard(FlatParams& flat, DpComm* dp, int stage)
    : flat_(flat), dp_(dp), stage_(stage), offsets_(sliceOffsets(flat.numel(), dp->size())) {
  begin_ = offsets_[static_cast<size_t>(dp->rank())];
  end_ = offsets_[static_cast<size_t>(dp->rank()) + 1];
}

core::Status OptimizerShard::gatherParameters(StepStats& stats) {
  if (!dp_ || stage_ == 3) return core::okStatus();
  const auto t0 = core::Clock::now();
  HostView params(flat_.params(), torch::kFloat32);
  core::Status st = dp_->allgatherSlices(std::span<float>(params.data<float>(), static_cast<size_t>(flat_.numel())), offsets_);
  if (st.isOk()) params.land();
  stats.wait_s += core::secondsSince(t0);
  return st.isOk() ? st : st.withContext("ZeRO-" + std::to_string(stage_) + " parameter allgather");
}

std::vector<StateRange> OptimizerShard::stateRanges() const {
  std::vector<StateRange> out;
  for (const auto& s : flat_.segments()) {
    const int64_t lo = std::max(begin_, s.offset), hi = std::min(end_, s.offset + s.numel);
    if (lo < hi) out.push_back({s.name, lo, hi});
  }
  return out;
}

}  // namespace archipelago::runtime::parallel
