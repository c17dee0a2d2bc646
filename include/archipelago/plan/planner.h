// The planner: maps a model onto a cluster of islands. The cluster is split
// into groups of islands; a group with one island trains its own replicas
// (TP x PP x DP inside the island); a group of several islands runs
// pipelines whose stages span those islands (uneven contiguous layer split
// sized to each device's speed and memory). Groups are joined by sync data
// parallelism or DiLoCo across the straits, with batch shares proportional to
// each group's throughput. Every candidate is priced by the CostModel;
// memory-infeasible ones are rejected with a reason.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/plan/calibration.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/plan/cost_model.h"
#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {

// A link the plan's traffic crosses (a strait, or an island's scale-out
// network as seen by one device).
struct LinkInfo {
  std::string name;
  double bandwidth = 0;  // bytes/s per direction
  double latency = 0;    // seconds
  bool strait = false;
};

// One pipeline stage of a group's representative replica.
struct StagePlan {
  int island = 0;              // cluster island index
  std::string device;          // device kind
  int64_t tp = 1;
  int64_t first_item = 0;      // items: 0 embedding, 1..L layers, L+1 head
  int64_t num_items = 0;
  double fwd_s = 0;            // per micro-batch
  double bwd_s = 0;
  double memory_bytes = 0;     // peak per device
  double memory_capacity = 0;
  double act_bytes_per_mb = 0;
  double p2p_bytes = 0;        // activation bytes sent to the next stage per micro-batch
  int p2p_link = -1;           // index into Plan::links (-1 for the last stage)
  double p2p_weight = 1;       // identical flows sharing that link (other replicas)
  double dp_bytes = 0;         // gradient bytes this device reduces per step
  int64_t dp_group = 1;
  int dp_link = -1;
  double dp_s = 0;             // reduce-scatter + allgather time
  double optimizer_s = 0;
  double model_flops_per_mb = 0;  // per device
};

struct GroupPlan {
  std::vector<int> islands;    // in pipeline order
  std::vector<int64_t> tp;     // per island
  std::vector<int64_t> pp;     // stages per island
  int64_t dp = 1;              // pipeline replicas
  int64_t ep = 1;
  int64_t micro_batch = 1;     // sequences per micro-batch
  int64_t micro_batches = 1;   // per replica per step
  int64_t virtual_stages = 1;
  Schedule schedule = Schedule::k1F1B;
  Recompute recompute = Recompute::kNone;
  int zero = 1;
  std::vector<StagePlan> stages;
  double batch_sequences = 0;  // sequences per step for the whole group
  // Predictions.
  double step_s = 0;
  double pipeline_s = 0;
  double bubble_fraction = 0;
  double dp_exposed_s = 0;
  int64_t devices = 0;
};

struct DeviceKindStats {
  std::string kind;
  int64_t devices = 0;
  double mfu = 0;              // model FLOPs / (devices * bf16 peak)
  double tflops_per_device = 0;  // model FLOP/s per device
  double max_memory_bytes = 0;
  double memory_capacity = 0;
};

struct StraitTraffic {
  std::string name;
  double bytes_per_step = 0;   // both directions summed over the step (amortised for DiLoCo)
  double busy_s = 0;           // seconds the strait is busy per step
};

struct Plan {
  std::string model;
  std::string cluster;
  std::string strategy = "sync";  // sync | diloco (cross-group)
  int64_t diloco_h = 1;
  std::string codec = "bf16";
  TrainSetup setup;
  std::vector<GroupPlan> groups;
  std::vector<LinkInfo> links;
  // Cross-group sync: per-step bytes on each strait link (before amortising).
  std::vector<std::pair<int, double>> sync_flows;  // (link index, bytes)
  double sync_s = 0;           // one full cross-group sync
  // Predictions.
  double step_s = 0;
  double tokens_per_s = 0;
  double mfu = 0;
  double bubble_fraction = 0;
  double total_params = 0;
  double active_params = 0;
  int64_t devices = 0;
  std::vector<DeviceKindStats> kinds;
  std::vector<StraitTraffic> straits;
  std::string summary;         // one line: layout per group

  std::string toJson() const;   // full plan (simulate reads it back)
  static core::Result<Plan> fromJson(const std::string& text);
};

struct PlanOptions {
  TrainSetup setup;
  int top_k = 5;
  std::string strategy = "auto";  // auto | sync | diloco
  int64_t diloco_h = 100;
  std::string diloco_codec = "int8";
  std::string sync_codec = "bf16";
  // auto picks DiLoCo when sync's exposed strait time exceeds this fraction of the step.
  double auto_diloco_threshold = 0.10;
  int max_examples = 3;          // rejected examples kept per reason (--explain)
  bool allow_spanning = true;    // consider pipelines spanning islands
};

struct RejectStats {
  std::map<std::string, int64_t> counts;
  std::map<std::string, std::vector<std::string>> examples;
  void add(const std::string& reason, const std::string& example, int max_examples);
};

struct PlanResult {
  std::vector<Plan> plans;      // best first
  RejectStats rejected;
  int64_t evaluated = 0;
  double search_s = 0;
};

core::Result<PlanResult> searchPlans(const core::ClusterSpec& cluster, const ModelSpec& model,
                                     const DeviceCatalog& catalog, const PlanOptions& options,
                                     const CalibrationProfile* profile = nullptr);

// A fixed parallel layout for one group (published runs, user overrides).
struct FixedLayout {
  std::vector<int> islands;        // cluster island indices, pipeline order
  std::vector<int64_t> tp;         // per island
  std::vector<int64_t> pp;         // per island
  int64_t dp = 1;
  int64_t ep = 1;
  int64_t micro_batch = 1;
  int64_t virtual_stages = 1;
  Schedule schedule = Schedule::k1F1B;
  Recompute recompute = Recompute::kNone;
  int zero = 1;
  std::vector<int64_t> stage_items;  // empty = balanced by the planner
};

// Prices one fixed layout covering the given groups (strategy from options;
// "auto" means sync). Fails with the rejection reason if infeasible.
core::Result<Plan> evaluateLayout(const core::ClusterSpec& cluster, const ModelSpec& model,
                                  const DeviceCatalog& catalog, const PlanOptions& options,
                                  const std::vector<FixedLayout>& groups,
                                  const CalibrationProfile* profile = nullptr);

// Readable table of plans (top-K) and rejection counts.
std::string formatPlans(const PlanResult& result, bool explain);
std::string formatPlan(const Plan& plan);

}  // namespace archipelago::plan
