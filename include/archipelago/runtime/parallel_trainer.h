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

#include <cstdint>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/trainer.h"

namespace archipelago::runtime {

// ---- pure helpers (unit-tested) ---------------------------------------------------

// Contiguous layer counts per stage minimising the slowest stage's time,
// where stage s takes (layers_s + extra_s) / speed_s (extra: the embedding on
// the first stage and the LM head on the last, in layer equivalents) and may
// hold at most max_layers[s] layers (memory; empty or <= 0 = no limit). Every
// stage gets >= 1 layer. kInvalidArgument if the layers cannot fit.
core::Result<std::vector<int64_t>> splitLayers(int64_t n_layers, const std::vector<double>& speed,
                                               const std::vector<int64_t>& max_layers = {},
                                               double first_extra = 0, double last_extra = 0);

// Experts per member, proportional to speed (largest remainder), each >= 1.
core::Result<std::vector<int64_t>> placeExperts(int64_t num_experts, const std::vector<double>& speed);

// One operation of a stage's schedule.
struct PipeOp {
  bool forward = true;
  int64_t micro = 0;
};
// 1F1B (PipeDream-flush): stage s runs min(p-s-1, m) warm-up forwards, then
// alternates one forward and one backward, then drains the backwards.
std::vector<PipeOp> oneFOneBSchedule(int stage, int stages, int64_t micro_batches);
// Idle fraction of a 1F1B pipeline with equal stages: (p-1)/(m+p-1).
double oneFOneBBubble(int stages, int64_t micro_batches);

// Where every rank sits in a PP/EP job.
struct ParallelLayout {
  int world = 1;
  int stages = 1;                       // pipeline_stages
  int replicas = 1;                     // pipelines: world / stages (without PP: every rank is one)
  int ep = 1;                           // expert_parallel: pipelines per expert group
  std::vector<int64_t> stage_layers;    // layers per stage
  std::vector<int64_t> expert_begin;    // ep+1 entries: member j holds [expert_begin[j], expert_begin[j+1])
  int stageOf(int rank) const { return rank % stages; }
  int replicaOf(int rank) const { return rank / stages; }
  int64_t layerBegin(int stage) const;
  // Rank d*stages + s is stage s of pipeline d; pipelines [g*ep, (g+1)*ep)
  // form expert group g, pipeline d is its member d % ep.
  int epMemberOf(int rank) const { return replicaOf(rank) % ep; }
  int epGroupOf(int rank) const { return replicaOf(rank) / ep; }
};
// From the job: strategy.stage_layers / expert_counts when given, else from
// the workers' speed (1/slowdown, the slowest of the ranks sharing a stage
// or expert slot) and device memory (catalog). With strategy.kind diloco
// every block of stages x expert_parallel consecutive ranks (one expert
// group of pipelines) must lie inside one island.
core::Result<ParallelLayout> parallelLayout(const core::JobConfig& job);

// ---- the loop -------------------------------------------------------------------

// Same options and summary as runTrainer (which dispatches here when
// strategy.pipeline_stages > 1 or strategy.expert_parallel > 1). Needs
// options.world_group for more than one worker.
core::Result<TrainSummary> runParallelTrainer(const TrainerOptions& options);

}  // namespace archipelago::runtime
