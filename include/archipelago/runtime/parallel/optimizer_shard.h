// The optimizer's range as a part. Unsharded, every rank updates the whole
// flat buffer. Sharded (train.zero >= 1), the ranks of a data-parallel
// group split the buffer into equal contiguous slices; each keeps AdamW
// moments for its slice only (1/N of the optimizer memory), updates that
// slice from the reduced gradients (ZeRO-1: allreduced, every rank has all
// of them; ZeRO-2: reduce-scattered, each rank has its slice's), and the
// updated slices are gathered so every rank holds all parameters again.
//
// ZeRO-3 (sharded_params.h) keeps the parameters in these slices too and
// gathers them unit by unit where they are used: nothing to gather here.
//
// Slices are cut at element offsets, not tensor boundaries, so the state it
// names (stateRanges) are pieces of tensors; checkpoints assemble them by
// name (runtime/shard_map.h).
#pragma once

#include <string>
#include <vector>

#include "archipelago/runtime/dp_comm.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

class OptimizerShard final : public Part {
 public:
  // Unsharded: the whole buffer, nothing to gather.
  explicit OptimizerShard(FlatParams& flat);
  // Slice dp->rank() of dp->size() equal slices; `dp` gathers the slices.
  // `stage`: the ZeRO stage it serves (1, 2 or 3).
  OptimizerShard(FlatParams& flat, DpComm* dp, int stage = 1);
  // The n+1 boundaries of n equal slices of `numel` elements.
  static std::vector<int64_t> sliceOffsets(int64_t numel, int n);
  std::string name() const override {
    return sharded() ? "optimizer shard (ZeRO-" + std::to_string(stage_) + ")" : "optimizer";
  }
  int stage() const { return sharded() ? stage_ : 0; }

  bool sharded() const { return dp_ != nullptr; }
  // This rank's slice [begin, end) of the flat buffer.
  int64_t begin() const { return begin_; }
  int64_t end() const { return end_; }
  int64_t size() const { return end_ - begin_; }
  // size()+1 slice boundaries of the group (empty when unsharded).
  const std::vector<int64_t>& offsets() const { return offsets_; }
  // After the optimizer updated this rank's slice: every slice to every
  // rank (ZeRO-1/2; ZeRO-3 gathers where the parameters are used).
  core::Status gatherParameters(StepStats& stats);
  std::vector<StateRange> stateRanges() const override;

 private:
  FlatParams& flat_;
  DpComm* dp_ = nullptr;
  int stage_ = 0;
  std::vector<int64_t> offsets_;  // size()+1 slice boundaries
  int64_t begin_ = 0, end_ = 0;
};

}  // namespace archipelago::runtime::parallel
