#include "archipelago/runtime/loss_scaler.h"

#include <cmath>

namespace archipelago::runtime {

namespace {
// Scales stay powers of two, so scaling and unscaling are exact.
double powerOfTwoAtMost(double x) { return std::exp2(std::floor(std::log2(std::max(1.0, x)))); }
}  // namespace

LossScaler::LossScaler(const core::TrainConfig& tc, const std::string& compute_dtype)
    : enabled_(tc.loss_scale == "dynamic" || (tc.loss_scale == "auto" && compute_dtype == "fp16")),
      scale_(powerOfTwoAtMost(tc.loss_scale_init)),
      window_(std::max<int64_t>(1, tc.loss_scale_window)) {}

bool LossScaler::update(bool finite_norm) {
  if (!enabled_) return true;
  if (!finite_norm) {
    scale_ = std::max(1.0, scale_ / 2);
    good_ = 0;
    ++skipped_;
    return false;
  }
  if (++good_ >= window_) {
    // Stay well inside fp32's range: the scaled loss must stay finite.
    scale_ = std::min(scale_ * 2, std::exp2(100.0));
    good_ = 0;
  }
  return true;
}

nlohmann::json LossScaler::state() const {
  return {{"enabled", enabled_}, {"scale", scale_}, {"good_steps", good_}, {"skipped_steps", skipped_}};
}

core::Status LossScaler::load(const nlohmann::json& s) {
  if (s.is_null()) return core::okStatus();  // a checkpoint from before loss scaling: keep the initial state
  if (!s.is_object() || !s.contains("scale") || !s["scale"].is_number() || !s.contains("good_steps") ||
      !s["good_steps"].is_number_integer()) {
    return core::dataLoss("loss_scale state: expected {scale, good_steps, ...}, got " + s.dump());
  }
  const double scale = s["scale"].get<double>();
  if (!(scale >= 1) || !std::isfinite(scale)) return core::dataLoss("loss_scale state: scale " + std::to_string(scale));
  if (!enabled_) return core::okStatus();  // the resumed job does not scale
  scale_ = powerOfTwoAtMost(scale);
  good_ = s["good_steps"].get<int64_t>();
  skipped_ = s.value("skipped_steps", int64_t{0});
  return core::okStatus();
}

}  // namespace archipelago::runtime
