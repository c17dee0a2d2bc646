// Where every rank of a job with pipeline stages or expert groups sits
// (docs/parallelism.md "Layout"):
//
// Pipeline: the world is cut into world / pipeline_stages pipelines of
// consecutive ranks; stage s of every pipeline holds the same contiguous
// range of decoder layers (uneven: strategy.stage_layers, or computed from
// the devices' speed and memory so a faster / bigger device gets more).
//
// Experts: the pipelines (without PP: the ranks) are cut into
// expert-parallel groups of expert_parallel consecutive pipelines; in every
// stage, the stage's ranks of those pipelines form the group, and member j
// (pipeline j of the group) holds the same contiguous range of every MoE
// layer's experts (uneven: strategy.expert_counts or by device speed).
//
// Tensor parallelism: every position above (stage s of pipeline d) is a
// group of tensor_parallel consecutive ranks of one island, each holding
// its slices of that position's tensors: rank (d * stages + s) * tp + t.
#pragma once

#include <cstdint>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime::parallel {

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

// The layout of a span of consecutive ranks: the whole world, or (per-island
// layouts) one island. Ranks and replicas are the job's: the span's first
// rank is `base`, its first pipeline the job's replica `replica_base`.
struct ParallelLayout {
  int world = 1;                        // ranks in the span
  int base = 0;                         // the span's first rank
  int replica_base = 0;                 // the job-wide index of its first pipeline
  int stages = 1;                       // pipeline_stages
  int replicas = 1;                     // pipelines: world / stages (without PP: every rank is one)
  int ep = 1;                           // expert_parallel: pipelines per expert group
  int tp = 1;                           // tensor_parallel: ranks per position
  std::vector<int64_t> stage_layers;    // layers per stage
  std::vector<int64_t> expert_begin;    // ep+1 entries: member j holds [expert_begin[j], expert_begin[j+1])
  bool holds(int rank) const { return rank >= base && rank < base + world; }
  int stageOf(int rank) const { return ((rank - base) / tp) % stages; }
  int replicaOf(int rank) const { return replica_base + (rank - base) / (tp * stages); }
  int tpRankOf(int rank) const { return (rank - base) % tp; }
  // The ranks of pipeline (job-wide replica) d: [first, end).
  int firstRankOf(int replica) const { return base + (replica - replica_base) * stages * tp; }
  int endRankOf(int replica) const { return firstRankOf(replica) + stages * tp; }
  int64_t layerBegin(int stage) const;
  // Rank d*stages + s (without TP) is stage s of pipeline d; the span's
  // pipelines [g*ep, (g+1)*ep) form its expert group g, its pipeline d is
  // member d % ep (counted from the span's first pipeline).
  int epMemberOf(int rank) const { return (replicaOf(rank) - replica_base) % ep; }
  int epGroupOf(int rank) const { return (replicaOf(rank) - replica_base) / ep; }
};

// The whole job: one span over the world, or (per-island layouts,
// core/island_layout.h) one span per island, in rank order.
struct JobLayout {
  std::vector<ParallelLayout> spans;
  bool per_island = false;  // core::perIslandLayouts: a span per island
  bool perIsland() const { return per_island; }
  const ParallelLayout& of(int rank) const;
  int replicas() const { return spans.empty() ? 0 : spans.back().replica_base + spans.back().replicas; }
  int replicaOf(int rank) const { return of(rank).replicaOf(rank); }
  const ParallelLayout& ofReplica(int replica) const;
  bool anyPipeline() const;
};
// From the job: strategy.stage_layers / expert_counts when given, else from
// the workers' speed (1/slowdown, the slowest of the ranks sharing a stage
// or expert slot) and device memory (catalog). With strategy.kind diloco
// every block of stages x expert_parallel consecutive ranks (one expert
// group of pipelines) must lie inside one island.
core::Result<ParallelLayout> parallelLayout(const core::JobConfig& job);
// Every span of the job: parallelLayout's one, or with per-island layouts
// each island's, from its effective layout (islandLayoutOf).
core::Result<JobLayout> jobLayout(const core::JobConfig& job);

}  // namespace archipelago::runtime::parallel
