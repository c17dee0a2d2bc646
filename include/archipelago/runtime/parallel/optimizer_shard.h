// The optimizer's range as a part. Unsharded, every rank updates the whole
// flat buffer. Sharded (train.zero >= 1), the flat buffer is one or more
// ranges, each shared by a data-parallel group (the ranks holding those
// tensors): the group's ranks split the range into equal contiguous slices;
// each keeps AdamW moments for its slices only (1/N of the optimizer
// memory), updates them from the reduced gradients (ZeRO-1: allreduced,
// every rank has all of them; ZeRO-2: reduce-scattered, each rank has its
// slice's), and the updated slices are gathered so every rank holds all its
// parameters again.
//
// One range over the whole buffer is the common case. Expert parallelism has
// two: the dense tensors, shared by the stage's replicas, and the experts,
// shared only by the ranks holding the same experts (fewer, or none).
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
#include "archipelago/runtime/island_backend.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

// The parts of `flat`'s segments inside flat offsets [lo, hi), by name:
// the state a rank holding that slice checkpoints.
std::vector<StateRange> stateRangesIn(const FlatParams& flat, int64_t lo, int64_t hi);

// Flat offsets [lo, hi) and the group that shares them (null: this rank alone).
struct OptimizerRange {
  int64_t lo = 0, hi = 0;
  DpComm* dp = nullptr;
};

// This rank's part of one OptimizerRange.
struct OptimizerPiece {
  DpComm* dp = nullptr;          // null: the whole range is this rank's
  IslandBackend* native = nullptr;  // gathers the slices instead of ours over `dp` (setBackend)
  std::vector<int64_t> offsets;  // the group's size+1 slice boundaries (flat offsets); empty unsharded
  int64_t begin = 0, end = 0;    // this rank's slice [begin, end)
  int64_t state_offset = 0;      // where its moments start in the optimizer's state
  int64_t size() const { return end - begin; }
  bool sharded() const { return dp != nullptr; }
};

class OptimizerShard final : public Part {
 public:
  // Unsharded: the whole buffer, nothing to gather.
  explicit OptimizerShard(FlatParams& flat);
  // Slice dp->rank() of dp->size() equal slices of the whole buffer; `dp`
  // gathers the slices. `stage`: the ZeRO stage it serves (1, 2 or 3).
  OptimizerShard(FlatParams& flat, DpComm* dp, int stage = 1);
  // Consecutive ranges covering the buffer, each sliced over its group.
  OptimizerShard(FlatParams& flat, const std::vector<OptimizerRange>& ranges, int stage);
  // The n+1 boundaries of n equal slices of `numel` elements.
  static std::vector<int64_t> sliceOffsets(int64_t numel, int n);
  // The same over [lo, hi).
  static std::vector<int64_t> sliceOffsets(int64_t lo, int64_t hi, int n);
  std::string name() const override {
    return sharded() ? "optimizer shard (ZeRO-" + std::to_string(stage_) + ")" : "optimizer";
  }
  int stage() const { return sharded() ? stage_ : 0; }

  bool sharded() const;
  const std::vector<OptimizerPiece>& pieces() const { return pieces_; }
  // Elements this rank updates (the optimizer state's size).
  int64_t size() const;
  // AdamW over this rank's slices of the reduced gradients.
  void step(FlatAdamW& adam, double lr);
  // After step: every slice to every rank of its group (ZeRO-1/2; ZeRO-3
  // gathers where the parameters are used), through comm or the native
  // backend set for the group.
  core::Status gatherParameters(StepStats& stats);
  // A native island backend (runtime/island_backend.h) for the pieces
  // shared by `group`, which holds the same ranks in the same order; null:
  // every piece through comm again. The caller keeps it alive while set.
  void setBackend(const DpComm* group, IslandBackend* native);
  std::vector<StateRange> stateRanges() const override;
  // "N of M optimizer elements per rank: [lo, hi) over K ranks, ..." for logs.
  std::string describe() const;
  // The state ranges of one piece.
  std::vector<StateRange> stateRangesOf(const OptimizerPiece& p) const;

 private:
  FlatParams& flat_;
  int stage_ = 0;
  std::vector<OptimizerPiece> pieces_;
};

}  // namespace archipelago::runtime::parallel
