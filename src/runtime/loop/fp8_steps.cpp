// FP8 delayed scaling as the loop runs it (docs/model.md "FP8"): each
// history records by step (model::AmaxHistory::deferRecording): the largest
// amax of each tensor over the step's micro-batches, then the largest over
// the gradient group (one small max-allreduce), entered on every rank alike.
// The table of that allreduce lists every FP8 linear of the whole model by
// name, the same on every rank whatever its part: a rank puts its amaxes in
// the rows of the linears it computes and 0 elsewhere. The maximum is then
// over the ranks that hold a linear or part of it (the replicas of a
// pipeline stage or an expert, a tensor-parallel group's slices of one
// weight and of one batch), and every rank scales with the history a single
// process training the whole batch keeps. Every rank keeps every row (shadow
// histories for what it does not compute), so the checkpoint's writer holds
// them all, once, beside the optimizer state ("fp8.<linear>.<role>": the
// amaxes newest first, then the step count), and a resumed run scales as the
// uninterrupted one.
#include <algorithm>
#include <map>

#include "archipelago/core/log.h"
#include "archipelago/model/fp8.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

namespace {
torch::Tensor indexTensor(const std::vector<int64_t>& v) {
  torch::Tensor t = torch::empty({static_cast<int64_t>(v.size())}, torch::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}
}  // namespace

void Trainer::setupFp8Steps() {
  fp8_slots_.clear();
  const bool any_fp8 = std::any_of(workers_.begin(), workers_.end(), [](const auto& w) { return w.dtype == "fp8"; }) ||
                       place_.dtype == "fp8";
  if (!any_fp8 || tc_.fp8_recipe != "delayed") return;
  // A linear this rank does not compute in FP8 (another stage's or expert's,
  // or any on a rank whose island computes in another dtype) is a row of
  // the shadow table: 0 in this rank's amaxes, the others' after the allreduce.
  const auto modules = net_->named_modules("", /*include_self=*/false);
  std::vector<int64_t> real, shadow;
  for (const std::string& name : model::fp8LinearsOf(mcfg_)) {
    model::Fp8LinearImpl* f = modules.contains(name) ? model::fp8Of(*modules[name]) : nullptr;
    for (const char* role : {"input", "weight", "grad"}) {
      model::AmaxHistory* h = nullptr;
      if (f) {
        h = role[0] == 'i' ? &f->inputHistory() : role[0] == 'w' ? &f->weightHistory() : &f->gradHistory();
        h->deferRecording();
      }
      (h ? real : shadow).push_back(static_cast<int64_t>(fp8_slots_.size()));
      fp8_slots_.push_back({name + "." + role, h});
    }
  }
  fp8_real_ = std::move(real);
  fp8_shadow_rows_ = std::move(shadow);
  fp8_shadow_ = torch::zeros({static_cast<int64_t>(fp8_shadow_rows_.size()), tc_.fp8_amax_history + 1}, torch::kFloat);
}

void Trainer::fp8BeginStep() {
  for (auto& slot : fp8_slots_) {
    if (slot.history) (void)slot.history->takePending();  // a retried step's amaxes start again
  }
}

core::Status Trainer::fp8EndStep() {
  if (fp8_slots_.empty()) return core::okStatus();
  // One copy off the device and one back for all of them: a read per
  // history would wait for the device hundreds of times a step.
  std::vector<torch::Tensor> pending;
  for (auto& slot : fp8_slots_) {
    if (slot.history) pending.push_back(slot.history->takePending());
  }
  torch::Tensor host = torch::zeros({static_cast<int64_t>(fp8_slots_.size())}, torch::kDouble);
  if (!pending.empty()) host.index_copy_(0, indexTensor(fp8_real_), torch::stack(pending).to(torch::kCPU, torch::kDouble));
  ARCH_RETURN_IF_ERROR(grad_dp_->allreduceMax(std::span<double>(host.data_ptr<double>(), static_cast<size_t>(host.numel())))
                           .withContext("FP8 amaxes of the step"));
  if (!pending.empty()) {
    const torch::Tensor mine = host.index_select(0, indexTensor(fp8_real_)).to(pending.front().options());
    for (size_t i = 0; i < fp8_real_.size(); ++i) {
      fp8_slots_[static_cast<size_t>(fp8_real_[i])].history->commit(mine[static_cast<int64_t>(i)]);
    }
  }
  if (fp8_shadow_.size(0) > 0) {  // the same rule as AmaxHistory::commit, on every row at once
    const int64_t length = fp8_shadow_.size(1) - 1;
    const torch::Tensor newest = host.index_select(0, indexTensor(fp8_shadow_rows_)).to(torch::kFloat).unsqueeze(1);
    fp8_shadow_ = torch::cat({newest, fp8_shadow_.narrow(1, 0, length - 1), fp8_shadow_.narrow(1, length, 1) + 1}, 1);
  }
  return core::okStatus();
}

torch::Tensor Trainer::fp8State() const {
  if (fp8_slots_.empty()) return {};
  torch::Tensor state = torch::empty({static_cast<int64_t>(fp8_slots_.size()), fp8_shadow_.size(1)}, torch::kFloat);
  std::vector<torch::Tensor> amaxes;
  std::vector<float> steps;
  for (const auto& slot : fp8_slots_) {
    if (!slot.history) continue;
    amaxes.push_back(slot.history->amaxes());
    steps.push_back(static_cast<float>(std::min<int64_t>(slot.history->steps(), 1 << 24)));
  }
  if (!amaxes.empty()) {
    const torch::Tensor steps_col = torch::tensor(steps, torch::kFloat).unsqueeze(1);
    state.index_copy_(0, indexTensor(fp8_real_), torch::cat({torch::stack(amaxes).to(torch::kCPU, torch::kFloat), steps_col}, 1));
  }
  if (fp8_shadow_.size(0) > 0) state.index_copy_(0, indexTensor(fp8_shadow_rows_), fp8_shadow_);
  return state;
}

void Trainer::loadFp8State(const torch::Tensor& state) {
  const torch::Tensor s = state.to(torch::kCPU, torch::kFloat);
  for (size_t i = 0; i < fp8_slots_.size(); ++i) {
    if (fp8_slots_[i].history) loadFp8Row(*fp8_slots_[i].history, s[static_cast<int64_t>(i)]);
  }
  if (fp8_shadow_.size(0) > 0) fp8_shadow_ = s.index_select(0, indexTensor(fp8_shadow_rows_)).clone();
}

void Trainer::loadFp8Row(model::AmaxHistory& h, const torch::Tensor& row) {
  const torch::Tensor t = row.to(torch::kCPU, torch::kFloat);
  h.restore(t.narrow(0, 0, h.length()), static_cast<int64_t>(t[-1].item<float>()));
}

void Trainer::snapshotFp8(CheckpointState& s) const {
  const torch::Tensor state = fp8State();
  for (size_t i = 0; i < fp8_slots_.size(); ++i) {
    s.optimizer.push_back({"fp8." + fp8_slots_[i].name, state[static_cast<int64_t>(i)].clone()});
  }
}

// By name: a checkpoint of another layout (or none with FP8) restores what
// it has, and says how much.
void Trainer::resumeFp8(const std::string& dir, const CheckpointState& ck) {
  if (fp8_slots_.empty()) return;
  std::map<std::string, torch::Tensor> saved;
  for (const auto& [name, t] : ck.optimizer) {
    if (name.rfind("fp8.", 0) == 0) saved[name.substr(4)] = t;
  }
  torch::Tensor state = fp8State();
  size_t restored = 0;
  for (size_t i = 0; i < fp8_slots_.size(); ++i) {
    auto it = saved.find(fp8_slots_[i].name);
    if (it == saved.end() || it->second.numel() != state.size(1)) continue;
    state[static_cast<int64_t>(i)].copy_(it->second.reshape({-1}));
    ++restored;
  }
  loadFp8State(state);
  if (rank_ == 0 && restored < fp8_slots_.size()) {
    ARCH_LOG_WARN("{}: {} of {} FP8 amax histories restored (the others start empty: a checkpoint without FP8, or "
                  "another train.fp8_amax_history)", dir, restored, fp8_slots_.size());
  }
}

}  // namespace archipelago::runtime::loop
