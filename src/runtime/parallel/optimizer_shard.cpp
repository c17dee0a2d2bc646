#include "archipelago/runtime/parallel/optimizer_shard.h"

#include <algorithm>

#include "archipelago/core/clock.h"

namespace archipelago::runtime::parallel {

OptimizerShard::OptimizerShard(FlatParams& flat) : OptimizerShard(flat, {{0, flat.numel(), nullptr}}, 0) {}

OptimizerShard::OptimizerShard(FlatParams& flat, DpComm* dp, int stage)
    : OptimizerShard(flat, {{0, flat.numel(), dp}}, stage) {}

OptimizerShard::OptimizerShard(FlatParams& flat, const std::vector<OptimizerRange>& ranges, int stage)
    : flat_(flat), stage_(stage) {
  int64_t state = 0;
  for (const auto& r : ranges) {
    OptimizerPiece p;
    p.dp = r.dp;
    p.begin = r.lo;
    p.end = r.hi;
    if (r.dp) {
      p.offsets = sliceOffsets(r.lo, r.hi, r.dp->size());
      p.begin = p.offsets[static_cast<size_t>(r.dp->rank())];
      p.end = p.offsets[static_cast<size_t>(r.dp->rank()) + 1];
    }
    p.state_offset = state;
    state += p.size();
    pieces_.push_back(std::move(p));
  }
}

std::vector<int64_t> OptimizerShard::sliceOffsets(int64_t numel, int n) { return sliceOffsets(0, numel, n); }

std::vector<int64_t> OptimizerShard::sliceOffsets(int64_t lo, int64_t hi, int n) {
  std::vector<int64_t> out;
  for (int r = 0; r <= n; ++r) out.push_back(lo + (hi - lo) * r / n);
  return out;
}

bool OptimizerShard::sharded() const {
  for (const auto& p : pieces_) {
    if (p.sharded()) return true;
  }
  return false;
}

int64_t OptimizerShard::size() const {
  int64_t n = 0;
  for (const auto& p : pieces_) n += p.size();
  return n;
}

void OptimizerShard::step(FlatAdamW& adam, double lr) {
  // ZeRO-3's buffer holds this rank's slices only (FlatParams::held()).
  std::vector<FlatAdamW::Piece> update;
  for (const auto& p : pieces_) {
    const int64_t b = flat_.localOf(p.begin), n = p.size();
    update.push_back({flat_.params().narrow(0, b, n), flat_.grads().narrow(0, b, n), flat_.decayMask().narrow(0, b, n),
                      p.state_offset});
  }
  adam.step(update, lr);
}

void OptimizerShard::setBackend(const DpComm* group, IslandBackend* native) {
  for (auto& p : pieces_) {
    if (p.sharded() && (p.dp == group || !native)) p.native = native;
  }
}

core::Status OptimizerShard::gatherParameters(StepStats& stats) {
  if (!sharded() || stage_ == 3) return core::okStatus();
  const auto t0 = core::Clock::now();
  torch::NoGradGuard ng;
  core::Status st;
  for (const auto& p : pieces_) {
    if (!p.sharded() || !st.isOk()) continue;
    CommBackend ours(p.dp);
    IslandBackend& backend = p.native ? *p.native : ours;
    // The group's slices relative to the range it shares, in place where
    // the backend gathers (the CPU's fp32 masters), else through a copy.
    const int64_t lo = p.offsets.front();
    std::vector<int64_t> rel;
    for (int64_t o : p.offsets) rel.push_back(o - lo);
    torch::Tensor range = flat_.params().narrow(0, lo, p.offsets.back() - lo);
    torch::Tensor wire = backend.wireFor(range, torch::kFloat32, true);
    st = backend.allgatherSlices(wire, std::move(rel));
    if (st.isOk() && !wire.is_same(range)) range.copy_(wire);
  }
  stats.wait_s += core::secondsSince(t0);
  return st.isOk() ? st : st.withContext("ZeRO-" + std::to_string(stage_) + " parameter allgather");
}

std::string OptimizerShard::describe() const {
  std::string out = std::to_string(size()) + " of " + std::to_string(flat_.numel()) + " optimizer elements per rank:";
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const auto& p = pieces_[i];
    const int64_t lo = p.sharded() ? p.offsets.front() : p.begin, hi = p.sharded() ? p.offsets.back() : p.end;
    out += (i ? ", [" : " [") + std::to_string(lo) + ", " + std::to_string(hi) + ") " +
           (p.sharded() ? "over " + std::to_string(p.dp->size()) + " ranks" : "whole");
  }
  return out;
}

std::vector<StateRange> stateRangesIn(const FlatParams& flat, int64_t lo, int64_t hi) {
  std::vector<StateRange> out;
  for (const auto& s : flat.segments()) {
    const int64_t a = std::max(lo, s.offset), b = std::min(hi, s.offset + s.numel);
    if (a < b) out.push_back({s.name, a, b});
  }
  return out;
}

std::vector<StateRange> OptimizerShard::stateRangesOf(const OptimizerPiece& p) const {
  return stateRangesIn(flat_, p.begin, p.end);
}

std::vector<StateRange> OptimizerShard::stateRanges() const {
  std::vector<StateRange> out;
  for (const auto& p : pieces_) {
    for (auto& r : stateRangesOf(p)) out.push_back(std::move(r));
  }
  return out;
}

}  // namespace archipelago::runtime::parallel
