// Where every rank of a pipeline / expert-parallel job sits: the uneven
// layer split, the expert placement and the layout of the job's ranks.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "archipelago/core/island_layout.h"
#include "archipelago/core/log.h"
#include "archipelago/core/shares.h"
#include "archipelago/model/layers.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/runtime/parallel/layout.h"
#include "archipelago/runtime/trainer.h"

namespace archipelago::runtime::parallel {

core::Result<std::vector<int64_t>> splitLayers(int64_t n_layers, const std::vector<double>& speed,
                                               const std::vector<int64_t>& max_layers, double first_extra,
                                               double last_extra) {
  const int p = static_cast<int>(speed.size());
  if (p < 1) return core::invalidArgument("splitLayers: no stages");
  if (n_layers < p) {
    return core::invalidArgument("model.n_layers (" + std::to_string(n_layers) + ") is smaller than the " +
                                 std::to_string(p) + " pipeline stages; every stage needs >= 1 layer");
  }
  for (double s : speed) {
    if (!(s > 0) || !std::isfinite(s)) return core::invalidArgument("splitLayers: a stage speed is not > 0");
  }
  auto cap = [&](int s) -> int64_t {
    if (static_cast<size_t>(s) >= max_layers.size() || max_layers[static_cast<size_t>(s)] <= 0) return n_layers;
    return max_layers[static_cast<size_t>(s)];
  };
  auto cost = [&](int s, int64_t k) {
    double extra = (s == 0 ? first_extra : 0.0) + (s == p - 1 ? last_extra : 0.0);
    return (static_cast<double>(k) + extra) / speed[static_cast<size_t>(s)];
  };
  // best[s][l]: smallest possible slowest-stage time when stages 0..s hold
  // the first l layers; choice[s][l]: layers of stage s in that optimum.
  const double inf = std::numeric_limits<double>::infinity();
  const size_t L = static_cast<size_t>(n_layers);
  std::vector<std::vector<double>> best(static_cast<size_t>(p), std::vector<double>(L + 1, inf));
  std::vector<std::vector<int64_t>> choice(static_cast<size_t>(p), std::vector<int64_t>(L + 1, 0));
  for (int64_t l = 1; l <= std::min<int64_t>(n_layers, cap(0)); ++l) {
    best[0][static_cast<size_t>(l)] = cost(0, l);
    choice[0][static_cast<size_t>(l)] = l;
  }
  for (int s = 1; s < p; ++s) {
    for (int64_t l = s + 1; l <= n_layers; ++l) {
      for (int64_t k = 1; k <= std::min<int64_t>(l - s, cap(s)); ++k) {
        double prev = best[static_cast<size_t>(s) - 1][static_cast<size_t>(l - k)];
        double v = std::max(prev, cost(s, k));
        // Ties: keep the earlier stages' choice with more layers (stable, deterministic).
        if (v < best[static_cast<size_t>(s)][static_cast<size_t>(l)] - 1e-12) {
          best[static_cast<size_t>(s)][static_cast<size_t>(l)] = v;
          choice[static_cast<size_t>(s)][static_cast<size_t>(l)] = k;
        }
      }
    }
  }
  if (!std::isfinite(best[static_cast<size_t>(p) - 1][L])) {
    return core::invalidArgument("the " + std::to_string(n_layers) + " layers do not fit in the memory of the " +
                                 std::to_string(p) + " pipeline stages; add stages or devices with more memory");
  }
  std::vector<int64_t> out(static_cast<size_t>(p));
  int64_t l = n_layers;
  for (int s = p - 1; s >= 0; --s) {
    out[static_cast<size_t>(s)] = choice[static_cast<size_t>(s)][static_cast<size_t>(l)];
    l -= out[static_cast<size_t>(s)];
  }
  return out;
}

core::Result<std::vector<int64_t>> placeExperts(int64_t num_experts, const std::vector<double>& speed) {
  if (static_cast<int64_t>(speed.size()) > num_experts) {
    return core::invalidArgument("strategy.expert_parallel (" + std::to_string(speed.size()) +
                                 ") exceeds model.moe.num_experts (" + std::to_string(num_experts) + ")");
  }
  return core::sharesFromWeights(speed, num_experts);
}

int64_t ParallelLayout::layerBegin(int stage) const {
  int64_t b = 0;
  for (int s = 0; s < stage; ++s) b += stage_layers[static_cast<size_t>(s)];
  return b;
}

namespace {

using core::WorkerInfo;

double speedOf(const std::vector<WorkerInfo>& workers, int r) {
  return 1.0 / std::max(1e-9, workers[static_cast<size_t>(r)].slowdown);
}

// Tensor-parallel groups: tp consecutive ranks, all on one island (their
// two allreduces per layer must not cross a strait).
core::Status checkTensorGroups(const std::vector<WorkerInfo>& workers, const ParallelLayout& lay) {
  if (lay.tp <= 1) return core::okStatus();
  if (lay.world % lay.tp != 0) {
    return core::invalidArgument("strategy.tensor_parallel (" + std::to_string(lay.tp) +
                                 ") must divide the number of workers (" + std::to_string(lay.world) + ")");
  }
  for (int r = 0; r < lay.world; ++r) {
    const int first = r / lay.tp * lay.tp;
    if (workers[static_cast<size_t>(r)].island_index != workers[static_cast<size_t>(first)].island_index) {
      return core::invalidArgument("strategy.tensor_parallel (" + std::to_string(lay.tp) + "): ranks " +
                                   std::to_string(first) + ".." + std::to_string(first + lay.tp - 1) +
                                   " form one tensor-parallel group and must sit on one island; make every island's "
                                   "worker count a multiple of " + std::to_string(lay.tp));
    }
  }
  return core::okStatus();
}

// The world, the stage count and the expert-group size must tile each other
// (and, between outer steps of diloco / streaming, each island).
core::Status checkShape(const core::JobConfig& job, const std::vector<WorkerInfo>& workers,
                        const ParallelLayout& lay) {
  if (lay.world < 1) return core::invalidArgument("the cluster spec has no workers");
  // Positions: tensor-parallel groups (checkTensorGroups: tp divides the world).
  const int positions = lay.world / lay.tp;
  const std::string of = lay.tp > 1 ? " (workers / strategy.tensor_parallel)" : "";
  if (positions % lay.stages != 0) {
    return core::invalidArgument("strategy.pipeline_stages (" + std::to_string(lay.stages) +
                                 ") must divide the number of workers" + of + " (" + std::to_string(positions) + ")");
  }
  if (positions % (lay.ep * lay.stages) != 0) {
    return core::invalidArgument("strategy.expert_parallel (" + std::to_string(lay.ep) + ") must divide the number of " +
                                 (lay.stages > 1 ? "pipelines (" + std::to_string(positions / lay.stages) + ")"
                                                 : "workers" + of + " (" + std::to_string(positions) + ")"));
  }
  if (job.strategy.kind != "sync") {
    // Each island trains its own pipelines / expert groups between outer steps.
    const int block = lay.stages * lay.ep * lay.tp;
    for (int r = 0; r < lay.world; ++r) {
      const int first = r / block * block;
      if (workers[static_cast<size_t>(r)].island_index != workers[static_cast<size_t>(first)].island_index) {
        return core::invalidArgument("strategy.kind " + job.strategy.kind + " with strategy.pipeline_stages (" +
                                     std::to_string(lay.stages) + ") x strategy.expert_parallel (" +
                                     std::to_string(lay.ep) + ") x strategy.tensor_parallel (" + std::to_string(lay.tp) +
                                     "): ranks " + std::to_string(first) + ".." + std::to_string(first + block - 1) +
                                     " form one pipeline / expert group and must sit on one island; make every "
                                     "island's worker count a multiple of " + std::to_string(block));
      }
    }
  }
  return core::okStatus();
}

// Per-layer parameters (attention + FFN or all experts) and the head.
struct LayerCost {
  double flops = 0;  // active parameters: the compute of one layer
  double bytes = 0;  // memory of one layer's training state
  double head = 0;   // parameters of the LM head (and of the embedding)
};

LayerCost layerCost(const core::ModelConfig& mc) {
  const double hd = static_cast<double>(mc.dim / mc.n_heads);
  const double attn = static_cast<double>(mc.dim) * hd * static_cast<double>(2 * mc.n_heads + 2 * mc.n_kv_heads);
  const double dense_ffn = 3.0 * static_cast<double>(mc.dim * mc.ffn_hidden);
  const double moe_ffn = 3.0 * static_cast<double>(mc.dim * mc.moe.expert_hidden) * static_cast<double>(mc.moe.num_experts);
  const double active_ffn = mc.moe.num_experts > 0
                                ? 3.0 * static_cast<double>(mc.dim * mc.moe.expert_hidden) * static_cast<double>(mc.moe.top_k)
                                : dense_ffn;
  const double layer_params = attn + (mc.moe.num_experts > 0 ? moe_ffn : dense_ffn);
  LayerCost c;
  c.flops = attn + active_ffn;
  c.head = static_cast<double>(mc.dim * mc.vocab_size);
  // fp32 weights + grads + two AdamW moments = 16 bytes per parameter;
  // activations of the micro-batches in flight are left to the 20% margin.
  c.bytes = 16.0 * layer_params;
  return c;
}

// The layer split from the devices: a stage is as fast as the slowest of the
// devices that run it; its memory is that of the smallest one.
core::Result<std::vector<int64_t>> stageLayersFromDevices(const core::ModelConfig& mc,
                                                          const std::vector<WorkerInfo>& workers,
                                                          const ParallelLayout& lay) {
  auto catalog = plan::DeviceCatalog::builtin();
  const LayerCost cost = layerCost(mc);
  std::vector<double> speed(static_cast<size_t>(lay.stages), 1e300);
  std::vector<int64_t> max_layers(static_cast<size_t>(lay.stages), 0);
  for (int s = 0; s < lay.stages; ++s) {
    double mem = 0;
    for (int r = 0; r < lay.world; ++r) {
      if (lay.stageOf(r) != s) continue;
      speed[static_cast<size_t>(s)] = std::min(speed[static_cast<size_t>(s)], speedOf(workers, r));
      if (catalog.isOk()) {
        auto spec = catalog->get(workers[static_cast<size_t>(r)].device);
        if (spec.isOk() && spec->memory_bytes > 0) mem = mem == 0 ? spec->memory_bytes : std::min(mem, spec->memory_bytes);
      }
    }
    if (mem > 0) {
      const double fixed = 16.0 * cost.head * ((s == 0 ? 1 : 0) + (s == lay.stages - 1 ? 1 : 0));
      // A tensor-parallel rank holds about 1/tp of each layer and of the head.
      const double tp = static_cast<double>(lay.tp);
      max_layers[static_cast<size_t>(s)] =
          std::max<int64_t>(0, static_cast<int64_t>((0.8 * mem - fixed / tp) / (cost.bytes / tp)));
      if (max_layers[static_cast<size_t>(s)] == 0) max_layers[static_cast<size_t>(s)] = -1;  // reported below
    }
  }
  for (int s = 0; s < lay.stages; ++s) {
    if (max_layers[static_cast<size_t>(s)] < 0) {
      return core::invalidArgument("pipeline stage " + std::to_string(s) + " cannot hold even one layer in its device memory");
    }
  }
  return splitLayers(mc.n_layers, speed, max_layers, 0.0, cost.flops > 0 ? cost.head / cost.flops : 0.0);
}

// strategy.stage_layers when given, else the split from the devices.
core::Result<std::vector<int64_t>> stageLayers(const core::JobConfig& job, const core::ModelConfig& mc,
                                               const std::vector<WorkerInfo>& workers, const ParallelLayout& lay) {
  std::vector<int64_t> layers;
  if (!job.strategy.stage_layers.empty()) {
    layers = job.strategy.stage_layers;
  } else if (lay.stages == 1) {
    layers = {mc.n_layers};
  } else {
    ARCH_ASSIGN_OR_RETURN(layers, stageLayersFromDevices(mc, workers, lay));
  }
  int64_t sum = 0;
  for (auto l : layers) sum += l;
  if (static_cast<int>(layers.size()) != lay.stages || sum != mc.n_layers) {
    return core::invalidArgument("strategy.stage_layers must hold " + std::to_string(lay.stages) +
                                 " values summing to model.n_layers (" + std::to_string(mc.n_layers) + ")");
  }
  return layers;
}

// ep+1 boundaries of the experts each member of an expert group holds:
// strategy.expert_counts when given, else by the members' speed.
core::Result<std::vector<int64_t>> expertBegin(const core::JobConfig& job, const core::ModelConfig& mc,
                                               const std::vector<WorkerInfo>& workers, const ParallelLayout& lay) {
  std::vector<int64_t> begin = {0};
  if (lay.ep <= 1) {
    begin.push_back(mc.moe.num_experts);
    return begin;
  }
  std::vector<int64_t> counts = job.strategy.expert_counts;
  if (counts.empty()) {
    std::vector<double> speed(static_cast<size_t>(lay.ep), 1e300);
    for (int r = 0; r < lay.world; ++r) {
      const size_t j = static_cast<size_t>(lay.epMemberOf(r));
      speed[j] = std::min(speed[j], speedOf(workers, r));
    }
    ARCH_ASSIGN_OR_RETURN(counts, placeExperts(mc.moe.num_experts, speed));
  }
  for (auto c : counts) begin.push_back(begin.back() + c);
  if (begin.back() != mc.moe.num_experts) {
    return core::invalidArgument("strategy.expert_counts must sum to model.moe.num_experts (" +
                                 std::to_string(mc.moe.num_experts) + ")");
  }
  return begin;
}

// The layout of `workers` (ranks 0..n-1 of the span) under job.strategy.
core::Result<ParallelLayout> layoutOver(const core::JobConfig& job, const std::vector<WorkerInfo>& workers) {
  ParallelLayout lay;
  lay.world = static_cast<int>(workers.size());
  lay.stages = static_cast<int>(job.strategy.pipeline_stages);
  lay.ep = static_cast<int>(job.strategy.expert_parallel);
  lay.tp = static_cast<int>(job.strategy.tensor_parallel);
  ARCH_RETURN_IF_ERROR(checkTensorGroups(workers, lay));
  ARCH_RETURN_IF_ERROR(checkShape(job, workers, lay));
  lay.replicas = lay.world / (lay.stages * lay.tp);
  ARCH_ASSIGN_OR_RETURN(auto mc, model::resolveModelConfig(job.model));
  ARCH_ASSIGN_OR_RETURN(lay.stage_layers, stageLayers(job, mc, workers, lay));
  ARCH_ASSIGN_OR_RETURN(lay.expert_begin, expertBegin(job, mc, workers, lay));
  return lay;
}

}  // namespace

core::Result<ParallelLayout> parallelLayout(const core::JobConfig& job) {
  return layoutOver(job, workersOf(job.cluster));
}

core::Result<JobLayout> jobLayout(const core::JobConfig& job) {
  JobLayout out;
  if (!core::perIslandLayouts(job)) {
    ARCH_ASSIGN_OR_RETURN(auto lay, parallelLayout(job));
    out.spans.push_back(std::move(lay));
    return out;
  }
  out.per_island = true;
  const auto workers = workersOf(job.cluster);
  int base = 0, replica_base = 0;
  for (size_t i = 0; i < job.cluster.islands.size(); ++i) {
    // The island as a job of its own: its workers, its layout.
    core::JobConfig view = job;
    const core::IslandLayoutSpec l = core::islandLayoutOf(job, i);
    view.strategy.tensor_parallel = l.tensor_parallel;
    view.strategy.pipeline_stages = l.pipeline_stages;
    view.strategy.stage_layers = l.stage_layers;
    std::vector<WorkerInfo> mine;
    for (const auto& w : workers) {
      if (w.island_index == static_cast<int>(i)) mine.push_back(w);
    }
    auto lay = layoutOver(view, mine);
    if (!lay.isOk()) return lay.status().withContext("island '" + job.cluster.islands[i].name + "'");
    lay->base = base;
    lay->replica_base = replica_base;
    base += lay->world;
    replica_base += lay->replicas;
    out.spans.push_back(std::move(lay).value());
  }
  return out;
}

const ParallelLayout& JobLayout::of(int rank) const {
  for (const auto& s : spans) {
    if (s.holds(rank)) return s;
  }
  return spans.back();
}

const ParallelLayout& JobLayout::ofReplica(int replica) const {
  for (const auto& s : spans) {
    if (replica >= s.replica_base && replica < s.replica_base + s.replicas) return s;
  }
  return spans.back();
}

bool JobLayout::anyPipeline() const {
  for (const auto& s : spans) {
    if (s.stages > 1) return true;
  }
  return false;
}

}  // namespace archipelago::runtime::parallel
