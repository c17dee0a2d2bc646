// Who sums a gradient bucket (docs/devices.md "Island collectives"): the
// one seam between the data-parallel buckets and a collective library.
//
// CommBackend, the default, is ours: the bucket goes to host memory
// (page-locked for CUDA devices) and through the comm layer, which picks
// the same-host copy or TCP inside an island and the hierarchical
// allreduce (with the strait codec) across islands. A native backend
// (C10dBackend, runtime/c10d_backend.h) sums the bucket where it was
// computed with the device's own library inside the island, and hands
// only the cross-island leg to the comm layer, as FlagCX splits
// homogeneous from heterogeneous links.
//
// ZeRO's collectives go through the same seam: the gradient buckets'
// reduce-scatters (ZeRO-2), the parameter allgathers after the optimizer
// (ZeRO-1/2), and ZeRO-3's per-unit gathers and reduce-scatters.
//
// Rules for every backend: every rank of the group calls the same
// collectives with the same sizes in the same order; when wait() returns,
// every rank holds the same sum, bit for bit (or its block of it).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "archipelago/runtime/dp_comm.h"

namespace archipelago::runtime {

class IslandBackend {
 public:
  virtual ~IslandBackend() = default;
  // For the log: "comm (...)" or "c10d nccl inside islands of 4, comm across 2 islands".
  virtual std::string describe() const = 0;
  // Where a bucket of `dtype` computed on `device` must lie to be summed.
  virtual torch::TensorOptions wireOptions(const torch::Device& device, torch::ScalarType dtype) const = 0;
  // Sums `wire` (contiguous, 1-D, placed as wireOptions says; fp32 or bf16)
  // over the gradient group, in place. The caller keeps it alive and
  // untouched until wait() returns.
  virtual std::unique_ptr<PendingReduce> allreduceSum(torch::Tensor wire) = 0;
  // Sums `wire` (as allreduceSum) over the group, keeping only this rank's
  // block: `wire` is the group's blocks in rank order, counts[r] elements
  // for rank r. When wait() returns, this rank's block holds the sum and
  // the others are clobbered.
  virtual std::unique_ptr<PendingReduce> reduceScatterSum(torch::Tensor wire, std::vector<size_t> counts) = 0;
  // Rank r contributes wire[offsets[r], offsets[r+1]) (fp32, placed as
  // wireOptions says; size+1 ascending offsets from 0 to wire.numel());
  // every rank ends with all of it.
  virtual core::Status allgatherSlices(torch::Tensor wire, std::vector<int64_t> offsets) = 0;

  // What to sum or gather `t` (1-D) in: `t` itself when it already lies
  // where this backend works in `dtype` (wire.is_same(t)), else a new
  // tensor placed as wireOptions says, holding t's values when `values`.
  torch::Tensor wireFor(const torch::Tensor& t, torch::ScalarType dtype, bool values) const;
};

// Ours: host memory through a DpComm (GroupDp's allreduce or hierarchical
// allreduce; LocalDp for one process).
class CommBackend final : public IslandBackend {
 public:
  explicit CommBackend(DpComm* dp) : dp_(dp) {}
  void bind(DpComm* dp) { dp_ = dp; }
  DpComm* dp() const { return dp_; }  // the group it sums over (null: nobody else holds the tensors)
  std::string describe() const override;
  torch::TensorOptions wireOptions(const torch::Device& device, torch::ScalarType dtype) const override;
  std::unique_ptr<PendingReduce> allreduceSum(torch::Tensor wire) override;
  std::unique_ptr<PendingReduce> reduceScatterSum(torch::Tensor wire, std::vector<size_t> counts) override;
  core::Status allgatherSlices(torch::Tensor wire, std::vector<int64_t> offsets) override;

 private:
  DpComm* dp_;
};

}  // namespace archipelago::runtime
