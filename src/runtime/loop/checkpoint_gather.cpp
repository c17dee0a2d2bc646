// The writer's gather for a checkpoint (runtime/shard_map.h): what this
// rank holds as pieces of the single-process model, and, where no rank
// holds a whole copy (pipeline stages, expert groups, ZeRO-1 moments), the
// exchange in which the writer asks every other rank for the pieces it
// still lacks:
//
//   rank -> writer   header: the pieces it holds (kind, tensor, elements)
//   writer -> rank   the indices of the pieces it wants
//   rank -> writer   their values, one fp32 vector
#include <cstdint>
#include <functional>

#include "archipelago/core/log.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

namespace {
constexpr uint32_t kTagCheckpoint = 13;
comm::OpOptions p2pOptions() { return comm::OpOptions::within(600); }

nlohmann::json headerOf(const HeldState& held) {
  nlohmann::json h = nlohmann::json::array();
  for (const auto& e : held.entries) h.push_back({{"k", e.kind}, {"n", e.piece.name}, {"b", e.piece.begin}, {"e", e.piece.end}});
  for (const auto& [name, t] : held.buffers) h.push_back({{"k", "buffer"}, {"n", name}, {"s", t.sizes().vec()}});
  return h;
}

torch::Tensor flat32(const torch::Tensor& t) { return t.detach().reshape({-1}).to(torch::kCPU, torch::kFloat); }
}  // namespace

HeldState Trainer::heldState() {
  HeldState h;
  std::vector<parallel::StateRange> weights = densePart().stateRanges();
  if (experts_) {
    for (auto& r : experts_->stateRanges()) weights.push_back(std::move(r));
  }
  // `indexOf`: a flat offset's index in `values`.
  auto add = [&](const std::string& kind, const std::vector<parallel::StateRange>& ranges, const torch::Tensor& values,
                 const std::function<int64_t(int64_t)>& indexOf) {
    for (const auto& r : ranges) {
      for (auto& p : shard_map_->pieces(r.begin, r.end)) {
        torch::Tensor v = values.narrow(0, indexOf(p.local), p.numel());
        h.entries.push_back({kind, std::move(p), v});
      }
    }
  };
  add("weight", weights, flat_->params(), [&](int64_t o) { return flat_->localOf(o); });
  // The moments of each of this rank's optimizer slices, from its offset in the state.
  for (const auto& p : optim_->pieces()) {
    const auto inPiece = [&](int64_t o) { return o - p.begin; };
    add("exp_avg", optim_->stateRangesOf(p), adam_->expAvg().narrow(0, p.state_offset, p.size()), inPiece);
    add("exp_avg_sq", optim_->stateRangesOf(p), adam_->expAvgSq().narrow(0, p.state_offset, p.size()), inPiece);
  }
  if (outer_) {
    const NamedTensors st = outer_->stateTensors();
    std::map<std::string, torch::Tensor> by(st.begin(), st.end());
    const auto whole = [](int64_t o) { return o; };
    add("outer.anchor", weights, by.at("anchor"), whole);
    add("outer.momentum", weights, by.at("momentum"), whole);
  }
  h.buffers = buffers_;
  return h;
}

void Trainer::absorbHeld(const HeldState& held, AssembledState& got) const {
  for (const auto& e : held.entries) {
    if (got.wants(e.kind, e.piece)) got.put(e.kind, e.piece, e.values);
  }
  for (const auto& [name, t] : held.buffers) {
    if (got.wantsBuffer(name)) got.putBuffer(name, flat32(t).view(t.sizes()));
  }
}

