// Tensor parallelism as the loop sees it (docs/parallelism.md "Tensor
// parallelism"): the model's TP collectives (model/tensor_parallel.h) over a
// comm group of consecutive ranks of one island, and which gradients a TP
// rank counts in the global norm. The gradients themselves need no part of
// their own: each slice is summed over the ranks holding the same slice
// (a DataParallel part over the same-TP-rank ranks), and the replicated
// tensors (norms, MoE layers) already carry identical gradients on every
// rank of the group. With sequence parallelism the replicated tensors saw a
// block of the sequence each: the TensorParallel part sums their gradients
// over the group.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/config.h"
#include "archipelago/model/tensor_parallel.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

// What the TP collectives carry and reduce: fp64 as it is, everything else
// (fp32, 16-bit) in fp32.
torch::ScalarType tensorParallelWireType(const torch::Tensor& t);
// `t` with `dim` moved first, contiguous on `device` in its wire type: the
// blocks along dim are then contiguous runs.
torch::Tensor dimFirstOn(const torch::Tensor& t, int64_t dim, const torch::Device& device);

// model::TensorParallelComm as the loop holds it: failures throw (the
// model calls it inside autograd), and the loop turns them into a Status at
// the step boundary (guardStep with failure()). Two implementations: over a
// comm group (below) and over c10d (c10d_tensor_parallel.h,
// strategy.island_collectives: c10d).
class TensorParallelCollectives : public model::TensorParallelComm {
 public:
  // The failure behind the last exception thrown; ok if none.
  const core::Status& failure() const { return failure_; }

 protected:
  [[noreturn]] void fail(const core::Status& st, const std::string& what);

 private:
  core::Status failure_;
};

// Over a comm group: 16-bit tensors travel and are reduced in fp32, through
// host memory.
class CommTensorParallel final : public TensorParallelCollectives {
 public:
  explicit CommTensorParallel(std::shared_ptr<comm::Group> group) : group_(std::move(group)) {}
  int size() const override { return group_->size(); }
  int rank() const override { return group_->rank(); }
  void allreduceSum(torch::Tensor& t) override { reduce(t, comm::ReduceOp::kSum, "sum"); }
  void allreduceMax(torch::Tensor& t) override { reduce(t, comm::ReduceOp::kMax, "max"); }
  torch::Tensor reduceScatter(const torch::Tensor& t, int64_t dim) override;
  torch::Tensor allgather(const torch::Tensor& t, int64_t dim) override;

 private:
  void reduce(torch::Tensor& t, comm::ReduceOp op, const char* what);
  std::shared_ptr<comm::Group> group_;
};

// Per flat segment: whether it is held whole (replicated over the group)
// rather than sliced. The global norm counts a slice on every rank of the
// group and a replicated tensor on its rank 0.
std::vector<bool> replicatedSegments(const core::ModelConfig& config, const std::vector<ParamSegment>& segments,
                                     model::TensorParallelRank tp);

// The part: under sequence parallelism, the gradients of the replicated
// tensors (norms) summed over the tensor-parallel group, before the data
// part sums over replicas; nothing to do without it.
//
// With ZeRO-3 (sharded_params.h) the replicas' sum comes first: each layer's
// gradients are reduce-scattered while backward runs, so at the step's end a
// rank holds the replicas' sum of its slice only, and the TP ranks cut their
// flat buffers at other offsets (their slices differ in size). Then the
// replicated tensors are summed over the stage's ranks of every TP rank
// (`shard_group`), laid end to end in segment order (the same on every TP
// rank): each rank contributes the elements it owns (every element of TP
// rank t's copy is owned by one rank of t's ZeRO group), and every owner
// takes the total. The vector is small: the norms' weights.
class TensorParallel final : public Part {
 public:
  TensorParallel(FlatParams& flat, std::shared_ptr<comm::Group> group, std::vector<bool> replicated, bool sequence)
      : flat_(flat), group_(std::move(group)), replicated_(std::move(replicated)), sequence_(sequence) {}
  std::string name() const override { return "tensor"; }
  // ZeRO-3: sum the owned slices of the replicated tensors over `shard_group`
  // (after the sharded parameters reduced the step's gradients).
  void setShardGroup(std::shared_ptr<comm::Group> shard_group) { shard_group_ = std::move(shard_group); }
  bool afterReplicas() const { return shard_group_ != nullptr; }
  core::Status reduceGradients(StepStats& stats) override;
  const std::vector<bool>& replicated() const { return replicated_; }

 private:
  core::Status reduceOwned(StepStats& stats);
  FlatParams& flat_;
  std::shared_ptr<comm::Group> group_;
  std::shared_ptr<comm::Group> shard_group_;  // ZeRO-3 only
  std::vector<bool> replicated_;  // per flat segment
  bool sequence_;
};

}  // namespace archipelago::runtime::parallel
