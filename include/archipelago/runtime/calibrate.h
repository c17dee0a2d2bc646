// Calibration for the planner's cost model, measured with libtorch on this
// host and recorded in a plan::CalibrationProfile:
//  * calibrateLocalMatmuls: achieved FLOP/s of the GEMM shapes of a model
//    (what the planner's per-op cost model uses for any layer shape);
//  * calibrateLocalModel: the job's own model as the trainer runs it:
//    forward (loss) and backward of the whole model at the workers'
//    micro-batch sizes (attention, softmax, norms, MoE routing and autograd
//    included), the optimizer step (grad norm + AdamW) per parameter, the
//    host's cores and other load, and how much slower a worker's step gets
//    when the job's workers run at once on this host (the co-run factors),
//    so the trainer can print the planner's predicted step time next to the
//    measured one (plan::predictStepTime). Single-threaded workers are timed
//    in thread CPU seconds (median of the runs), which a busy host does not
//    inflate.
#pragma once

#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/plan/calibration.h"

namespace archipelago::runtime {

// rows = tokens per GEMM (micro-batch samples x seq_len).
plan::CalibrationProfile calibrateLocalMatmuls(const core::ModelConfig& model, int64_t rows, const std::string& kind,
                                               double min_seconds_per_shape = 0.05);

// job.model.vocab_size must be resolved (> 0). samples: micro-batch sizes
// (in sequences of job.data.seq_len tokens) to time; two or more distinct
// sizes let the profile separate a fixed per-call cost from the per-token
// cost. Runs with the current torch thread count. The co-run factors run
// job.cluster.worldSize() copies (at most 8) in threads of this process.
core::Status calibrateLocalModel(const core::JobConfig& job, const std::vector<int64_t>& samples,
                                 const std::string& kind, plan::CalibrationProfile& profile,
                                 double min_seconds_per_point = 0.1);

}  // namespace archipelago::runtime
