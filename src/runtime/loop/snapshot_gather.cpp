// Checkpoints of split layouts (pipeline stages, expert groups): the
// writer gathers the single-process layout by tensor name from the ranks
// that together hold one copy, and every rank loads its tensors by name,
// so a run saved at one split resumes at another (docs/parallelism.md).
#include <map>
#include <set>

#include "archipelago/core/log.h"
#include "archipelago/model/transformer.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

namespace {
constexpr uint32_t kTagCheckpoint = 13;
comm::OpOptions p2pOptions() { return comm::OpOptions::within(600); }
}  // namespace

// Split layouts: every rank loads its tensors, their optimizer moments and
// (DiLoCo) outer state by name from the single-process layout.
core::Status Trainer::resumeSplit(const std::string& dir, CheckpointState& ck) {
  const std::string* latest = &dir;
  std::map<std::string, torch::Tensor> by_name(ck.weights.begin(), ck.weights.end());
  std::map<std::string, torch::Tensor> opt_by_name(ck.optimizer.begin(), ck.optimizer.end());
  // Offsets of the single-process flat layout (what the checkpoint holds).
  std::map<std::string, int64_t> full_offset;
  int64_t total = 0;
  for (const auto& [name, shape] : model::parameterLayout(mcfg_)) {
    full_offset[name] = total;
    int64_t n = 1;
    for (auto d : shape) n *= d;
    total += n;
  }
  if (!opt_by_name.count("exp_avg") || !opt_by_name.count("exp_avg_sq") || opt_by_name["exp_avg"].numel() != total) {
    return core::dataLoss("checkpoint " + *latest + " optimizer state does not match the model");
  }
  torch::NoGradGuard ng;
  std::set<std::string> trained;
  for (const auto& seg : flat_->segments()) {
    trained.insert(seg.name);
    auto it = by_name.find(seg.name);
    if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + seg.name + "'");
    if (it->second.sizes().vec() != seg.shape) {
      return core::dataLoss("checkpoint " + *latest + " tensor '" + seg.name + "' has another shape than the model");
    }
    flat_->params().narrow(0, seg.offset, seg.numel).copy_(it->second.reshape({-1}));
    const int64_t fo = full_offset.at(seg.name);
    adam_->expAvg().narrow(0, seg.offset, seg.numel).copy_(opt_by_name["exp_avg"].narrow(0, fo, seg.numel));
    adam_->expAvgSq().narrow(0, seg.offset, seg.numel).copy_(opt_by_name["exp_avg_sq"].narrow(0, fo, seg.numel));
  }
  for (auto& [name, t] : net_->namedTensors()) {
    if (trained.count(name)) continue;
    auto it = by_name.find(name);
    if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + name + "'");
    t.copy_(it->second);
  }
  adam_->setStepCount(ck.optimizer_step);
  start_step_ = ck.step;
  train_sampler_->setPosition(ck.data_position);
  if (ck.shares.size() == shares_.size()) shares_ = ck.shares;
  if (job_.strategy.kind != "sync") {
    // The outer state, by name like the weights. Progress since a
    // fragment's last sync is in the parameters (anchor - params is the next
    // pseudo-gradient); the token counters restart on every rank alike, so
    // all ranks keep weighting the islands the same way.
    const nlohmann::json st = ck.extra.value("outer", nlohmann::json());
    if (!opt_by_name.count("outer.anchor") || !opt_by_name.count("outer.momentum") || !st.is_object() ||
        st.value("kind", "") != job_.strategy.kind || opt_by_name["outer.anchor"].numel() != total) {
      return core::failedPrecondition("checkpoint " + *latest + " has no " + job_.strategy.kind +
                                      " outer state of this model (written by another strategy.kind?); resume "
                                      "with the strategy it was written with");
    }
    if (ck.step % job_.strategy.inner_steps != 0 && rank_ == 0) {
      ARCH_LOG_INFO("resuming inside an outer round (step {}, inner_steps {}): the first round after the resume "
                    "weights the islands by the tokens since the resume", ck.step, job_.strategy.inner_steps);
    }
    torch::Tensor a = torch::empty({flat_->numel()}, torch::kFloat), mo = torch::empty({flat_->numel()}, torch::kFloat);
    for (const auto& seg : flat_->segments()) {
      const int64_t fo = full_offset.at(seg.name);
      a.narrow(0, seg.offset, seg.numel).copy_(opt_by_name["outer.anchor"].narrow(0, fo, seg.numel));
      mo.narrow(0, seg.offset, seg.numel).copy_(opt_by_name["outer.momentum"].narrow(0, fo, seg.numel));
    }
    resume_outer_tensors_ = {{"anchor", a}, {"momentum", mo}};
    resume_outer_json_ = st;
    resume_outer_json_["numel"] = flat_->numel();
    resume_outer_json_["cum_tokens"] = 0;
    resume_outer_json_["last_tokens"] = std::vector<int64_t>(st.value("last_tokens", std::vector<int64_t>{0}).size(), 0);
  }
  if (rank_ == 0) ARCH_LOG_INFO("resumed from {} at step {} (resharded by tensor name)", *latest, start_step_);
  return core::okStatus();
}

