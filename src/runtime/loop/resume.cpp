// Resume for every layout: each rank loads its pieces of the checkpoint's
// single-process state by tensor name (runtime/shard_map.h), so a run saved
// under one layout resumes under another; with DiLoCo / streaming the
// state of this rank's island and its residuals come from the rank parts
// (docs/runtime.md "Checkpoints").
#include <algorithm>
#include <cstdint>
#include <map>

#include "archipelago/core/log.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

core::Status Trainer::resumeFromCheckpoint() {
  std::vector<std::pair<std::string, std::string>> refused;
  auto latest = latestValidCheckpoint(opt_.run_dir, &refused);
  if (!latest.isOk()) return latest.status().withContext("cannot resume");
  ARCH_ASSIGN_OR_RETURN(auto ck, loadCheckpoint(*latest));
  // The rank parts hold the islands' state of layouts where each rank holds a whole copy.
  if (!split()) ARCH_RETURN_IF_ERROR(applyRankParts(*latest, ck));
  ARCH_RETURN_IF_ERROR(loadPieces(*latest, ck));
  ARCH_RETURN_IF_ERROR(resumeOuter(*latest, ck));
  resumeFp8(*latest, ck);
  adam_->setStepCount(ck.optimizer_step);
  if (ck.extra.is_object() && ck.extra.contains("loss_scale")) {
    ARCH_RETURN_IF_ERROR(scaler_->load(ck.extra["loss_scale"]).withContext(*latest));
  }
  train_sampler_->setPosition(ck.data_position);
  // The checkpoint's shares only if it was taken with the same membership.
  if (ck.shares.size() == shares_.size() && std::all_of(ck.shares.begin(), ck.shares.end(), [](int64_t x) { return x > 0; }) &&
      static_cast<int>(alive_.size()) == world_) {
    shares_ = ck.shares;
  }
  start_step_ = ck.step;
  if (rank_ == 0) {
    ARCH_LOG_INFO("resumed from {} (step {}, data position {}, loaded by tensor name){}", *latest, ck.step,
                  ck.data_position, refused.empty() ? "" : fmt::format("; refused {} newer checkpoint(s)", refused.size()));
  }
  return core::okStatus();
}

// This rank's parameters, moments and buffers out of the checkpoint.
core::Status Trainer::loadPieces(const std::string& dir, const CheckpointState& ck) {
  std::map<std::string, torch::Tensor> by_name(ck.weights.begin(), ck.weights.end());
  std::map<std::string, torch::Tensor> opt_by_name(ck.optimizer.begin(), ck.optimizer.end());
  for (const char* k : {"exp_avg", "exp_avg_sq"}) {
    if (!opt_by_name.count(k) || opt_by_name[k].numel() != shard_map_->fullNumel()) {
      return core::dataLoss("checkpoint " + dir + " optimizer state does not match the model");
    }
  }
  torch::NoGradGuard ng;
  const std::map<std::string, std::vector<int64_t>> whole(shard_map_->full().begin(), shard_map_->full().end());
  for (const auto& seg : flat_->segments()) {
    auto it = by_name.find(seg.name);
    if (it == by_name.end()) return core::dataLoss("checkpoint " + dir + " lacks tensor '" + seg.name + "'");
    if (!whole.count(seg.name) || it->second.sizes().vec() != whole.at(seg.name)) {
      return core::dataLoss("checkpoint " + dir + " tensor '" + seg.name + "' has another shape than the model");
    }
    // A tensor-parallel rank takes its slice of the whole tensor.
    const torch::Tensor mine =
        model::sliceOf(it->second, model::tensorSlice(mcfg_, seg.name, {tp_rank_, lay_.tp})).reshape({-1});
    // This rank's masters: the whole segment, or (ZeRO-3) its parts in this rank's slices.
    for (const FlatSlice& h : flat_->held()) {
      const int64_t lo = std::max(seg.offset, h.begin), hi = std::min(seg.offset + seg.numel, h.end);
      if (lo < hi) flat_->params().narrow(0, flat_->localOf(lo), hi - lo).copy_(mine.narrow(0, lo - seg.offset, hi - lo));
    }
  }
  for (const auto& p : optim_->pieces()) {
    const auto moments = shard_map_->pieces(p.begin, p.end);
    torch::Tensor m = adam_->expAvg().narrow(0, p.state_offset, p.size());
    torch::Tensor v = adam_->expAvgSq().narrow(0, p.state_offset, p.size());
    shard_map_->load(moments, opt_by_name["exp_avg"], m, p.begin);
    shard_map_->load(moments, opt_by_name["exp_avg_sq"], v, p.begin);
  }
  for (auto& [name, t] : buffers_) {
    auto it = by_name.find(name);
    if (it == by_name.end() || it->second.sizes() != t.sizes()) {
      return core::dataLoss("checkpoint " + dir + " lacks buffer '" + name + "' of the model's shape");
    }
    t.copy_(it->second);
  }
  return core::okStatus();
}

