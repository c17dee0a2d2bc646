// Checkpoints of the loop: snapshots, the DiLoCo / streaming rank parts,
// resume (docs/runtime.md "Checkpoints").
#include <algorithm>
#include <map>
#include <set>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/elastic.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

core::Status Trainer::resumeFromCheckpoint() {
  std::vector<std::pair<std::string, std::string>> refused;
  auto latest = latestValidCheckpoint(opt_.run_dir, &refused);
  if (!latest.isOk()) return latest.status().withContext("cannot resume");
  ARCH_ASSIGN_OR_RETURN(auto ck, loadCheckpoint(*latest));
  if (split()) return resumeSplit(*latest, ck);
  ARCH_RETURN_IF_ERROR(applyRankParts(*latest, ck));
  std::map<std::string, torch::Tensor> by_name(ck.weights.begin(), ck.weights.end());
  torch::NoGradGuard ng;
  for (const auto& seg : flat_->segments()) {
    auto it = by_name.find(seg.name);
    if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + seg.name + "'");
    if (it->second.sizes().vec() != seg.shape) {
      return core::dataLoss("checkpoint " + *latest + " tensor '" + seg.name + "' has another shape than the model");
    }
    flat_->params().narrow(0, seg.offset, seg.numel).copy_(it->second.reshape({-1}));
  }
  std::map<std::string, torch::Tensor> opt_by_name(ck.optimizer.begin(), ck.optimizer.end());
  if (!opt_by_name.count("exp_avg") || !opt_by_name.count("exp_avg_sq") ||
      opt_by_name["exp_avg"].numel() != flat_->numel()) {
    return core::dataLoss("checkpoint " + *latest + " optimizer state does not match the model");
  }
  adam_->expAvg().copy_(opt_by_name["exp_avg"].narrow(0, shard_begin_, shard_end_ - shard_begin_));
  adam_->expAvgSq().copy_(opt_by_name["exp_avg_sq"].narrow(0, shard_begin_, shard_end_ - shard_begin_));
  adam_->setStepCount(ck.optimizer_step);
  for (auto& [name, t] : buffers_) {
    auto it = by_name.find(name);
    if (it != by_name.end() && it->second.sizes() == t.sizes()) t.copy_(it->second);
  }
  train_sampler_->setPosition(ck.data_position);
  // The checkpoint's shares only if it was taken with the same membership.
  if (ck.shares.size() == shares_.size() && std::all_of(ck.shares.begin(), ck.shares.end(), [](int64_t x) { return x > 0; }) &&
      static_cast<int>(alive_.size()) == world_) {
    shares_ = ck.shares;
  }
  start_step_ = ck.step;
  if (rank_ == 0) {
    ARCH_LOG_INFO("resumed from {} (step {}, data position {}){}", *latest, ck.step, ck.data_position,
                  refused.empty() ? "" : fmt::format("; refused {} newer checkpoint(s)", refused.size()));
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
      NamedTensors weights;
      std::map<std::string, torch::Tensor> moments;
      for (const auto& [name, t] : isl->optimizer) {
        if (name.rfind("model.", 0) == 0) weights.push_back({name.substr(6), t});
        else if (name == "exp_avg" || name == "exp_avg_sq") moments[name] = t;
      }
      if (weights.size() != ck.weights.size() || moments.size() != 2) {
        return core::dataLoss("checkpoint " + ckpt_dir + ": the part of rank " + std::to_string(r) +
                              " does not hold island '" + me_.island + "''s whole state");
      }
      ck.weights = std::move(weights);
      for (auto& [name, t] : ck.optimizer) {
        if (moments.count(name)) t = moments[name];
      }
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

// What every checkpoint of this loop says about itself: step, data
// position, shares, optimizer step, the job and the membership.
CheckpointState Trainer::snapshotHead(int64_t step) const {
  CheckpointState s;
  s.step = step;
  s.data_position = train_sampler_->position();
  s.shares = shares_;
  s.optimizer_step = adam_->stepCount();
  s.job_yaml = job_yaml_;
  s.model = job_.model;
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& w : workers_) {
    const bool alive = std::find(alive_.begin(), alive_.end(), w.rank) != alive_.end();
    ranks.push_back({{"rank", w.rank}, {"island", w.island}, {"slowdown", w.slowdown}, {"alive", alive}});
  }
  s.membership = {{"world", world_}, {"epoch", elastic() ? opt_.elastic->epoch() : 0}, {"ranks", ranks}};
  return s;
}

