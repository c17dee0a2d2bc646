// ZeRO-3 (train.zero: 3), FSDP-style, as a part: each rank of the
// data-parallel group keeps only its slice of the fp32 masters, their
// gradients and the AdamW moments (FlatParams::bindSharded), and the
// module's weights exist in full only while they are used.
//
// The model is cut into units (runtime/flat_params.h ShardLayout): one per
// decoder layer, plus the root (the embedding, the final norm, the head).
// With expert parallelism a MoE layer has two: its dense tensors, sharded
// over the ranks that hold them (the stage's replicas), and this rank's
// experts, sharded over the ranks holding the same experts; the two are
// gathered, freed and reduced together, each over its own group.
//
//   root          gathered at the first forward of a step (or evaluation)
//                 and kept until the step's gradients are reduced: its
//                 gradients accumulate over the micro-batches and are
//                 reduce-scattered once, at reduceGradients
//   layer i       gathered before its forward (the next layer's gather is
//                 started meanwhile: prefetch) and freed after it; gathered
//                 again when its backward starts (a hook on its output's
//                 gradient), its gradients reduce-scattered into the owners'
//                 slices as soon as the previous layer's backward starts,
//                 then freed. The last layer stays between forward and
//                 backward.
//
// Memory leaves a unit's storage and comes back under the same storage
// (compat::takeStorage / giveStorage, from a pool of blocks kept for reuse),
// so the tensors autograd saved stay valid. Every
// collective runs on one worker thread in the order the compute thread
// asks for them, which is the same on every rank; a rank with fewer
// micro-batches than the others runs idle passes (the collectives of one
// micro-batch without compute), so every member makes the same calls.
// Gathers and reduce-scatters are fp32, through comm or a group's native
// island backend (setBackend: c10d inside an island).
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "archipelago/core/background_queue.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/dp_comm.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/island_backend.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

// The units of ZeRO-3 over `segments`: a unit per run of a decoder layer's
// tensors ("model.layers.N.") and one per run of other tensors, as size+1
// flat offsets; `layer_units[i]` is the unit of the shard's i-th layer, and
// `expert_units[i]` that of its second run (expert parallelism puts every
// layer's experts after all dense tensors), or -1.
struct UnitCut {
  std::vector<int64_t> offsets;
  std::vector<size_t> layer_units;
  std::vector<int64_t> expert_units;
  std::vector<size_t> root_units;
};
UnitCut cutUnits(const std::vector<std::pair<std::string, int64_t>>& named_numels);

// The ranks a range of the flat offsets is sharded over: the group and its
// size+1 slice boundaries (OptimizerPiece::offsets); without a group,
// {lo, hi}: this rank holds the range whole.
struct ShardGroup {
  DpComm* dp = nullptr;
  std::vector<int64_t> offsets;
  IslandBackend* native = nullptr;  // gathers and reduce-scatters instead of ours over `dp` (setBackend)
};

class ShardedParameters final : public Part, public model::LayerHooks, public PassHooks {
 public:
  // `groups`: the ranges the flat buffer is sharded over, each unit inside
  // one of them (OptimizerShard::pieces(), which FlatParams was bound with).
  // `norm_segments`: per segment, whether this rank counts it in the global
  // norm (tensor parallelism: the slices on every TP rank, the replicated
  // tensors on its rank 0); empty: all.
  ShardedParameters(FlatParams& flat, std::vector<ShardGroup> groups, UnitCut cut, std::vector<bool> norm_segments = {});
  ~ShardedParameters() override;
  std::string name() const override { return "sharded parameters (ZeRO-3)"; }

  // A native island backend (runtime/island_backend.h) for the units
  // sharded over `group`, which holds the same ranks in the same order;
  // null: every unit through comm again. Set between steps; the caller
  // keeps it alive while set.
  void setBackend(const DpComm* group, IslandBackend* native);

  core::Status reduceGradients(StepStats& stats) override;
  NormShare gradNormSquared() const override;
  std::vector<StateRange> stateRanges() const override;

  void before(size_t layer) override;
  torch::Tensor after(size_t layer, torch::Tensor output) override;

  void beginPass(bool backward) override;
  void endBackward() override;
  void idleForward(bool backward_follows) override;
  void idleBackward() override;
  void endForwardOnly() override;

  // The failure behind an exception thrown inside autograd (ok otherwise).
  const core::Status& failure() const { return failure_; }
  // Units whose full weights are in memory now (tests: between steps, none).
  size_t heldUnits() const;
  // Memory for gathered units, in use or kept for reuse: the most a rank
  // ever held at once, per size (StepRecord::state_bytes).
  int64_t unitBytes() const { return pool_bytes_; }

 private:
  struct Unit {
    bool params_held = false, grads_held = false;
    uint64_t gather_ticket = 0, reduce_ticket = 0;  // 0: none outstanding
  };
  void requestGather(size_t u);
  void awaitGather(size_t u);
  void prepareGrads(size_t u);
  void requestReduce(size_t u);
  void release(size_t u);
  void preBackward(size_t layer);
  void forwardDone(size_t layer, bool backward_follows);
  uint64_t submit(std::function<core::Status()> task);
  void await(uint64_t ticket);
  core::Status gather(size_t u);
  core::Status reduce(size_t u);
  void fail(const core::Status& st);
  // A unit's memory from the pool (new memory when it has none of that
  // size), and back to it: freeing and allocating layer-sized blocks every
  // use grew the host heap by one of them per step (glibc's mmap threshold
  // adapts to freed blocks, which then fragment the heap).
  void attach(const torch::Tensor& t);
  void detach(const torch::Tensor& t);
  // Unit u's group, its members' parts of u (offsets relative to u), and
  // this rank's part of u (flat offsets, maybe empty).
  const ShardGroup& groupOf(size_t u) const { return groups_[unit_group_[u]]; }
  // Who collects unit u: its group's native backend, or ours over its DpComm.
  IslandBackend& backendOf(size_t u);
  std::vector<int64_t> countsOf(size_t u) const;
  FlatSlice mineOf(size_t u) const;
  // The units of the shard's i-th layer (one, or with experts two).
  std::vector<size_t> unitsOf(size_t layer) const;

  FlatParams& flat_;
  std::vector<ShardGroup> groups_;
  std::vector<CommBackend> ours_;   // per group: ours over its DpComm
  std::vector<FlatSlice> mine_;     // per group: this rank's slice
  std::vector<size_t> unit_group_;  // per unit: its group
  UnitCut cut_;
  std::vector<bool> norm_segments_;
  std::vector<Unit> units_;
  bool root_grads_ = false;     // the root's gradients are held this step
  int pending_layer_ = -1;      // the layer whose backward ran last, not yet reduced
  std::mutex pool_mu_;  // the worker thread returns gradients
  std::map<size_t, std::vector<at::DataPtr>> pool_;
  std::atomic<int64_t> pool_bytes_{0};
  core::Status failure_;
  std::mutex mu_;
  std::condition_variable done_cv_;
  uint64_t submitted_ = 0, completed_ = 0;
  core::BackgroundQueue queue_;  // last: joined first
};

}  // namespace archipelago::runtime::parallel
