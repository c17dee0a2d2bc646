// Checkpoints of the loop: the snapshot in the single-process layout by
// tensor name (runtime/shard_map.h) and the DiLoCo / streaming rank parts
// (docs/runtime.md "Checkpoints"); resume is in resume.cpp.
#include <algorithm>
#include <map>
#include <set>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/core/island_layout.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

// What every checkpoint of this loop says about itself: step, data
// position, shares, optimizer step, the job and the membership.
CheckpointState Trainer::snapshotHead(int64_t step) const {
  CheckpointState s;
  s.step = step;
  s.data_position = train_sampler_->position();
  s.shares = shares_;
  s.optimizer_step = adam_->stepCount();
  if (scaler_->enabled()) s.extra["loss_scale"] = scaler_->state();
  s.job_yaml = job_yaml_;
  s.model = mcfg_;  // resolved: config.json needs every size (Hugging Face builds the model from it)
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& w : workers_) {
    const bool alive = std::find(alive_.begin(), alive_.end(), w.rank) != alive_.end();
    ranks.push_back({{"rank", w.rank}, {"island", w.island}, {"slowdown", w.slowdown}, {"alive", alive}});
  }
  s.membership = {{"world", world_}, {"epoch", elastic() ? opt_.elastic->epoch() : 0}, {"ranks", ranks}};
  return s;
}

// Every layout alike: the single-process state by tensor name. Where each
// rank holds a whole copy the writer has it all; otherwise the writer
// gathers what it lacks (checkpoint_gather.cpp) and the others get an
// empty state.
core::Result<CheckpointState> Trainer::snapshot(int64_t step) {
  AssembledState got(*shard_map_);
  const HeldState held = heldState();
  if (holdsWholeCopy()) {
    absorbHeld(held, got);
  } else {
    ARCH_RETURN_IF_ERROR(gatherHeld(held, got));
    if (!amWriter()) return CheckpointState{};
  }
  return assembleSnapshot(step, got);
}

core::Result<CheckpointState> Trainer::assembleSnapshot(int64_t step, const AssembledState& got) {
  std::vector<std::string> kinds = {"weight", "exp_avg", "exp_avg_sq"};
  if (outer_) kinds.insert(kinds.end(), {"outer.anchor", "outer.momentum"});
  for (const auto& k : kinds) ARCH_RETURN_IF_ERROR(got.complete(k));
  CheckpointState s = snapshotHead(step);
  s.weights = got.tensors("weight");
  // Persistent buffers (router biases) after the parameters, in layer order.
  std::map<std::string, torch::Tensor> buffers = got.buffers();
  for (int64_t l = 0; l < mcfg_.n_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    for (auto it = buffers.begin(); it != buffers.end();) {
      if (it->first.rfind(prefix, 0) == 0) {
        s.weights.push_back(*it);
        it = buffers.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& b : buffers) s.weights.push_back(b);
  s.optimizer = {{"exp_avg", got.flat("exp_avg")}, {"exp_avg_sq", got.flat("exp_avg_sq")}};
  snapshotFp8(s);
  if (split()) {
    s.extra["parallel"] = {{"pipeline_stages", lay_.stages}, {"stage_layers", lay_.stage_layers},
                           {"expert_parallel", lay_.ep}, {"expert_begin", lay_.expert_begin},
                           {"tensor_parallel", lay_.tp}};
    // For people: the state itself is by tensor name, whatever the layout.
    if (job_lay_.perIsland()) s.extra["parallel"]["island_layouts"] = core::describeIslandLayouts(job_);
  }
  if (outer_) {
    s.optimizer.push_back({"outer.anchor", got.flat("outer.anchor")});
    s.optimizer.push_back({"outer.momentum", got.flat("outer.momentum")});
    nlohmann::json st = outer_->stateJson();
    st["numel"] = shard_map_->fullNumel();
    s.extra["outer"] = st;
    if (!split()) {
      // This rank's error-feedback residuals; the other ranks' are in their parts.
      for (const auto& [name, t] : outer_->stateTensors()) {
        if (name.rfind("ef.", 0) == 0) s.optimizer.push_back({"outer." + name, t.detach().clone()});
      }
      s.extra["parts"] = rankParts();
    }
  }
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
    const bool island_state = name == "exp_avg" || name == "exp_avg_sq" || name.rfind("fp8.", 0) == 0;
    if (name.rfind(mine, 0) == 0 || (leads && island_state)) {
      part.optimizer.push_back({name, std::move(t)});
    }
  }
  if (leads) {
    for (auto& [name, t] : full.weights) part.optimizer.push_back({"model." + name, std::move(t)});
  }
  return part;
}

// The writer writes the checkpoint; with DiLoCo / streaming on a layout
// where every rank holds a whole copy, every other rank writes its part
// (docs/runtime.md); where none does, every rank takes part in the gather.
core::Status Trainer::writeCheckpoint(bool at_end) {
  const bool writes_part = !amWriter() && outer_ && holdsWholeCopy();
  if (!amWriter() && !writes_part && holdsWholeCopy()) return core::okStatus();
  const auto c0 = core::Clock::now();
  CheckpointState snap;
  {
    ScopedSpan span(&trace_, TraceRecorder::kCheckpoint, "checkpoint snapshot");
    ARCH_ASSIGN_OR_RETURN(snap, snapshot(step_));
  }
  if (!amWriter() && !writes_part) return core::okStatus();
  const double stall = core::secondsSince(c0);
  if (!ckpt_) ckpt_ = std::make_unique<CheckpointWriter>(opt_.run_dir, job_.checkpoint.keep_last);
  ckpt_->submit(writes_part ? rankPart(std::move(snap)) : std::move(snap));
  if (!job_.checkpoint.async || at_end) ARCH_RETURN_IF_ERROR(ckpt_->drain());
  if (amWriter() && opt_.write_metrics) {
    metrics_.write(report::EventRecord{.event = "checkpoint", .step = step_, .detail = checkpointDirName(step_),
                                       .stall_s = stall});
  }
  return core::okStatus();
}

}  // namespace archipelago::runtime::loop