core::Result<CheckpointState> Trainer::snapshot(int64_t step) {
  CheckpointState s = snapshotHead(step);
  torch::Tensor m = torch::zeros({flat_->numel()});
  torch::Tensor v = torch::zeros({flat_->numel()});
  m.narrow(0, shard_begin_, shard_end_ - shard_begin_).copy_(adam_->expAvg());
  v.narrow(0, shard_begin_, shard_end_ - shard_begin_).copy_(adam_->expAvgSq());
  if (!shard_offsets_.empty()) {
    ARCH_RETURN_IF_ERROR(dp_->allgatherSlices(std::span<float>(m.data_ptr<float>(), static_cast<size_t>(m.numel())), shard_offsets_));
    ARCH_RETURN_IF_ERROR(dp_->allgatherSlices(std::span<float>(v.data_ptr<float>(), static_cast<size_t>(v.numel())), shard_offsets_));
  }
  s.optimizer = {{"exp_avg", m}, {"exp_avg_sq", v}};
  if (outer_) {
    for (const auto& [name, t] : outer_->stateTensors()) s.optimizer.push_back({"outer." + name, t.detach().clone()});
    s.extra["outer"] = outer_->stateJson();
    s.extra["parts"] = rankParts();
  }
  for (auto& [name, t] : net_->namedTensors()) s.weights.push_back({name, t.detach().clone()});
  return s;
}

nlohmann::json Trainer::rankParts() const {
  // Every rank but the writer holds residuals of its own; the first alive
  // rank of every island other than the writer's also holds that island's
  // weights and moments (the island's ranks agree on them).
  std::vector<int> ranks = alive_;
  if (ranks.empty()) for (int r = 0; r < world_; ++r) ranks.push_back(r);
  const int writer = ranks.front();
  const int writer_island = workers_[static_cast<size_t>(writer)].island_index;
  std::set<int> led;
  nlohmann::json parts = nlohmann::json::array();
  for (int r : ranks) {
    if (r == writer) continue;
    const int island = workers_[static_cast<size_t>(r)].island_index;
    const bool leads = island != writer_island && led.insert(island).second;
    parts.push_back({{"rank", r}, {"island", workers_[static_cast<size_t>(r)].island}, {"island_state", leads}});
  }
  return parts;
}

CheckpointState Trainer::rankPart(CheckpointState full) const {
  CheckpointState part;
  part.step = full.step;
  part.part_rank = rank_;
  part.optimizer_step = full.optimizer_step;
  bool leads = false;
  for (const auto& p : full.extra.value("parts", nlohmann::json::array())) {
    if (p.value("rank", -1) == rank_) leads = p.value("island_state", false);
  }
  // The outer sync's counters (tokens this island trained since each
  // fragment's last sync) are the island's own too.
  part.extra = {{"island", me_.island}, {"island_state", leads}, {"outer", full.extra.value("outer", nlohmann::json())}};
  const std::string mine = "outer.ef.r" + std::to_string(rank_) + ".";
  for (auto& [name, t] : full.optimizer) {
    if (name.rfind(mine, 0) == 0 || (leads && (name == "exp_avg" || name == "exp_avg_sq"))) {
      part.optimizer.push_back({name, std::move(t)});
    }
  }
  if (leads) {
    for (auto& [name, t] : full.weights) part.optimizer.push_back({"model." + name, std::move(t)});
  }
  return part;
}

core::Status Trainer::writeCheckpoint(bool at_end) {
  const auto c0 = core::Clock::now();
  CheckpointState snap;
  if (split()) {
    // The writer gathers the parts by tensor name; the others are done.
    ScopedSpan span(&trace_, TraceRecorder::kCheckpoint, "checkpoint gather");
    ARCH_ASSIGN_OR_RETURN(snap, gatherSnapshot(step_));
    if (!amWriter()) return core::okStatus();
  } else {
    ARCH_ASSIGN_OR_RETURN(snap, snapshot(step_));
  }
  if (!amWriter() && outer_) {
    // DiLoCo / streaming: this rank's part of the checkpoint (docs/runtime.md).
    if (!ckpt_) ckpt_ = std::make_unique<CheckpointWriter>(opt_.run_dir, job_.checkpoint.keep_last);
    ckpt_->submit(rankPart(std::move(snap)));
    if (!job_.checkpoint.async || at_end) ARCH_RETURN_IF_ERROR(ckpt_->drain());
  } else if (amWriter()) {
    const double stall = core::secondsSince(c0);
    if (!ckpt_) ckpt_ = std::make_unique<CheckpointWriter>(opt_.run_dir, job_.checkpoint.keep_last);
    ckpt_->submit(std::move(snap));
    if (!job_.checkpoint.async || at_end) ARCH_RETURN_IF_ERROR(ckpt_->drain());
    if (opt_.write_metrics) {
      metrics_.write(report::EventRecord{.event = "checkpoint", .step = step_, .detail = checkpointDirName(step_),
                                         .stall_s = stall});
    }
  }
  return core::okStatus();
}

}  // namespace archipelago::runtime::loop
