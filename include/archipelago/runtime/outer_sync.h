// Cross-island strategies that are not "sync every step" (DiLoCo, streaming
// DiLoCo) plug into the trainer here. With such a strategy each island is
// its own synchronous data-parallel group for the inner steps (the trainer
// reduces gradients over `inner` only) and the OuterSync, called after every
// inner optimizer step on every rank, decides when and how parameters are
// synchronised across islands (over the world group, through the comm
// layer's codecs on the straits).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/checkpoint.h"

namespace archipelago::comm {
class Group;
}

namespace archipelago::runtime {

class MetricsSink;

struct OuterContext {
  const core::JobConfig* job = nullptr;
  int rank = 0;
  int world = 1;
  std::vector<int> island_of_rank;           // island index per global rank
  std::shared_ptr<comm::Group> world_group;  // null in single-process runs
  MetricsSink* metrics = nullptr;            // may be null
};

class OuterSync {
 public:
  virtual ~OuterSync() = default;
  // Called on every rank after inner step `step` (1-based count of completed
  // steps) with the flat fp32 parameters; may modify them in place. `tokens`
  // = tokens this rank processed in that step.
  virtual core::Status afterInnerStep(int64_t step, torch::Tensor params, int64_t tokens) = 0;
  // At the end of training (or a stop): complete any in-flight sync so all
  // replicas end identical.
  virtual core::Status finish(int64_t step, torch::Tensor params) = 0;
  // Checkpointed state (anchor weights, momentum, fragment schedule).
  virtual NamedTensors stateTensors() const = 0;
  virtual nlohmann::json stateJson() const = 0;
  virtual core::Status restore(const NamedTensors& tensors, const nlohmann::json& state) = 0;
};

// The strategy named by job.strategy.kind ("diloco" | "streaming"); null for
// "sync". `params` are the initial (identical on every rank) parameters.
core::Result<std::unique_ptr<OuterSync>> makeOuterSync(const OuterContext& ctx, const torch::Tensor& params);

}  // namespace archipelago::runtime
