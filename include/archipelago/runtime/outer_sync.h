// Cross-island strategies that are not "sync every step" (DiLoCo, streaming
// DiLoCo) plug into the trainer here. With such a strategy each island is
// its own synchronous data-parallel group for the inner steps (the trainer
// reduces gradients over `inner` only) and the OuterSync, called after every
// inner optimizer step on every rank, decides when and how parameters are
// synchronised across islands (over the world group, through the comm
// layer's codecs on the straits).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
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

namespace archipelago::report {
class MetricsSink;
}

namespace archipelago::runtime {

struct OuterContext {
  const core::JobConfig* job = nullptr;
  int rank = 0;
  int world = 1;
  std::vector<int> island_of_rank;           // island index per global rank
  std::shared_ptr<comm::Group> world_group;  // null in single-process runs
  report::MetricsSink* metrics = nullptr;    // may be null: then each rank appends "outer" lines to
                                             // run_dir/metrics.jsonl through its own sink
  std::string run_dir;                       // empty = job->run_dir
  // Optional: offsets into the flat vector where a parameter tensor starts
  // (FlatParams segments, HF order); streaming cuts fragments there.
  std::vector<int64_t> segment_offsets;
  // Per-island layouts (docs/parallelism.md "Per-island layouts"): islands
  // hold the model in different flat layouts, so no rank pairs with
  // another by position; this replaces the cross-island exchange: given
  // the island's pseudo-gradient of fragment `fragment`, its token count
  // and its control sums (empty but for a job's first fragment), it leaves
  // the islands' token-weighted mean and the control values summed over
  // the islands on every rank, and the bytes this rank sent
  // (parallel::IslandBridge::islandMean; strategy.codec bf16 or fp16 with
  // or without error feedback, applied there).
  std::function<core::Status(size_t fragment, std::span<float> delta, double island_tokens,
                             std::vector<double>& control, uint64_t& bytes_sent)>
      mean_by_name;
  // With mean_by_name: this rank's part of each of the job's fragments,
  // which are cut in the single-process layout (so fragment f holds the
  // same tensors on every rank): local offsets [fragment_cuts[f],
  // fragment_cuts[f + 1]), possibly empty here. Empty: the fragments are
  // cut over this rank's buffer (fragmentSchedule).
  std::vector<int64_t> fragment_cuts;
};

class OuterSync {
 public:
  virtual ~OuterSync() = default;
  // Called on every rank after inner step `step` (1-based count of completed
  // steps) with the flat fp32 parameters; may modify them in place. `tokens`
  // = tokens this rank processed in that step.
  // The parameters must be host memory when touchesParams(step) (the
  // anchor and momentum always are: docs/devices.md "Devices").
  virtual core::Status afterInnerStep(int64_t step, torch::Tensor params, int64_t tokens) = 0;
  // Whether afterInnerStep(step) reads or writes the parameters (a fragment
  // is due, or an in-flight result is applied): a worker on an accelerator
  // copies them to the host only then.
  virtual bool touchesParams(int64_t step) const = 0;
  // At the end of training (or a stop): complete any in-flight sync so all
  // replicas end identical. At step == train.steps afterInnerStep starts no
  // sync; finish syncs every fragment with progress in ONE exchange.
  virtual core::Status finish(int64_t step, torch::Tensor params) = 0;
  // The trainer's control values (loss sums, tokens, a stop request; already
  // summed over this rank's island) ride along with the next cross-island
  // exchange this rank starts, instead of a separate world allreduce that
  // would cross the straits once more. Call before afterInnerStep of a step
  // at which fragment 0 is due (every H steps); every rank must attach the
  // same number of values at the same steps.
  virtual void attachControl(std::span<const double> island_sums) = 0;
  // The islands' sum of attached values, once the exchange that carried them
  // was completed by afterInnerStep (DiLoCo: in the same step; streaming:
  // overlap_steps later); each result is returned once.
  struct Control {
    int64_t sent_step = 0;      // the step whose values these are
    std::vector<double> sums;   // summed over all islands (bit-identical on every rank)
  };
  virtual std::optional<Control> takeControl() = 0;
  // Checkpointed state (anchor weights, momentum, fragment schedule).
  virtual NamedTensors stateTensors() const = 0;
  virtual nlohmann::json stateJson() const = 0;
  virtual core::Status restore(const NamedTensors& tensors, const nlohmann::json& state) = 0;
};

// One contiguous piece of the flat parameter vector and its place in the
// sync schedule: it is synchronised after every inner step s >= 1 with
// (s - offset) % H == 0, so any H consecutive steps sync it exactly once.
struct Fragment {
  int64_t begin = 0;   // [begin, end) of the flat vector
  int64_t end = 0;
  int64_t offset = 0;  // in [0, H)
};

// Splits `numel` parameters into `fragments` contiguous, non-empty pieces of
// nearly equal size (each cut moved to the nearest entry of `boundaries`, the
// tensor starts, when that keeps every piece non-empty) with sync offsets
// staggered evenly over H: offset_f = (f * H) / fragments. DiLoCo is the
// special case fragments = 1 (offset 0: sync after steps H, 2H, ...).
core::Result<std::vector<Fragment>> fragmentSchedule(int64_t numel, int64_t fragments, int64_t inner_steps,
                                                     std::span<const int64_t> boundaries = {});
// Indices of the fragments whose sync starts after inner step `step` (>= 1).
std::vector<int> fragmentsDue(const std::vector<Fragment>& fragments, int64_t step, int64_t inner_steps);

// The replica check after an outer step: digests[r] is rank r's digest of
// the state that must be identical everywhere. Ok if all are equal, else
// kDataLoss naming which ranks hold which digest.
core::Status compareReplicaDigests(const std::vector<std::string>& digests, const std::string& what);

// The strategy named by job.strategy.kind ("diloco" | "streaming"); null for
// "sync". `params` are the initial (identical on every rank) parameters.
core::Result<std::unique_ptr<OuterSync>> makeOuterSync(const OuterContext& ctx, const torch::Tensor& params);

}  // namespace archipelago::runtime
