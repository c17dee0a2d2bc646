// The planner's memory model for this worker (plan/worker_memory.h) beside
// what it measures: the most bytes of CPU tensors live at once in a step
// (model/tensor_memory.h), recorded as each step record's
// tensor_peak_bytes; rank 0 logs both at the end.
#include <algorithm>

#include "archipelago/core/log.h"
#include "archipelago/model/tensor_memory.h"
#include "archipelago/plan/model_spec.h"
#include "archipelago/plan/worker_memory.h"
#include "archipelago/runtime/parallel/micro_batches.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

plan::WorkerLayout Trainer::memoryLayout() const {
  plan::WorkerLayout w;
  w.seq_len = T_;
  const int64_t share = std::max<int64_t>(1, shares_[static_cast<size_t>(share_index_)]);
  w.micro_batch = tc_.micro_batch > 0 ? std::min(tc_.micro_batch, share) : share;
  w.micro_batches = parallel::microCount(share, tc_.micro_batch);
  w.tp = lay_.tp;
  w.tp_rank = tp_rank_;
  w.sequence_parallel = job_.strategy.sequence_parallel && tp_;
  w.stages = lay_.stages;
  w.stage = stage_;
  w.layer_begin = pp_ ? lay_.layerBegin(stage_) : 0;
  w.layer_end = pp_ ? w.layer_begin + lay_.stage_layers[static_cast<size_t>(stage_)] : mcfg_.n_layers;
  w.recompute = tc_.recompute && pp_;
  w.zero = zeroInUse();
  w.zero_group = w.zero >= 1 && zeroGroup() != nullptr ? zeroGroup()->size() : 1;
  w.elastic = elastic() && !split();
  w.compute_bytes = place_.dtype == "fp32" ? 4.0 : 2.0;
  w.fused_attention = false;  // the CPU path (model/torch_compat.h fusedCausalAttention)
  if (ep_) {
    const auto member = static_cast<size_t>(lay_.epMemberOf(rank_));
    w.ep = lay_.ep;
    w.experts_held = lay_.expert_begin[member + 1] - lay_.expert_begin[member];
    w.expert_zero_group = w.zero >= 1 && expert_dp_ ? expert_dp_->size() : 1;
  }
  return w;
}

void Trainer::predictMemory() {
  if (!place_.device.is_cpu() || !model::tensorMemoryTracked()) return;  // measured for host tensors only
  auto spec = plan::fromModelConfig(mcfg_);
  if (!spec.isOk()) return;
  spec->vocab = mcfg_.vocab_size;
  auto pred = plan::predictWorkerMemory(*spec, memoryLayout());
  if (!pred.isOk()) {
    if (rank_ == 0) ARCH_LOG_INFO("no memory prediction: {}", pred.status().message());
    return;
  }
  predicted_tensor_bytes_ = pred->total();
  if (rank_ == 0) ARCH_LOG_INFO("memory: predicted peak of tensors {}", pred->detail);
  if (opt_.write_metrics) {
    metrics_.write(report::MemoryRecord{.rank = rank_, .predicted_bytes = pred->total(),
                                        .state_bytes = pred->state_bytes, .rollback_bytes = pred->rollback_bytes,
                                        .activation_bytes = pred->activation_bytes, .detail = pred->detail});
  }
  // The steps' peaks from here on (the calibration before is not a step).
  model::resetTensorMemoryPeak();
}

void Trainer::noteTensorPeak() {
  if (model::tensorMemoryTracked()) measured_tensor_peak_ = std::max(measured_tensor_peak_, model::tensorMemory().peak);
}

void Trainer::logMemory() const {
  if (rank_ != 0 || predicted_tensor_bytes_ <= 0 || measured_tensor_peak_ <= 0) return;
  const double m = static_cast<double>(measured_tensor_peak_);
  ARCH_LOG_INFO("tensor memory: predicted {:.0f} MB, measured peak {:.0f} MB ({:+.0f}%)", predicted_tensor_bytes_ / 1e6,
                m / 1e6, 100.0 * (predicted_tensor_bytes_ - m) / m);
}

}  // namespace archipelago::runtime::loop
