// From plan to run (`archipelago train JOB --plan PLAN.json`): the job
// fields that make the runtime execute the layout a plan chose, as
// `--set PATH=VALUE` overrides, so the job's own validation judges the
// result and every value says where it came from.
//
//   plan                          job
//   tp (every island alike)       strategy.tensor_parallel
//   pp (stages of a pipeline)     strategy.pipeline_stages, strategy.stage_layers
//   ep                            strategy.expert_parallel
//   micro_batch                   train.micro_batch
//   recompute (pipelines)         train.recompute
//   zero                          train.zero
//   strategy, diloco_h, codec     strategy.kind, strategy.inner_steps, strategy.codec
//
// Groups of different layouts become per-island layouts
// (core/island_layout.h): each group must be one island, and its tp, pp
// and layer split become cluster.islands[i].tensor_parallel,
// pipeline_stages and stage_layers; such a job runs dense, synchronous or
// DiLoCo, with at most ZeRO-1, uncompressed across islands, with the
// smallest micro-batch. A plan that interleaves
// virtual stages is refused, and so is one made for another number of
// devices or another depth of model.
// What the runtime cannot apply as planned is applied the closest way it
// can and said in `notes` (ZeRO with expert parallelism, ZeRO-3 with
// pipeline or tensor parallelism, selective recomputation, another global batch).
#pragma once

#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/plan/planner.h"

namespace archipelago::plan {

struct PlanOverrides {
  std::vector<std::string> sets;   // "path=value"
  std::vector<std::string> notes;  // what was applied differently, for the log
};

core::Result<PlanOverrides> jobOverrides(const Plan& plan, const core::JobConfig& job);

}  // namespace archipelago::plan
