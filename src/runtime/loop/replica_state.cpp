// The replica state of the loop as one unit: the in-memory rollback point
// of elastic runs (commit / rollback), its digest, and its transfer to
// ranks that need it (a joiner, a replica behind or divergent).
#include <algorithm>
#include <cstring>
#include <map>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/elastic.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

void Trainer::commit(bool refresh_outer) {
  torch::NoGradGuard ng;
  commit_.step = step_;
  commit_.position = train_sampler_->position();
  commit_.adam_t = adam_->stepCount();
  commit_.scaler = scaler_->state();
  commit_.shares = shares_;
  commit_.losses = summary_.losses.size();
  commit_.params.copy_(flat_->params());
  commit_.m.copy_(adam_->expAvg());
  commit_.v.copy_(adam_->expAvgSq());
  for (size_t i = 0; i < buffers_.size(); ++i) commit_.buffers[i].copy_(buffers_[i].second);
  commit_.fp8 = fp8State();
  if (outer_ && exact_outer_) {
    // Anchor and momentum change only in steps where a fragment is due;
    // nothing is in flight between steps (overlap 0), so this never waits.
    commit_.outer_json = outer_->stateJson();
    if (refresh_outer || !commit_.outer_valid ||
        !fragmentsDue(outer_frags_, step_ + 1, job_.strategy.inner_steps).empty()) {
      commit_.outer_tensors.clear();
      for (const auto& [name, t] : outer_->stateTensors()) commit_.outer_tensors.push_back({name, t.detach().clone()});
      commit_.outer_valid = true;
    }
  }
}

void Trainer::rollback() {
  torch::NoGradGuard ng;
  if (commit_.step < 0) return;
  step_ = commit_.step;
  train_sampler_->setPosition(commit_.position);
  adam_->setStepCount(commit_.adam_t);
  (void)scaler_->load(commit_.scaler);  // its own state: always valid
  shares_ = commit_.shares;
  summary_.losses.resize(commit_.losses);
  flat_->params().copy_(commit_.params);
  adam_->expAvg().copy_(commit_.m);
  adam_->expAvgSq().copy_(commit_.v);
  for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].second.copy_(commit_.buffers[i]);
  if (commit_.fp8.defined()) loadFp8State(commit_.fp8);
}

core::Sha256Digest Trainer::stateDigest(DigestOf what) {
  core::Sha256 h;
  hashTensor(h, flat_->params());
  for (auto& [name, t] : buffers_) hashTensor(h, t);
  if (what != DigestOf::kParams && !fp8_slots_.empty()) hashTensor(h, fp8State());  // the scales of the next step
  if (what == DigestOf::kWhole) {
    hashTensor(h, adam_->expAvg());
    hashTensor(h, adam_->expAvgSq());
    const int64_t meta[3] = {step_, train_sampler_->position(), adam_->stepCount()};
    h.update(meta, sizeof(meta));
    if (commit_.outer_valid) {
      for (const auto& [name, t] : commit_.outer_tensors) {
        if (name == "anchor" || name == "momentum") hashTensor(h, t);
      }
    }
  }
  return h.finish();
}

std::string Trainer::serializeState() {
  NamedTensors ts{{"params", flat_->params()}, {"exp_avg", adam_->expAvg()}, {"exp_avg_sq", adam_->expAvgSq()}};
  for (auto& [name, t] : buffers_) ts.push_back({"buffer." + name, t});
  if (!fp8_slots_.empty()) ts.push_back({"fp8", fp8State()});
  if (commit_.outer_valid) {
    for (const auto& [name, t] : commit_.outer_tensors) {
      if (name.rfind("ef.", 0) != 0) ts.push_back({"outer." + name, t});  // residuals are per rank
    }
  }
  nlohmann::json head{{"step", step_}, {"position", train_sampler_->position()}, {"adam_t", adam_->stepCount()}, {"loss_scale", scaler_->state()},
                      {"outer", commit_.outer_valid ? commit_.outer_json : nlohmann::json()}};
  nlohmann::json list = nlohmann::json::array();
  size_t total = 0;
  for (auto& [name, t] : ts) {
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    list.push_back({{"name", name}, {"bytes", bytes}, {"numel", t.numel()}});
    total += bytes;
  }
  head["tensors"] = list;
  const std::string h = head.dump();
  std::string out;
  out.reserve(8 + h.size() + total);
  const uint64_t hl = h.size();
  out.append(reinterpret_cast<const char*>(&hl), 8);
  out += h;
  for (auto& [name, t] : ts) {
    torch::Tensor c = t.to(torch::kCPU).contiguous();
    out.append(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()) * c.element_size());
  }
  return out;
}

