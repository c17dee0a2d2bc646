// Private to the plan layer: the planner's working state, shared by the
// evaluation (planner.cpp) and the search (planner_search.cpp).
#pragma once

#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "archipelago/plan/planner.h"

namespace archipelago::plan::detail {

// Bytes per element a cross-island codec puts on the wire (with scales).
double codecBytes(const std::string& codec);

class Planner {
 public:
  Planner(const core::ClusterSpec& cluster, const ModelSpec& model, const DeviceCatalog& catalog,
          const PlanOptions& options, const CalibrationProfile* profile);
  core::Status init(const DeviceCatalog& catalog);

  // Prices one group's layout at `batch_seqs` sequences per step; on
  // rejection returns false with a reason class and a readable example.
  bool evaluateGroup(const FixedLayout& layout, double batch_seqs, GroupPlan& out, std::string& reason,
                     std::string& example);
  // Joins groups (batch shares, cross-group strategy) into a full plan.
  core::Result<Plan> combine(const std::vector<FixedLayout>& layouts, const std::string& strategy);
  std::string layoutTag(const FixedLayout& layout) const;
  int straitLink(int a, int b) const;

  const core::ClusterSpec& cluster() const { return cluster_; }
  const ModelSpec& model() const { return model_; }
  const PlanOptions& options() const { return options_; }
  const std::vector<DeviceSpec>& devices() const { return devs_; }
  const CostModel& costModel() const { return cm_; }
  int64_t evaluated() const { return evaluated_; }

 private:
  const std::vector<ItemCost>& items(int island, int64_t tp, int64_t ep, int64_t mb, Recompute rc);

  core::ClusterSpec cluster_;
  ModelSpec model_;
  PlanOptions options_;
  CostModel cm_;
  std::vector<DeviceSpec> devs_;      // per island
  std::vector<StageLinks> links_;     // per island
  std::vector<LinkInfo> plan_links_;  // [0, islands) island networks, then straits
  std::vector<int> strait_link_;      // islands x islands -> plan link index or -1
  std::map<std::tuple<int, int64_t, int64_t, int64_t, int>, std::vector<ItemCost>> item_cache_;
  int64_t evaluated_ = 0;
};

}  // namespace archipelago::plan::detail
