#include "archipelago/runtime/parallel/sharded_params.h"

#include <algorithm>
#include <stdexcept>

#include "archipelago/core/clock.h"
#include "archipelago/model/torch_compat.h"
#include "archipelago/runtime/parallel/optimizer_shard.h"

namespace archipelago::runtime::parallel {

namespace {
// "model.layers.12.mlp..." -> 12; -1 for tensors outside the decoder layers.
int64_t layerOf(const std::string& name) {
  static const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return -1;
  const size_t dot = name.find('.', prefix.size());
  if (dot == std::string::npos) return -1;
  try {
    return std::stoll(name.substr(prefix.size(), dot - prefix.size()));
  } catch (const std::exception&) {
    return -1;
  }
}
}  // namespace

UnitCut cutUnits(const std::vector<std::pair<std::string, int64_t>>& named_numels) {
  UnitCut cut;
  std::map<int64_t, size_t> seen;  // layer -> its index in layer_units
  int64_t off = 0, current = -2;
  for (const auto& [name, numel] : named_numels) {
    const int64_t layer = layerOf(name);
    if (cut.offsets.empty() || layer != current) {
      const size_t u = cut.offsets.size();
      cut.offsets.push_back(off);
      if (layer < 0) {
        cut.root_units.push_back(u);
      } else if (auto it = seen.find(layer); it != seen.end()) {
        if (cut.expert_units[it->second] >= 0) throw std::invalid_argument("layer " + std::to_string(layer) + " in three runs");
        cut.expert_units[it->second] = static_cast<int64_t>(u);
      } else {
        seen[layer] = cut.layer_units.size();
        cut.layer_units.push_back(u);
        cut.expert_units.push_back(-1);
      }
      current = layer;
    }
    off += numel;
  }
  cut.offsets.push_back(off);
  return cut;
}

ShardedParameters::ShardedParameters(FlatParams& flat, std::vector<ShardGroup> groups, UnitCut cut,
                                     std::vector<bool> norm_segments)
    : flat_(flat),
      groups_(std::move(groups)),
      cut_(std::move(cut)),
      norm_segments_(std::move(norm_segments)),
      units_(flat.units()) {
  for (const ShardGroup& g : groups_) {
    ours_.emplace_back(g.dp);
    const auto r = static_cast<size_t>(g.dp ? g.dp->rank() : 0);
    if (g.offsets.size() != (g.dp ? static_cast<size_t>(g.dp->size()) : 1) + 1) {
      throw std::invalid_argument("sharded parameters: a group's slice boundaries do not match its size");
    }
    mine_.push_back({g.offsets[r], g.offsets[r + 1]});
  }
  for (size_t u = 0; u < units_.size(); ++u) {
    size_t g = 0;
    while (g < groups_.size() &&
           !(groups_[g].offsets.front() <= flat_.unitBegin(u) && flat_.unitEnd(u) <= groups_[g].offsets.back())) {
      ++g;
    }
    if (g == groups_.size()) throw std::invalid_argument("sharded parameters: unit " + std::to_string(u) + " is in no group's range");
    unit_group_.push_back(g);
  }
}

ShardedParameters::~ShardedParameters() {
  queue_.cancel(core::aborted("sharded parameters destroyed"));
  (void)queue_.drain();
}

// ---- the worker thread's side ------------------------------------------------------

std::vector<int64_t> ShardedParameters::countsOf(size_t u) const {
  // Rank r's part of unit u: its slice clipped to the unit, in rank order.
  const int64_t ub = flat_.unitBegin(u), ue = flat_.unitEnd(u);
  std::vector<int64_t> at;
  for (int64_t o : groupOf(u).offsets) at.push_back(std::clamp(o, ub, ue) - ub);
  return at;
}

FlatSlice ShardedParameters::mineOf(size_t u) const {
  const FlatSlice& m = mine_[unit_group_[u]];
  return {std::max(flat_.unitBegin(u), m.begin), std::min(flat_.unitEnd(u), m.end)};
}

void ShardedParameters::setBackend(const DpComm* group, IslandBackend* native) {
  for (ShardGroup& g : groups_) {
    if (g.dp && (g.dp == group || !native)) g.native = native;
  }
}

IslandBackend& ShardedParameters::backendOf(size_t u) {
  const size_t g = unit_group_[u];
  return groups_[g].native ? *groups_[g].native : ours_[g];
}

// Unit u's gathered weights and its gradients are fp32; each is collected
// in place where the backend works (the CPU), else through a copy placed
// as it says.
core::Status ShardedParameters::gather(size_t u) {
  torch::NoGradGuard ng;
  const torch::Tensor& full = flat_.unitParams(u);
  const int64_t ub = flat_.unitBegin(u);
  IslandBackend& backend = backendOf(u);
  torch::Tensor wire = backend.wireFor(full, torch::kFloat32, false);
  const FlatSlice m = mineOf(u);
  if (m.numel() > 0) wire.narrow(0, m.begin - ub, m.numel()).copy_(flat_.params().narrow(0, flat_.localOf(m.begin), m.numel()));
  if (groupOf(u).dp) {
    core::Status st = backend.allgatherSlices(wire, countsOf(u));
    if (!st.isOk()) return st.withContext("ZeRO-3 parameter gather of unit " + std::to_string(u));
  }
  if (!wire.is_same(full)) full.copy_(wire);
  return core::okStatus();
}

core::Status ShardedParameters::reduce(size_t u) {
  torch::NoGradGuard ng;
  const torch::Tensor& g = flat_.unitGrads(u);
  const int64_t ub = flat_.unitBegin(u);
  IslandBackend& backend = backendOf(u);
  torch::Tensor wire = backend.wireFor(g, torch::kFloat32, true);
  if (groupOf(u).dp) {
    const std::vector<int64_t> at = countsOf(u);
    std::vector<size_t> counts;
    for (size_t r = 0; r + 1 < at.size(); ++r) counts.push_back(static_cast<size_t>(at[r + 1] - at[r]));
    core::Status st = backend.reduceScatterSum(wire, std::move(counts))->wait();
    if (!st.isOk()) return st.withContext("ZeRO-3 gradient reduce-scatter of unit " + std::to_string(u));
  }
  // This rank's block holds the group's sum: into its slice of the gradients.
  const FlatSlice m = mineOf(u);
  if (m.numel() > 0) {
    flat_.grads().narrow(0, flat_.localOf(m.begin), m.numel()).add_(wire.narrow(0, m.begin - ub, m.numel()).to(flat_.device()));
  }
  detach(g);
  return core::okStatus();
}

uint64_t ShardedParameters::submit(std::function<core::Status()> task) {
  uint64_t ticket = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ticket = ++submitted_;
  }
  auto done = [this] {
    std::lock_guard<std::mutex> lock(mu_);
    ++completed_;
    done_cv_.notify_all();
  };
  queue_.submit(
      [task = std::move(task), done] {
        core::Status st = task();
        done();
        return st;
      },
      [done](const core::Status&) { done(); });
  return ticket;
}

