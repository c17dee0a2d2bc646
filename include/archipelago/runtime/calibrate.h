// Calibration for the planner's cost model: times the GEMM shapes of the
// configured model with libtorch on this device and records them in a
// plan::CalibrationProfile, so the trainer can print the planner's predicted
// step time next to the measured one (issue: planner and runtime agree).
#pragma once

#include <string>

#include "archipelago/core/config.h"
#include "archipelago/plan/calibration.h"

namespace archipelago::runtime {

// rows = tokens per GEMM (micro-batch samples x seq_len).
plan::CalibrationProfile calibrateLocalMatmuls(const core::ModelConfig& model, int64_t rows, const std::string& kind,
                                               double min_seconds_per_shape = 0.05);

}  // namespace archipelago::runtime
