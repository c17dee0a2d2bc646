// How a global batch is split over data-parallel ranks of different speed,
// and when a measured split is worth moving to. One rule for the runtime
// (the trainer's initial shares and its rebalancer, the expert split of a
// pipeline) and the planner (its replay of a local run predicts the same
// shares at the same steps), so the two cannot drift apart.
#pragma once

#include <cstdint>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/core/workers.h"

namespace archipelago::core {

// The weight of worker `w` in the initial split: train.shares[w.rank] when
// the job fixes shares (validateJob checks there is one per rank), else the
// cores it may use (its threads, capped by its cpu_quota) / its EMULATED
// slowdown; a dtype's speed is unknown until it runs (the rebalancer measures).
// The loop (per rank, or summed over a pipeline's ranks) and the planner's replay start here.
double initialShareWeight(const TrainConfig& train, const WorkerInfo& w);

// Integer shares summing to `total`, each >= 1, proportional to `weights`
// (e.g. measured samples/s) by the largest-remainder method; ties go to the
// lower rank, so every rank computes the same split.
// kInvalidArgument if total < weights.size() or a weight is <= 0/NaN.
Result<std::vector<int64_t>> sharesFromWeights(const std::vector<double>& weights, int64_t total);

// Step time data-parallel ranks would take with `shares` when rank i needs
// seconds_per_sample[i] per sample: the slowest rank's share x its time
// (every rank waits for the others at the gradient allreduce).
double shareStepTime(const std::vector<int64_t>& shares, const std::vector<double>& seconds_per_sample);

// The rebalancer's margin: a new split must be predicted this much faster.
// Measured speeds are noisy and biased (a rank's fixed per-step cost spreads
// over fewer samples when its share shrinks, so its time per sample rises):
// without a margin shares flip back and forth every interval
// (docs/runtime.md "Rebalancing").
inline constexpr double kRebalanceMinGain = 0.05;

// Steps after a start or a membership change whose speed the rebalancer
// does not count: a fresh process's heap and caches are still warming up
// (measured on a 2-core VM: a worker's second step took 2x the CPU time of
// its fourth).
inline constexpr int64_t kRebalanceWarmupSteps = 2;

// Whether the rebalancer should move from `current` to `proposed`: only if
// the proposed shares are predicted `min_gain` (a fraction) faster per step
// on the same measured speeds. Shares that do not cover the same total, or
// a rank with a share < 1 (a membership change), always move; a rank
// without a measurement yet (seconds_per_sample <= 0) keeps the current
// split, since nothing can be predicted for it.
bool worthRebalancing(const std::vector<int64_t>& current, const std::vector<int64_t>& proposed,
                      const std::vector<double>& seconds_per_sample, double min_gain = kRebalanceMinGain);

// Steps between two rebalancing decisions of a synchronous run (DiLoCo and
// streaming decide at every outer step instead).
inline constexpr int64_t kRebalanceInterval = 5;

// Steps between two rebalancing decisions of a job (0 = never): none when
// rebalancing is off or there is one worker; every kRebalanceInterval
// steps for a synchronous run, every outer step (`inner_steps`) for
// DiLoCo and streaming (`outer_steps`). The trainer and the planner's
// replay both ask here.
inline int64_t rebalanceInterval(bool enabled, int64_t world, bool outer_steps, int64_t inner_steps) {
  if (!enabled || world <= 1) return 0;
  return outer_steps ? inner_steps : kRebalanceInterval;
}

// A rank's speed as the rebalancer sees it: seconds per sample of its
// compute. Synchronous runs: an exponential moving average over the steps,
// weight 0.3 on the newest (every step meets, so the recent steps are what
// the next ones will be like). Outer-step strategies (`period_mean`:
// DiLoCo, streaming): the mean over the whole period since the last
// decision (its seconds / its samples). The outer step waits for the
// island that took longest over all its inner steps, and an island's last
// inner steps before it are unrepresentative: a slow island runs them with
// the cores that the faster islands, already waiting, have freed (measured
// on 2 cores: a slow worker's last two inner steps took 0.11-0.13 s against
// 0.15-0.38 s before; the EMA, weighted to them, saw it ~25% too fast and
// kept a split under which the fast island waited 0.5 s every outer step).
class SpeedEstimate {
 public:
  explicit SpeedEstimate(bool period_mean = false) : period_mean_(period_mean) {}
  // One step: `seconds` of compute for `samples` samples (ignored if < 1).
  void observe(double seconds, int64_t samples);
  // Seconds per sample; 0 = no measurement (yet, or in this period).
  double value() const;
  // After a decision: a period mean starts over (the EMA carries on).
  void endPeriod();

 private:
  bool period_mean_;
  double ema_ = 0;
  double period_s_ = 0;
  int64_t period_samples_ = 0;
};

// The rebalancer's decision, the same in the trainer and in the planner's
// replay: shares proportional to 1 / seconds_per_sample (weight 1 for a rank
// not measured yet), adopted only where worthRebalancing says so;
// otherwise `current` is returned unchanged.
Result<std::vector<int64_t>> rebalancedShares(const std::vector<int64_t>& current,
                                              const std::vector<double>& seconds_per_sample, int64_t total);

}  // namespace archipelago::core
