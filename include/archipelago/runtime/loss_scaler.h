// Dynamic loss scaling for fp16 compute (docs/devices.md "Dtypes"): the
// loss is multiplied by a power of two before backward so that small
// gradients survive fp16's narrow range, and the fp32 gradients are divided
// by it again (exactly: a power of two) before clipping and the optimizer.
// A step whose global gradient norm is not finite is skipped and the scale
// halved; `window` finite steps in a row double it. Every replica sees the
// same norm (it is computed from the reduced gradient), so all skip the
// same steps and their weights stay identical.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime {

class LossScaler {
 public:
  // train.loss_scale: "auto" is dynamic for fp16 compute, off otherwise.
  LossScaler(const core::TrainConfig& tc, const std::string& compute_dtype);

  bool enabled() const { return enabled_; }
  double scale() const { return enabled_ ? scale_ : 1.0; }
  // After the step's gradient norm (of unscaled gradients): true if the
  // optimizer may apply it. Without scaling always true.
  bool update(bool finite_norm);
  int64_t skippedSteps() const { return skipped_; }

  nlohmann::json state() const;
  core::Status load(const nlohmann::json& state);

 private:
  bool enabled_ = false;
  double scale_ = 1.0;
  int64_t window_ = 1000;
  int64_t good_ = 0;     // finite steps since the last change
  int64_t skipped_ = 0;  // steps skipped for overflow, in all
};

}  // namespace archipelago::runtime
