#include "archipelago/runtime/dp_comm.h"

#include <algorithm>

namespace archipelago::runtime {
namespace {
class DoneReduce final : public PendingReduce {
 public:
  explicit DoneReduce(core::Status st = core::okStatus()) : st_(std::move(st)) {}
  core::Status wait() override { return st_; }

 private:
  core::Status st_;
};
}  // namespace

std::unique_ptr<PendingReduce> DpComm::allreduceSumBf16Async(std::span<uint16_t>) {
  return std::make_unique<DoneReduce>(core::unimplemented("bf16 gradient reduction over " + describe()));
}

std::unique_ptr<PendingReduce> DpComm::reduceScatterSumAsync(std::span<float>, std::span<const size_t>) {
  return std::make_unique<DoneReduce>(core::unimplemented("gradient reduce-scatter over " + describe()));
}

std::unique_ptr<PendingReduce> DpComm::reduceScatterSumBf16Async(std::span<uint16_t>, std::span<const size_t>) {
  return std::make_unique<DoneReduce>(core::unimplemented("bf16 gradient reduce-scatter over " + describe()));
}

core::Status DpComm::allreduceMax(std::span<double>) {
  return core::unimplemented("max-allreduce over " + describe());
}

std::unique_ptr<PendingReduce> LocalDp::reduceScatterSumAsync(std::span<float>, std::span<const size_t>) {
  return std::make_unique<DoneReduce>();
}

std::unique_ptr<PendingReduce> LocalDp::reduceScatterSumBf16Async(std::span<uint16_t>, std::span<const size_t>) {
  return std::make_unique<DoneReduce>();
}

std::unique_ptr<PendingReduce> LocalDp::allreduceSumAsync(std::span<float>) {
  return std::make_unique<DoneReduce>();
}

std::unique_ptr<PendingReduce> LocalDp::allreduceSumBf16Async(std::span<uint16_t>) {
  return std::make_unique<DoneReduce>();
}

core::Status LocalDp::allgather(std::span<const double> mine, std::span<double> all) {
  if (all.size() != mine.size()) return core::invalidArgument("allgather: output size must equal input size for one rank");
  std::copy(mine.begin(), mine.end(), all.begin());
  return core::okStatus();
}

}  // namespace archipelago::runtime
