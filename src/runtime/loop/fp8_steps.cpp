// FP8 delayed scaling as the loop runs it (docs/model.md "FP8"): on layouts
// where every rank holds the whole model, each history records by step
// (model::AmaxHistory::deferRecording): the largest amax of each tensor over
// the step's micro-batches, then the largest over the gradient group (one
// small max-allreduce), entered on every rank alike. Every replica then
// scales with the same history, the one a single process training the whole
// batch keeps, and a checkpoint holds it once, beside the optimizer state
// ("fp8.<linear>.<role>": the amaxes newest first, then the step count), so
// a resumed run scales as the uninterrupted one. Layouts that split the
// model keep each rank's own histories, recorded by micro-batch, and do not
// checkpoint them.
#include <algorithm>
#include <map>

#include "archipelago/core/log.h"
#include "archipelago/model/fp8.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

void Trainer::setupFp8Steps() {
  fp8_slots_.clear();
  fp8_shadows_.clear();
  const bool any_fp8 = std::any_of(workers_.begin(), workers_.end(), [](const auto& w) { return w.dtype == "fp8"; }) ||
                       place_.dtype == "fp8";
  if (split() || !any_fp8 || tc_.fp8_recipe != "delayed") return;
  // Every rank lists every convertible linear, so the step's table is the
  // same on all of them; a rank that computes in another dtype keeps
  // shadow histories (its amaxes are 0) so that any writer can checkpoint them.
  const auto modules = net_->named_modules("", /*include_self=*/false);
  for (const std::string& name : model::fp8LinearsOf(*net_)) {
    model::Fp8LinearImpl* f = model::fp8Of(*modules[name]);
    for (const char* role : {"input", "weight", "grad"}) {
      model::AmaxHistory* h = nullptr;
      if (f) {
        h = role[0] == 'i' ? &f->inputHistory() : role[0] == 'w' ? &f->weightHistory() : &f->gradHistory();
      } else {
        h = &fp8_shadows_.emplace_back(tc_.fp8_amax_history);
      }
      h->deferRecording();
      fp8_slots_.push_back({name + "." + role, h});
    }
  }
}

void Trainer::fp8BeginStep() {
  for (auto& slot : fp8_slots_) (void)slot.history->takePending();  // a retried step's amaxes start again
}

core::Status Trainer::fp8EndStep() {
  if (fp8_slots_.empty()) return core::okStatus();
  // One copy to the host and one back for all of them: a read per history
  // would wait for the device hundreds of times a step. (A rank's slots
  // all lie on one device: its modules', or the CPU for shadows.)
  std::vector<torch::Tensor> pending;
  pending.reserve(fp8_slots_.size());
  for (auto& slot : fp8_slots_) pending.push_back(slot.history->takePending());
  const torch::Tensor local = torch::stack(pending);
  torch::Tensor host = local.to(torch::kCPU, torch::kDouble).contiguous();
  ARCH_RETURN_IF_ERROR(grad_dp_->allreduceMax(std::span<double>(host.data_ptr<double>(), static_cast<size_t>(host.numel())))
                           .withContext("FP8 amaxes of the step"));
  const torch::Tensor step_amax = host.to(local.options());
  for (size_t i = 0; i < fp8_slots_.size(); ++i) fp8_slots_[i].history->commit(step_amax[static_cast<int64_t>(i)]);
  return core::okStatus();
}

void Trainer::snapshotFp8(CheckpointState& s) const {
  for (const auto& slot : fp8_slots_) {
    auto amaxes = slot.history->amaxes().to(torch::kCPU);
    auto steps = torch::full({1}, static_cast<float>(std::min<int64_t>(slot.history->steps(), 1 << 24)));
    s.optimizer.push_back({"fp8." + slot.name, torch::cat({amaxes, steps})});
  }
}

void Trainer::resumeFp8(const std::string& dir, const CheckpointState& ck) {
  if (fp8_slots_.empty()) return;
  std::map<std::string, torch::Tensor> saved;
  for (const auto& [name, t] : ck.optimizer) {
    if (name.rfind("fp8.", 0) == 0) saved[name.substr(4)] = t;
  }
  size_t restored = 0;
  for (auto& slot : fp8_slots_) {
    auto it = saved.find(slot.name);
    if (it == saved.end() || it->second.numel() != slot.history->length() + 1) continue;
    const torch::Tensor t = it->second.to(torch::kFloat);
    slot.history->restore(t.narrow(0, 0, slot.history->length()), static_cast<int64_t>(t[-1].item<float>()));
    ++restored;
  }
  if (rank_ == 0 && restored < fp8_slots_.size()) {
    ARCH_LOG_WARN("{}: {} of {} FP8 amax histories restored (the others start empty: a checkpoint without FP8, or "
                  "another train.fp8_amax_history)", dir, restored, fp8_slots_.size());
  }
}

}  // namespace archipelago::runtime::loop