void GatheredState::absorb(const nlohmann::json& header, const torch::Tensor& data) {
  int64_t off = 0;
  auto take = [&](std::map<std::string, torch::Tensor>& into, const std::string& name, int64_t n) {
    into[name] = data.narrow(0, off, n).clone();
    off += n;
  };
  for (const auto& h : header) {
    const std::string name = h["name"].get<std::string>();
    const auto shape = h["shape"].get<std::vector<int64_t>>();
    int64_t n = 1;
    for (auto d : shape) n *= d;
    take(w, name, n);
    w[name] = w[name].reshape(shape);
    if (h["trained"].get<bool>()) {
      take(m, name, n);
      take(v, name, n);
    }
    if (h.value("outer", false)) {
      take(anchor, name, n);
      take(momentum, name, n);
    }
  }
}

// What this rank holds, as one fp32 vector and a header naming its pieces:
// per trained tensor its values, AdamW moments and (DiLoCo) outer anchor and
// momentum; per buffer its values. `only_experts`: the expert tensors only.
torch::Tensor Trainer::packHeld(bool only_experts, nlohmann::json& header) {
  NamedTensors outer_state;
  if (outer_) outer_state = outer_->stateTensors();
  std::map<std::string, torch::Tensor> outer_by(outer_state.begin(), outer_state.end());
  std::vector<torch::Tensor> parts;
  auto add = [&](const torch::Tensor& t) { parts.push_back(t.detach().reshape({-1}).to(torch::kFloat)); };
  std::set<std::string> trained;
  for (const auto& seg : flat_->segments()) {
    trained.insert(seg.name);
    if (only_experts && !parallel::isExpertTensor(seg.name)) continue;
    header.push_back(nlohmann::json{{"name", seg.name}, {"shape", seg.shape}, {"trained", true}, {"outer", outer_ != nullptr}});
    add(flat_->params().narrow(0, seg.offset, seg.numel));
    add(adam_->expAvg().narrow(0, seg.offset, seg.numel));
    add(adam_->expAvgSq().narrow(0, seg.offset, seg.numel));
    if (outer_) {
      add(outer_by.at("anchor").narrow(0, seg.offset, seg.numel));
      add(outer_by.at("momentum").narrow(0, seg.offset, seg.numel));
    }
  }
  for (auto& [name, t] : net_->namedTensors()) {
    if (trained.count(name) || only_experts) continue;
    header.push_back(nlohmann::json{{"name", name}, {"shape", t.sizes().vec()}, {"trained", false}});
    add(t);
  }
  return parts.empty() ? torch::zeros({0}) : torch::cat(parts).contiguous();
}

