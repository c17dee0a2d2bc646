// Private to the plan layer: the static per-device op order of a pipeline
// schedule (Megatron's 1F1B, or its interleaved variant with v chunks per
// device), shared by the planner's schedule evaluation and the simulator so
// both run the very same order, and the planner's deterministic evaluation
// of that order for one replica.
#pragma once

#include <cstdint>
#include <vector>

namespace archipelago::plan::detail {

// The op at position `pos` (0 .. 2*v*m-1) of device `stage` in a pipeline of
// P devices: op 0 = forward, 1 = backward; chunk in [0, v); mb in [0, m).
void scheduleOpAt(int64_t P, int64_t v, int64_t m, int64_t stage, int64_t pos, int& op, int64_t& chunk, int64_t& mb);

// One replica's pipeline: per device, forward and backward seconds per
// micro-batch (all its chunks together); per hop device d -> d+1 (index d,
// P-1 = the wrap from the last device to the first for interleaving), the
// latency and the serialisation time of one activation (serialised = true
// where flows queue on a shared link, i.e. straits).
struct PipelineSpec {
  std::vector<double> fwd_s, bwd_s;
  std::vector<double> hop_latency, hop_transfer;
  std::vector<char> hop_serialised;
  int64_t micro_batches = 1;
  int64_t virtual_stages = 1;
};

struct PipelineTiming {
  double makespan = 0;                  // last backward end
  std::vector<double> last_bwd_start;   // per device: its last backward op
  std::vector<double> last_bwd_end;
};

// Start and end of every op under the static order, each op starting when
// its device is free and its input has arrived (max-plus recurrence; no
// randomness). Long pipelines (many micro-batches) are evaluated on a
// prefix and extrapolated by the steady-state period, which is exact once
// the schedule is periodic.
PipelineTiming evaluatePipeline(const PipelineSpec& spec);

}  // namespace archipelago::plan::detail