void ShardedParameters::await(uint64_t ticket) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return completed_ >= ticket; });
  }
  if (core::Status st = queue_.error(); !st.isOk()) fail(st);
}

void ShardedParameters::fail(const core::Status& st) {
  if (failure_.isOk()) failure_ = st;
  // Thrown through autograd and the model; guardStep turns it back into failure().
  throw std::runtime_error(st.message());
}

// ---- the compute thread's side -----------------------------------------------------

void ShardedParameters::requestGather(size_t u) {
  Unit& x = units_[u];
  if (x.params_held) return;
  const torch::Tensor& p = flat_.unitParams(u);
  attach(p);
  x.params_held = true;
  x.gather_ticket = submit([this, u] { return gather(u); });
}

void ShardedParameters::awaitGather(size_t u) {
  requestGather(u);
  Unit& x = units_[u];
  if (x.gather_ticket == 0) return;
  const uint64_t t = x.gather_ticket;
  x.gather_ticket = 0;
  await(t);
}

void ShardedParameters::release(size_t u) {
  Unit& x = units_[u];
  if (!x.params_held) return;
  if (x.gather_ticket != 0) awaitGather(u);  // never free memory a gather still writes
  detach(flat_.unitParams(u));
  x.params_held = false;
}

void ShardedParameters::prepareGrads(size_t u) {
  Unit& x = units_[u];
  if (x.grads_held) return;
  if (x.reduce_ticket != 0) {
    // The previous micro-batch's reduce-scatter of this unit still reads (and then frees) them.
    const uint64_t t = x.reduce_ticket;
    x.reduce_ticket = 0;
    await(t);
  }
  const torch::Tensor& g = flat_.unitGrads(u);
  attach(g);
  torch::NoGradGuard ng;
  const_cast<torch::Tensor&>(g).zero_();
  x.grads_held = true;
}

void ShardedParameters::requestReduce(size_t u) {
  Unit& x = units_[u];
  if (!x.grads_held) return;
  x.grads_held = false;
  x.reduce_ticket = submit([this, u] { return reduce(u); });
}

std::vector<size_t> ShardedParameters::unitsOf(size_t layer) const {
  std::vector<size_t> out{cut_.layer_units[layer]};
  if (cut_.expert_units[layer] >= 0) out.push_back(static_cast<size_t>(cut_.expert_units[layer]));
  return out;
}

void ShardedParameters::before(size_t layer) {
  for (size_t u : unitsOf(layer)) awaitGather(u);
  if (layer + 1 < cut_.layer_units.size()) {
    for (size_t u : unitsOf(layer + 1)) requestGather(u);  // prefetch
  }
}