// Every rank of the world group takes part; the writer (group rank 0)
// assembles, the others answer what it asks.
core::Status Trainer::gatherHeld(const HeldState& held, AssembledState& got) {
  if (!world_group_) return core::internalError("checkpoint gather: the loop has no world group");
  comm::Group& g = *world_group_;
  if (g.rank() != 0) {
    const std::string text = headerOf(held).dump();
    const int64_t size = static_cast<int64_t>(text.size());
    ARCH_RETURN_IF_ERROR(g.send(&size, 1, comm::DType::kI64, 0, kTagCheckpoint, p2pOptions()));
    ARCH_RETURN_IF_ERROR(g.send(text.data(), text.size(), comm::DType::kU8, 0, kTagCheckpoint, p2pOptions()));
    int64_t n = 0;
    ARCH_RETURN_IF_ERROR(g.recv(&n, 1, comm::DType::kI64, 0, kTagCheckpoint, p2pOptions()));
    std::vector<int64_t> want(static_cast<size_t>(n));
    if (n > 0) ARCH_RETURN_IF_ERROR(g.recv(want.data(), want.size(), comm::DType::kI64, 0, kTagCheckpoint, p2pOptions()));
    std::vector<torch::Tensor> parts;
    const auto entries = static_cast<int64_t>(held.entries.size());
    for (int64_t i : want) {
      if (i < 0 || i >= entries + static_cast<int64_t>(held.buffers.size())) {
        return core::internalError("checkpoint gather: the writer asked for piece " + std::to_string(i));
      }
      parts.push_back(i < entries ? flat32(held.entries[static_cast<size_t>(i)].values)
                                  : flat32(held.buffers[static_cast<size_t>(i - entries)].second));
    }
    const torch::Tensor data = parts.empty() ? torch::zeros({0}) : torch::cat(parts).contiguous();
    return data.numel() == 0 ? core::okStatus()
                             : g.send(data.data_ptr<float>(), static_cast<size_t>(data.numel()), comm::DType::kF32, 0,
                                      kTagCheckpoint, p2pOptions());
  }
  absorbHeld(held, got);
  for (int r = 1; r < g.size(); ++r) ARCH_RETURN_IF_ERROR(gatherFrom(g, r, got));
  return core::okStatus();
}

// The writer's side of the exchange with group rank r.
core::Status Trainer::gatherFrom(comm::Group& g, int r, AssembledState& got) {
  const std::string who = "checkpoint gather from rank " + std::to_string(g.ranks()[static_cast<size_t>(r)]);
  int64_t size = 0;
  ARCH_RETURN_IF_ERROR(g.recv(&size, 1, comm::DType::kI64, r, kTagCheckpoint, p2pOptions()));
  if (size < 0 || size > (int64_t{1} << 30)) return core::dataLoss(who + ": header size " + std::to_string(size));
  std::string text(static_cast<size_t>(size), '\0');
  ARCH_RETURN_IF_ERROR(g.recv(text.data(), text.size(), comm::DType::kU8, r, kTagCheckpoint, p2pOptions()));
  const auto header = nlohmann::json::parse(text, nullptr, false);
  if (!header.is_array()) return core::dataLoss(who + ": malformed header");
  std::vector<int64_t> want;
  std::vector<std::pair<std::string, ShardPiece>> pieces;  // kind, piece (buffers: begin/end over the whole)
  std::vector<std::vector<int64_t>> shapes;
  int64_t total = 0;
  for (size_t i = 0; i < header.size(); ++i) {
    const auto& h = header[i];
    const std::string kind = h.value("k", "");
    ShardPiece p{h.value("n", ""), h.value("b", int64_t{0}), h.value("e", int64_t{0}), 0};
    std::vector<int64_t> shape;
    if (kind == "buffer") {
      shape = h.value("s", std::vector<int64_t>{});
      p.end = 1;
      for (auto d : shape) p.end *= d;
      if (!got.wantsBuffer(p.name)) continue;
    } else if (shard_map_->fullOffset(p.name) < 0 || p.begin < 0 || p.end < p.begin || !got.wants(kind, p)) {
      if (shard_map_->fullOffset(p.name) < 0) return core::dataLoss(who + ": unknown tensor '" + p.name + "'");
      continue;
    }
    want.push_back(static_cast<int64_t>(i));
    total += p.numel();
    pieces.push_back({kind, p});
    shapes.push_back(std::move(shape));
  }
  const int64_t n = static_cast<int64_t>(want.size());
  ARCH_RETURN_IF_ERROR(g.send(&n, 1, comm::DType::kI64, r, kTagCheckpoint, p2pOptions()));
  if (n == 0) return core::okStatus();
  ARCH_RETURN_IF_ERROR(g.send(want.data(), want.size(), comm::DType::kI64, r, kTagCheckpoint, p2pOptions()));
  torch::Tensor data = torch::empty({total}, torch::kFloat);
  if (total > 0) {
    ARCH_RETURN_IF_ERROR(g.recv(data.data_ptr<float>(), static_cast<size_t>(total), comm::DType::kF32, r, kTagCheckpoint,
                                p2pOptions()));
  }
  int64_t off = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const auto& [kind, p] = pieces[i];
    if (kind == "buffer") got.putBuffer(p.name, data.narrow(0, off, p.numel()).view(shapes[i]));
    else got.put(kind, p, data.narrow(0, off, p.numel()));
    off += p.numel();
  }
  return core::okStatus();
}

}  // namespace archipelago::runtime::loop
