// Data parallelism as a part: the gradients of a range of the flat buffer
// (whole tensors: segments [seg_begin, seg_end)) are summed over the ranks
// that hold the same tensors and train other samples, in buckets
// (gradient_bucketer.h), overlapped with backward where nothing else talks
// during backward. With ZeRO-2 each rank receives the sum of its optimizer
// slice only (a reduce-scatter: half the bytes of an allreduce).
//
// Used alone (every rank holds the whole model), for the replicated tensors
// of pipeline stages (the same-stage ranks of all pipelines) and for the
// non-expert tensors of an expert-parallel job.
#pragma once

#include <memory>

#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/parallel/gradient_bucketer.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

struct DataParallelOptions {
  int seg_begin = 0;
  int seg_end = -1;          // -1: to the last segment
  int64_t bucket_bytes = 25 << 20;
  // Start buckets from gradient-ready hooks; only where nothing else talks
  // during backward, and a group of more than one rank (now or after a
  // membership change) to overlap with.
  bool overlap = true;
  // How this range counts in the global gradient norm: replicated (every
  // rank of the step group holds all of it, reduced: the norm is local) or
  // counted by one holder only (`norm_owner`) and summed over the group.
  bool replicated_norm = true;
  bool norm_owner = true;
  // Per flat segment: whether the owner counts it (empty: all of them);
  // tensor parallelism counts a replicated tensor on one rank of a group.
  std::vector<bool> norm_segments;
  torch::ScalarType reduce_dtype = torch::kFloat32;  // train.reduce_dtype
  // ZeRO-2 (train.zero: 2): the optimizer slices of the group's ranks
  // (size+1 offsets, OptimizerShard::offsets()); gradients are
  // reduce-scattered along them and each rank's norm share is its own
  // slice (the group's rank()). Empty: every rank gets the whole sum.
  std::vector<int64_t> shard_offsets;
};

class DataParallel final : public Part {
 public:
  // `dp`: the ranks holding this range (null or size 1: nothing to reduce).
  DataParallel(FlatParams& flat, DpComm* dp, const DataParallelOptions& options);
  std::string name() const override { return "data"; }

  // A new epoch's group (same tensors, other members).
  void bind(DpComm* dp) { bucketer_.setDp(dp); }
  DpComm* group() const { return bucketer_.dp(); }  // what it sums over (null: nobody else)
  // A native island backend for the buckets (null: ours through comm).
  void setBackend(IslandBackend* backend) { bucketer_.setBackend(backend); }
  void beforeFinalBackward() override { bucketer_.arm(); }
  core::Status reduceGradients(StepStats& stats) override;
  NormShare gradNormSquared() const override;
  std::vector<StateRange> stateRanges() const override;

  int64_t begin() const { return begin_; }
  int64_t end() const { return end_; }

 private:
  FlatParams& flat_;
  DataParallelOptions opt_;
  int64_t begin_ = 0, end_ = 0;
  GradientBucketer bucketer_;
};

}  // namespace archipelago::runtime::parallel
