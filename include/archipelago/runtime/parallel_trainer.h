// Pipeline parallelism (PP) and expert parallelism (EP): the training loop
// for jobs whose model is split across workers (docs/parallelism.md).
//
// Pipeline: the world is cut into world / pipeline_stages pipelines of
// consecutive ranks; stage s of every pipeline holds the same contiguous
// range of decoder layers (uneven: strategy.stage_layers, or computed from
// the devices' speed and memory so a faster / bigger device gets more).
// Each pipeline takes its share of the global batch (uneven between
// pipelines, by their speed), cuts it into micro-batches and runs the 1F1B
// schedule: activations forward and their gradients backward travel
// point-to-point through the comm layer (through strategy.codec where two
// stages sit on different islands). Same-stage ranks of all pipelines then
// sum their gradients; every stage clips by the global norm and steps
// AdamW, so the update is the single-process big-batch update.
//
// Experts: the pipelines (without PP: the ranks) are cut into
// expert-parallel groups of expert_parallel consecutive pipelines; in every
// stage, the stage's ranks of those pipelines form the group, and member j
// (pipeline j of the group) holds the same contiguous range of every MoE
// layer's experts (uneven: strategy.expert_counts or by device speed). Each
// pipeline trains its data-parallel share; token rows go to the expert
// owners and back through all-to-all(v) (optionally compressed by
// strategy.dispatch_codec). Non-expert gradients are summed over the
// same-stage ranks, expert gradients over those holding the same experts.
//
// Cross-island strategies (strategy.kind diloco | streaming): every island
// runs its own pipelines / expert groups (each lies inside one island) as
// the inner synchronous group; the ranks that hold the same tensors (same
// stage, same expert member) in all islands run the outer steps on their
// part through the outer sync of the data-parallel trainer (outer_sync.h).
//
// Checkpoints use the single-process layout (HF names, flat optimizer state
// in full-model order): rank 0 gathers the parts by name, and every rank
// loads its part by name, so a run saved at one split resumes at another.
#pragma once

#include "archipelago/core/status.h"
#include "archipelago/runtime/parallel/layout.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "archipelago/runtime/trainer.h"

namespace archipelago::runtime {

// ---- the loop -------------------------------------------------------------------

// Same options and summary as runTrainer (which dispatches here when
// strategy.pipeline_stages > 1 or strategy.expert_parallel > 1). Needs
// options.world_group for more than one worker.
core::Result<TrainSummary> runParallelTrainer(const TrainerOptions& options);

}  // namespace archipelago::runtime
