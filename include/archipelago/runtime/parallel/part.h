// A parallelism as the training loop sees it: one small table of operations
// that a part implements, the way a Gloo algorithm or a ggml backend plugs
// into its host (docs/parallelism.md "Parts").
//
//   forwardBackward      run this rank's share of a step, and evaluate:
//                        the job's one schedule part (micro-batches or 1F1B)
//   beforeFinalBackward  the last backward of the step starts (overlap)
//   reduceGradients      sum the gradients of the tensors this part is
//                        responsible for over the ranks that hold them too
//   gradNormSquared      this rank's share of the global gradient norm
//   stateRanges          which ranges of the flat buffers it holds, by name
//
// Parts never own the model, the optimizer, the data or the metrics: the
// loop does, and hands them what one step needs. A part that survives a
// membership change takes the new epoch's group from the loop
// (DataParallel::bind); split layouts restart instead (docs/parallelism.md
// "Failures").
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/data/sampler.h"
#include "archipelago/runtime/trace.h"

namespace archipelago::runtime::parallel {

// What the loop hands a step's forward/backward.
struct StepInput {
  const data::Batch* batch = nullptr;  // this rank's (or its pipeline's) share
  int64_t seq_len = 0;
  // Samples whose mean gradient the step computes (the inner synchronous
  // group's); each micro-batch's loss is scaled by its part of it, so
  // summing gradients over the group gives the big-batch gradient.
  double group_samples = 1;
  // Multiplies every loss before backward (dynamic loss scaling,
  // runtime/loss_scaler.h); the loop divides the gradients by it again.
  double loss_scale = 1;
  // Micro-batches every member runs (sharded parameters: the most any
  // member's share needs); 0: as many as this rank's rows need.
  int64_t passes = 0;
  TraceRecorder* trace = nullptr;
};

// What forward/backward and the reductions report back.
struct StepStats {
  double ce_sum = 0;         // summed token cross-entropy (PP: last stage only)
  double aux_sum = 0;        // MoE auxiliary loss x samples
  int64_t tokens = 0;
  double compute_s = 0;      // busy time, EMULATED slowdown included
  double compute_cpu_s = 0;  // CPU time of the compute thread in forward/backward
  double wait_s = 0;         // blocked on peers: receives, send drains, gradient waits
  int64_t micro_batches = 0;
  int64_t sched_begin_us = 0, sched_end_us = 0;  // wall clock of the schedule (pipeline bubble)
};

// A part's contribution to ||g||^2 over the step group.
struct NormShare {
  double sum_sq = 0;
  // true: this rank holds every gradient the part covers, identical on all
  // ranks of the step group (plain data parallelism), so no reduction is
  // needed; false: the loop sums the shares over the step group.
  bool replicated = false;
};

// A named range [begin, end) of the flat parameter buffer.
struct StateRange {
  std::string name;
  int64_t begin = 0;
  int64_t end = 0;
};

class Part {
 public:
  virtual ~Part() = default;
  virtual std::string name() const = 0;

  // Schedule parts only (the others report an internal error).
  virtual core::Status forwardBackward(const StepInput& in, StepStats& stats);
  // Validation loss of this rank's share (ce sum, tokens); schedule parts only.
  virtual core::Status evaluate(const data::Batch& batch, int64_t seq_len, double& ce_sum, double& tokens);

  // Called by the schedule before the backward pass whose gradients are
  // final (the last micro-batch), so reductions can overlap with it.
  virtual void beforeFinalBackward() {}
  virtual core::Status reduceGradients(StepStats& /*stats*/) { return core::okStatus(); }
  virtual NormShare gradNormSquared() const { return {}; }
  virtual std::vector<StateRange> stateRanges() const { return {}; }
};

// What a schedule tells a part that lives around its passes (ZeRO-3's
// sharded parameters gather and free layer by layer). Every member of the
// part's group must make the same calls in the same order, so a rank with
// no rows for a micro-batch still says what a rank with rows would.
class PassHooks {
 public:
  virtual ~PassHooks() = default;
  // Before the first forward of a step (backward: true) or an evaluation.
  virtual void beginPass(bool backward) = 0;
  // After one micro-batch's backward returned.
  virtual void endBackward() = 0;
  // A micro-batch this rank has no rows for: the collectives of its forward
  // (with a backward to follow or not) and of its backward (which ends as
  // endBackward does), without compute.
  virtual void idleForward(bool backward_follows) = 0;
  virtual void idleBackward() = 0;
  // After an evaluation's forwards.
  virtual void endForwardOnly() = 0;
};

// Runs `body` at a step boundary: libtorch (and the expert exchange, which
// is called inside autograd) report failures by exception; they stop here
// and become a Status with `what` as context. When one of `thrown` holds
// the failure behind the exception (ok otherwise), the first such Status is
// returned, so its code (unavailable, deadline, ...) still decides on
// recovery.
core::Status guardStep(const std::string& what, const std::function<core::Status()>& body,
                       const std::vector<const core::Status*>& thrown = {});

// EMULATION of a device `factor` times slower than this host's core: the
// compute it did is stretched by a sleep. Per-operation mode (pipelines):
// an operation takes factor x the host's fastest time seen for the same
// operation on as many rows (identical work: the minimum is the
// uncontended cost), or its own time if longer, so another process's burst
// on the shared host hides inside the emulated time instead of being
// multiplied into bubbles a real device of that speed does not have.
class EmulatedSlowdown {
 public:
  explicit EmulatedSlowdown(double factor) : factor_(factor) {}
  double factor() const { return factor_; }
  // Sleeps the extra time for `compute_s` of work; returns it.
  double stretch(double compute_s, TraceRecorder* trace, const std::string& what = "");
  double stretchOp(double compute_s, TraceRecorder* trace, const std::string& op, int64_t rows);

 private:
  double sleep(double extra_s, TraceRecorder* trace, const std::string& what);
  double factor_;
  std::map<std::pair<std::string, int64_t>, double> fastest_;  // (op, rows) -> fastest seconds
};

}  // namespace archipelago::runtime::parallel
