// DpComm over the comm layer: gradient buckets go through the hierarchical
// allreduce when the world spans several islands (reduce-scatter inside each
// island, shards across the straits in parallel, allgather inside), through
// the flat ring otherwise. Control values use the world group directly.
#pragma once

#include <memory>

#include "archipelago/comm/communicator.h"
#include "archipelago/runtime/dp_comm.h"

namespace archipelago::runtime {

class GroupDp final : public DpComm {
 public:
  // `hierarchical`: use the hierarchical allreduce for buckets; `codec` is
  // applied on its cross-island leg.
  GroupDp(std::shared_ptr<comm::Group> world, bool hierarchical, comm::CodecKind codec, double op_timeout_s);

  int rank() const override { return group_->rank(); }
  int size() const override { return group_->size(); }
  std::unique_ptr<PendingReduce> allreduceSumAsync(std::span<float> data) override;
  std::unique_ptr<PendingReduce> allreduceSumBf16Async(std::span<uint16_t> data) override;
  // Flat ring reduce-scatter (no codec, whatever the islands): ZeRO-2's gradients.
  std::unique_ptr<PendingReduce> reduceScatterSumAsync(std::span<float> data, std::span<const size_t> counts) override;
  std::unique_ptr<PendingReduce> reduceScatterSumBf16Async(std::span<uint16_t> data,
                                                           std::span<const size_t> counts) override;
  core::Status allreduceSum(std::span<double> data) override;
  core::Status allreduceMax(std::span<double> data) override;
  core::Status allgather(std::span<const double> mine, std::span<double> all) override;
  core::Status allgatherSlices(std::span<float> data, std::span<const int64_t> offsets) override;
  core::Status broadcast(std::span<float> data, int root) override;
  std::string describe() const override;
  comm::Group& group() { return *group_; }

 private:
  std::unique_ptr<PendingReduce> reduceAsync(void* data, size_t n, comm::DType dtype);
  std::unique_ptr<PendingReduce> scatterAsync(void* data, std::span<const size_t> counts, comm::DType dtype);
  comm::OpOptions options() const;
  std::shared_ptr<comm::Group> group_;
  bool hierarchical_;
  comm::CodecKind codec_;
  double op_timeout_s_;
};

}  // namespace archipelago::runtime
