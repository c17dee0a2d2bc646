// Discrete-event simulator of one training step of a Plan: per group one
// representative pipeline replica runs its schedule (1F1B, or interleaved
// with a cap on in-flight micro-batches); activations and gradients move as
// flows on links, and flows sharing a link get equal shares of it (identical
// flows of other replicas are represented by a weight); DP gradient
// reduction overlaps the remaining backward work; the cross-group sync runs
// on the straits after the step (every H steps for DiLoCo). Writes a
// Chrome/Perfetto trace. Separately, failures by MTBF are drawn over a
// horizon to compare checkpoint-restart and elastic recovery by goodput.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/plan/planner.h"

namespace archipelago::plan {

struct SimOptions {
  bool trace = false;          // collect trace events
  int64_t max_trace_groups = 4;
};

struct SimResult {
  double step_s = 0;
  double tokens_per_s = 0;
  double bubble_fraction = 0;   // idle fraction of the pipeline phase, averaged over stages
  double sync_exposed_s = 0;
  std::vector<double> group_step_s;
  std::vector<StraitTraffic> straits;
  int64_t events = 0;
  std::string trace_json;       // Chrome trace (when SimOptions::trace)
};

core::Result<SimResult> simulateStep(const Plan& plan, const SimOptions& options = {});

struct FailureOptions {
  double mtbf_hours = 50000;    // per device
  double horizon_hours = 24 * 7;
  double checkpoint_interval_s = 0;   // 0 = Young/Daly optimum sqrt(2 * C * MTBF_system)
  double checkpoint_write_s = 30;     // blocking part of a checkpoint
  double restart_s = 600;             // job restart + reload after a failure
  double elastic_reconfig_s = 30;     // survivors rebuild groups (next epoch)
  double repair_hours = 4;            // until a failed device's replica is back
  uint64_t seed = 1;
};

struct GoodputResult {
  double failures = 0;          // expected failures over the horizon (drawn)
  double checkpoint_interval_s = 0;
  double checkpoint_goodput = 0;  // useful work / ideal work
  double elastic_goodput = 0;
};

GoodputResult simulateFailures(const Plan& plan, double step_s, const FailureOptions& options);

}  // namespace archipelago::plan