core::Status Trainer::applyState(const std::string& blob) {
  if (blob.size() < 8) return core::dataLoss("state transfer: empty message");
  uint64_t hl = 0;
  std::memcpy(&hl, blob.data(), 8);
  if (8 + hl > blob.size()) return core::dataLoss("state transfer: truncated header");
  auto head = nlohmann::json::parse(blob.substr(8, hl), nullptr, false);
  if (head.is_discarded()) return core::dataLoss("state transfer: malformed header");
  size_t off = 8 + hl;
  std::map<std::string, torch::Tensor> mine{{"params", flat_->params()}, {"exp_avg", adam_->expAvg()},
                                            {"exp_avg_sq", adam_->expAvgSq()}};
  for (auto& [name, t] : buffers_) mine["buffer." + name] = t;
  torch::Tensor fp8 = fp8State();  // filled below, then entered
  if (fp8.defined()) mine["fp8"] = fp8;
  NamedTensors outer_tensors;
  torch::NoGradGuard ng;
  for (const auto& e : head["tensors"]) {
    const std::string name = e["name"].get<std::string>();
    const size_t bytes = e["bytes"].get<size_t>();
    if (off + bytes > blob.size()) return core::dataLoss("state transfer: tensor '" + name + "' is truncated");
    if (name.rfind("outer.", 0) == 0) {
      torch::Tensor t = torch::empty({e["numel"].get<int64_t>()}, torch::kFloat32);
      if (static_cast<size_t>(t.numel()) * 4 != bytes) return core::dataLoss("state transfer: '" + name + "' is not fp32");
      std::memcpy(t.data_ptr(), blob.data() + off, bytes);
      outer_tensors.push_back({name.substr(6), t});
    } else {
      auto it = mine.find(name);
      if (it == mine.end() || static_cast<size_t>(it->second.numel()) * it->second.element_size() != bytes ||
          !it->second.is_contiguous()) {
        return core::dataLoss("state transfer: tensor '" + name + "' does not match this model");
      }
      torch::Tensor& dst = it->second;
      if (dst.device().is_cpu()) {
        std::memcpy(dst.data_ptr(), blob.data() + off, bytes);
      } else {  // through the host: the state lives on the worker's device
        torch::Tensor host = torch::empty_like(dst, torch::TensorOptions().device(torch::kCPU));
        std::memcpy(host.data_ptr(), blob.data() + off, bytes);
        dst.copy_(host);
      }
    }
    off += bytes;
  }
  if (fp8.defined()) loadFp8State(fp8);
  step_ = head["step"].get<int64_t>();
  train_sampler_->setPosition(head["position"].get<int64_t>());
  adam_->setStepCount(head["adam_t"].get<int64_t>());
  ARCH_RETURN_IF_ERROR(scaler_->load(head.value("loss_scale", nlohmann::json())).withContext("state transfer"));
  if (head.contains("outer") && !head["outer"].is_null()) {
    commit_.outer_tensors = std::move(outer_tensors);
    commit_.outer_json = head["outer"];
    commit_.outer_valid = true;
  }
  has_state_ = true;
  return core::okStatus();
}

// Sends the donor's state to the receivers (ranks of g's epoch; the donor
// first in the transfer group, so it is broadcast root 0).
core::Status Trainer::transferState(comm::Group& g, int donor, const std::vector<int>& receivers) {
  std::vector<int> members{donor};
  members.insert(members.end(), receivers.begin(), receivers.end());
  if (std::find(members.begin(), members.end(), rank_) == members.end()) return core::okStatus();
  ARCH_ASSIGN_OR_RETURN(auto t, g.subgroup(members));
  const auto o = comm::OpOptions::within(120);
  std::string blob;
  uint64_t size = 0;
  if (rank_ == donor) {
    blob = serializeState();
    size = blob.size();
  }
  ARCH_RETURN_IF_ERROR(t->broadcast(&size, 8, comm::DType::kU8, 0, o).withContext("state transfer size"));
  blob.resize(size);
  ARCH_RETURN_IF_ERROR(t->broadcast(blob.data(), size, comm::DType::kU8, 0, o).withContext("state transfer"));
  if (rank_ != donor) ARCH_RETURN_IF_ERROR(applyState(blob));
  return core::okStatus();
}

}  // namespace archipelago::runtime::loop
