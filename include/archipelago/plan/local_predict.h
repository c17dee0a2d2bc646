// Predicted step time of our own small runs (CPU workers on this machine,
// emulated straits), for the trainer to print next to the measured time.
#pragma once

#include <cstdint>
#include <string>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/plan/calibration.h"
#include "archipelago/plan/catalog.h"

namespace archipelago::plan {

struct StepPrediction {
  double compute_s = 0;     // slowest worker's forward+backward of its share
  double comm_s = 0;        // gradient reduction (amortised for DiLoCo)
  double optimizer_s = 0;
  double overhead_s = 0;
  double total_s = 0;
  double model_flops = 0;   // per step, all workers
  std::string detail;       // one readable line
};

// job: the resolved job (cluster, model, train, strategy, data.seq_len);
// vocab: the tokenizer's vocabulary (job.model.vocab_size may be 0).
core::Result<StepPrediction> predictStepTime(const core::JobConfig& job, int64_t vocab,
                                             const DeviceCatalog& catalog,
                                             const CalibrationProfile* profile);

}  // namespace archipelago::plan