torch::Tensor ShardedParameters::after(size_t layer, torch::Tensor output) {
  const bool backward = torch::GradMode::is_enabled() && output.defined() && output.requires_grad();
  if (backward) {
    // Its gradient arrives just before this layer's backward runs.
    output.register_hook([this, layer](const torch::Tensor&) { preBackward(layer); });
  }
  forwardDone(layer, backward);
  return output;
}

void ShardedParameters::forwardDone(size_t layer, bool backward_follows) {
  // The last layer's backward comes first: it stays.
  if (backward_follows && layer + 1 == cut_.layer_units.size()) return;
  for (size_t u : unitsOf(layer)) release(u);
}

void ShardedParameters::preBackward(size_t layer) {
  // The layer after this one finished its backward (autograd accumulates a
  // parameter's gradient as soon as it is computed, before any other node).
  if (pending_layer_ >= 0) {
    for (size_t done : unitsOf(static_cast<size_t>(pending_layer_))) {
      requestReduce(done);
      release(done);
    }
  }
  for (size_t u : unitsOf(layer)) {
    awaitGather(u);
    prepareGrads(u);
  }
  if (layer > 0) {
    for (size_t u : unitsOf(layer - 1)) requestGather(u);  // prefetch
  }
  pending_layer_ = static_cast<int>(layer);
}

void ShardedParameters::beginPass(bool backward) {
  for (size_t u : cut_.root_units) requestGather(u);
  for (size_t u : cut_.root_units) awaitGather(u);
  if (backward && !root_grads_) {
    for (size_t u : cut_.root_units) prepareGrads(u);
    root_grads_ = true;
  }
}

void ShardedParameters::endBackward() {
  if (pending_layer_ < 0) return;
  const size_t layer = static_cast<size_t>(pending_layer_);
  pending_layer_ = -1;
  for (size_t done : unitsOf(layer)) {
    requestReduce(done);
    release(done);
  }
}

void ShardedParameters::idleForward(bool backward_follows) {
  for (size_t i = 0; i < cut_.layer_units.size(); ++i) {
    before(i);
    forwardDone(i, backward_follows);
  }
}

void ShardedParameters::idleBackward() {
  for (size_t i = cut_.layer_units.size(); i-- > 0;) preBackward(i);
  endBackward();
}

void ShardedParameters::endForwardOnly() {
  for (size_t u : cut_.root_units) release(u);
}

core::Status ShardedParameters::reduceGradients(StepStats& stats) {
  const auto t0 = core::Clock::now();
  try {
    endBackward();
    for (size_t u : cut_.root_units) requestReduce(u);
    root_grads_ = false;
    uint64_t last = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last = submitted_;
    }
    await(last);
    for (auto& x : units_) x.reduce_ticket = 0;
    for (size_t u : cut_.root_units) release(u);
  } catch (const std::exception&) {
    stats.wait_s += core::secondsSince(t0);
    return failure_;
  }
  stats.wait_s += core::secondsSince(t0);
  return core::okStatus();
}

NormShare ShardedParameters::gradNormSquared() const {
  // Each rank holds the summed gradients of its slices only.
  double sq = 0;
  for (const FlatSlice& m : mine_) sq += gradSumOfSquares(flat_, m.begin, m.end, norm_segments_);
  return {sq, false};
}

std::vector<StateRange> ShardedParameters::stateRanges() const {
  std::vector<StateRange> out;
  for (const FlatSlice& m : mine_) {
    for (auto& r : stateRangesIn(flat_, m.begin, m.end)) out.push_back(std::move(r));
  }
  return out;
}

void ShardedParameters::attach(const torch::Tensor& t) {
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  at::DataPtr data;
  {
    std::lock_guard<std::mutex> lock(pool_mu_);
    auto& free = pool_[nbytes];
    if (!free.empty()) {
      data = std::move(free.back());
      free.pop_back();
    }
  }
  if (!data) {
    data = model::compat::allocateFor(t, nbytes);
    pool_bytes_ += static_cast<int64_t>(nbytes);
  }
  model::compat::giveStorage(t, std::move(data), nbytes);
}

void ShardedParameters::detach(const torch::Tensor& t) {
  const size_t nbytes = t.storage().nbytes();
  at::DataPtr data = model::compat::takeStorage(t);
  std::lock_guard<std::mutex> lock(pool_mu_);
  pool_[nbytes].push_back(std::move(data));
}

size_t ShardedParameters::heldUnits() const {
  size_t n = 0;
  for (size_t u = 0; u < units_.size(); ++u) n += model::compat::storageHeld(flat_.unitParams(u)) ? 1 : 0;
  return n;
}

}  // namespace archipelago::runtime::parallel