// The writer (rank 0) assembles the single-process layout from the ranks
// that together hold one copy of the model: ranks [0, stages x ep), the
// first expert group's pipelines; the first pipeline sends everything, the
// others only their experts.
core::Result<CheckpointState> Trainer::gatherSnapshot(int64_t step) {
  const int holders = lay_.stages * lay_.ep;
  GatheredState got;
  if (rank_ >= holders) return CheckpointState{};
  nlohmann::json header = nlohmann::json::array();
  torch::Tensor data = packHeld(replica_ > 0, header);
  auto& g = *groups_.world;
  if (rank_ != 0) {
    const std::string text = header.dump();
    int64_t sizes[2] = {static_cast<int64_t>(text.size()), data.numel()};
    ARCH_RETURN_IF_ERROR(g.send(sizes, 2, comm::DType::kI64, 0, kTagCheckpoint, p2pOptions()));
    ARCH_RETURN_IF_ERROR(g.send(text.data(), text.size(), comm::DType::kU8, 0, kTagCheckpoint, p2pOptions()));
    ARCH_RETURN_IF_ERROR(g.send(data.data_ptr<float>(), static_cast<size_t>(data.numel()), comm::DType::kF32, 0,
                                kTagCheckpoint, p2pOptions()));
    return CheckpointState{};
  }
  got.absorb(header, data);
  for (int r = 1; r < holders; ++r) {
    int64_t sizes[2] = {0, 0};
    ARCH_RETURN_IF_ERROR(g.recv(sizes, 2, comm::DType::kI64, r, kTagCheckpoint, p2pOptions()));
    std::string text(static_cast<size_t>(sizes[0]), '\0');
    ARCH_RETURN_IF_ERROR(g.recv(text.data(), text.size(), comm::DType::kU8, r, kTagCheckpoint, p2pOptions()));
    torch::Tensor d = torch::empty({sizes[1]}, torch::kFloat);
    ARCH_RETURN_IF_ERROR(g.recv(d.data_ptr<float>(), static_cast<size_t>(sizes[1]), comm::DType::kF32, r,
                                kTagCheckpoint, p2pOptions()));
    auto parsed = nlohmann::json::parse(text, nullptr, false);
    if (parsed.is_discarded()) return core::dataLoss("checkpoint gather: rank " + std::to_string(r) + " sent a malformed header");
    got.absorb(parsed, d);
  }
  return assembleSnapshot(step, got);
}

core::Result<CheckpointState> Trainer::assembleSnapshot(int64_t step, GatheredState& got) {
  CheckpointState s = snapshotHead(step);
  s.extra["parallel"] = {{"pipeline_stages", lay_.stages}, {"stage_layers", lay_.stage_layers},
                         {"expert_parallel", lay_.ep}, {"expert_begin", lay_.expert_begin}};
  std::vector<torch::Tensor> mm, vv, aa, oo;
  for (const auto& [name, shape] : model::parameterLayout(mcfg_)) {
    if (!got.w.count(name) || !got.m.count(name)) return core::internalError("checkpoint assembly lacks tensor '" + name + "'");
    s.weights.push_back({name, got.w[name]});
    mm.push_back(got.m[name]);
    vv.push_back(got.v[name]);
    got.w.erase(name);
    if (outer_) {
      if (!got.anchor.count(name)) return core::internalError("checkpoint assembly lacks the outer state of '" + name + "'");
      aa.push_back(got.anchor[name]);
      oo.push_back(got.momentum[name]);
    }
  }
  // Persistent buffers (router biases) after the parameters, in layer order.
  for (int64_t l = 0; l < mcfg_.n_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    for (auto& [name, t] : got.w) {
      if (name.rfind(prefix, 0) == 0) s.weights.push_back({name, t});
    }
  }
  s.optimizer = {{"exp_avg", torch::cat(mm)}, {"exp_avg_sq", torch::cat(vv)}};
  if (outer_) {
    // The DiLoCo outer state in the single-process layout too (what a
    // data-parallel layout writes: anchor and momentum in full-model order).
    s.optimizer.push_back({"outer.anchor", torch::cat(aa)});
    s.optimizer.push_back({"outer.momentum", torch::cat(oo)});
    nlohmann::json st = outer_->stateJson();
    st["numel"] = s.optimizer[2].second.numel();
    s.extra["outer"] = st;
  }
  return s;
}

}  // namespace archipelago::runtime::loop