// DiLoCo / streaming: the outer state by name like the weights, for
// setupStrategy to build the outer sync from.
core::Status Trainer::resumeOuter(const std::string& dir, const CheckpointState& ck) {
  if (job_.strategy.kind == "sync") return core::okStatus();
  if (ck.extra.is_object() && ck.extra.contains("imported_from")) {
    // An imported model (runtime/hf_checkpoint.h) has no outer state yet:
    // the outer sync starts from the loaded weights as from fresh ones.
    return core::okStatus();
  }
  std::map<std::string, torch::Tensor> opt_by_name(ck.optimizer.begin(), ck.optimizer.end());
  const nlohmann::json st = ck.extra.value("outer", nlohmann::json());
  if (!opt_by_name.count("outer.anchor") || !opt_by_name.count("outer.momentum") || !st.is_object() ||
      st.value("kind", "") != job_.strategy.kind || opt_by_name["outer.anchor"].numel() != shard_map_->fullNumel()) {
    return core::failedPrecondition("checkpoint " + dir + " has no " + job_.strategy.kind +
                                    " outer state of this model (written by another strategy.kind?); resume "
                                    "with the strategy it was written with");
  }
  const auto pieces = shard_map_->pieces(0, flat_->numel());
  torch::Tensor a = torch::empty({flat_->numel()}, torch::kFloat), mo = torch::empty({flat_->numel()}, torch::kFloat);
  shard_map_->load(pieces, opt_by_name["outer.anchor"], a);
  shard_map_->load(pieces, opt_by_name["outer.momentum"], mo);
  resume_outer_tensors_ = {{"anchor", a}, {"momentum", mo}};
  for (const auto& [name, t] : ck.optimizer) {
    if (name.rfind("outer.ef.", 0) == 0) resume_outer_tensors_.push_back({name.substr(6), t});
  }
  resume_outer_json_ = st;
  resume_outer_json_["numel"] = flat_->numel();
  if (split()) {
    // A split layout's checkpoint holds the writer's island's outer
    // counters only. Progress since a fragment's last sync is in the
    // parameters (anchor - params is the next pseudo-gradient); the token
    // counters restart on every rank alike, so all ranks keep weighting the
    // islands the same way.
    if (ck.step % job_.strategy.inner_steps != 0 && rank_ == 0) {
      ARCH_LOG_INFO("resuming inside an outer round (step {}, inner_steps {}): the first round after the resume "
                    "weights the islands by the tokens since the resume", ck.step, job_.strategy.inner_steps);
    }
    resume_outer_json_["cum_tokens"] = 0;
    resume_outer_json_["last_tokens"] = std::vector<int64_t>(st.value("last_tokens", std::vector<int64_t>{0}).size(), 0);
  }
  return core::okStatus();
}

core::Status Trainer::applyRankParts(const std::string& ckpt_dir, CheckpointState& ck) {
  if (!ck.extra.is_object() || !ck.extra.contains("parts")) return core::okStatus();
  const auto parts = ck.extra["parts"];
  std::map<int, CheckpointState> loaded;
  auto part = [&](int r) -> core::Result<CheckpointState*> {
    if (!loaded.count(r)) {
      ARCH_ASSIGN_OR_RETURN(auto p, loadCheckpointPart(ckpt_dir, r));
      loaded[r] = std::move(p);
    }
    return &loaded[r];
  };
  for (const auto& p : parts) {
    const int r = p.value("rank", -1);
    if (p.value("island_state", false) && p.value("island", std::string()) == me_.island) {
      // This island's weights and moments between outer steps.
      ARCH_ASSIGN_OR_RETURN(CheckpointState* isl, part(r));
      NamedTensors weights, fp8;
      std::map<std::string, torch::Tensor> moments;
      for (const auto& [name, t] : isl->optimizer) {
        if (name.rfind("model.", 0) == 0) weights.push_back({name.substr(6), t});
        else if (name == "exp_avg" || name == "exp_avg_sq") moments[name] = t;
        else if (name.rfind("fp8.", 0) == 0) fp8.push_back({name, t});
      }
      if (weights.size() != ck.weights.size() || moments.size() != 2) {
        return core::dataLoss("checkpoint " + ckpt_dir + ": the part of rank " + std::to_string(r) +
                              " does not hold island '" + me_.island + "''s whole state");
      }
      ck.weights = std::move(weights);
      for (auto& [name, t] : ck.optimizer) {
        if (moments.count(name)) t = moments[name];
      }
      // The island's FP8 histories (its own maxima since the last outer step).
      std::erase_if(ck.optimizer, [](const auto& e) { return e.first.rfind("fp8.", 0) == 0; });
      ck.optimizer.insert(ck.optimizer.end(), fp8.begin(), fp8.end());
      ck.optimizer_step = isl->optimizer_step;
    }
    if (r == rank_) {
      ARCH_ASSIGN_OR_RETURN(CheckpointState* mine, part(r));
      for (const auto& [name, t] : mine->optimizer) {
        if (name.rfind("outer.ef.", 0) == 0) ck.optimizer.push_back({name, t});
      }
      if (mine->extra.is_object() && mine->extra.contains("outer")) ck.extra["outer"] = mine->extra["outer"];
    }
  }
  return core::okStatus();
}


}  // namespace archipelago::runtime::loop
