// The schedule part of every job without pipeline stages: this rank's share
// of the step cut into micro-batches, forward and backward one after the
// other, gradients accumulated in the flat buffer. Before the last
// micro-batch's backward the loop's reductions are told (overlap).
//
// Micro-batches are chunks of train.micro_batch samples (the whole share
// without it), or, where collective calls inside the model need every
// member to run the same number (expert parallelism's all-to-alls), an
// agreed count with near-equal ranges. With sharded parameters (ZeRO-3,
// sharded_params.h) every member runs StepInput::passes micro-batches, a
// member with fewer rows idle ones (the collectives without compute).
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "archipelago/model/transformer.h"
#include "archipelago/runtime/parallel/part.h"
#include "archipelago/runtime/parallel/sharded_params.h"

namespace archipelago::runtime::parallel {

// [begin, end) of the micro-batches of n samples: chunks of `micro_batch`
// (<= 0: one), or exactly `count` near-equal ranges when count > 0.
std::vector<std::pair<int64_t, int64_t>> microRanges(int64_t n, int64_t micro_batch, int64_t count = 0);
// How many chunks microRanges(n, micro_batch) gives.
int64_t microCount(int64_t n, int64_t micro_batch);

class MicroBatchSchedule final : public Part {
 public:
  MicroBatchSchedule(model::Transformer net, int64_t micro_batch, double slowdown)
      : net_(std::move(net)), micro_batch_(micro_batch), slowdown_(slowdown) {}
  std::string name() const override { return "micro-batches"; }
  // Every member runs `count` micro-batches (0: chunks of micro_batch).
  void setAgreedCount(int64_t count) { agreed_count_ = count; }
  // Called before the backward whose gradients are final.
  void onFinalBackward(std::function<void()> f) { on_final_ = std::move(f); }
  // Told around every pass (not owned; null: none).
  void setPassHooks(PassHooks* hooks) { passes_ = hooks; }

  core::Status forwardBackward(const StepInput& in, StepStats& stats) override;
  core::Status evaluate(const data::Batch& batch, int64_t seq_len, double& ce_sum, double& tokens) override;

 private:
  model::Transformer net_;
  int64_t micro_batch_;
  int64_t agreed_count_ = 0;
  EmulatedSlowdown slowdown_;
  std::function<void()> on_final_;
  PassHooks* passes_ = nullptr;
};

}  // namespace archipelago::runtime::parallel
