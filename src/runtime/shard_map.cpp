#include "archipelago/runtime/shard_map.h"

#include <algorithm>

namespace archipelago::runtime {

namespace {
int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}
}  // namespace

core::Result<ShardMap> ShardMap::build(TensorLayout full, const std::vector<ParamSegment>& segments,
                                       const std::map<std::string, model::TensorSlice>& slices) {
  ShardMap m;
  std::map<std::string, const std::vector<int64_t>*> shape_of;
  for (const auto& [name, shape] : full) {
    m.full_offset_[name] = m.full_numel_;
    m.full_numel_ += product(shape);
    shape_of[name] = &shape;
  }
  for (const auto& s : segments) {
    auto it = shape_of.find(s.name);
    if (it == shape_of.end()) return core::internalError("shard map: tensor '" + s.name + "' is not in the model's layout");
    Segment seg{s.name, s.offset, s.numel};
    std::vector<int64_t> expect = *it->second;
    if (auto sl = slices.find(s.name); sl != slices.end() && sl->second.sliced()) {
      const model::TensorSlice& t = sl->second;
      const auto dim = static_cast<size_t>(t.dim);
      if (dim >= expect.size() || expect[dim] != t.full || t.begin < 0 || t.begin + t.length > t.full ||
          (dim == 1 && expect.size() != 2) || dim > 1) {
        return core::internalError("shard map: tensor-parallel slice of '" + s.name + "' does not fit the model's shape");
      }
      expect[dim] = t.length;
      if (dim == 0) {
        seg.first = t.begin * (product(expect) / std::max<int64_t>(1, t.length));
      } else {
        seg.first = t.begin;
        seg.cols = t.length;
        seg.full_cols = t.full;
      }
    }
    if (expect != s.shape) return core::internalError("shard map: tensor '" + s.name + "' has another shape than the model's");
    m.segments_.push_back(seg);
  }
  std::sort(m.segments_.begin(), m.segments_.end(), [](const Segment& a, const Segment& b) { return a.offset < b.offset; });
  m.full_ = std::move(full);
  return m;
}

std::vector<ShardPiece> ShardMap::pieces(int64_t begin, int64_t end) const {
  std::vector<ShardPiece> out;
  for (const auto& s : segments_) {
    const int64_t lo = std::max(begin, s.offset), hi = std::min(end, s.offset + s.numel);
    if (lo >= hi) continue;
    if (s.cols == 0) {
      out.push_back({s.name, s.first + lo - s.offset, s.first + hi - s.offset, lo});
      continue;
    }
    // A row-parallel slice: one piece per (part of a) row.
    for (int64_t at = lo; at < hi;) {
      const int64_t i = at - s.offset, row = i / s.cols, col = i % s.cols;
      const int64_t n = std::min(s.cols - col, hi - at);
      const int64_t b = row * s.full_cols + s.first + col;
      out.push_back({s.name, b, b + n, at});
      at += n;
    }
  }
  return out;
}

int64_t ShardMap::fullOffset(const std::string& name) const {
  auto it = full_offset_.find(name);
  return it == full_offset_.end() ? -1 : it->second;
}

void ShardMap::load(const std::vector<ShardPiece>& pieces, const torch::Tensor& full_flat, torch::Tensor local,
                    int64_t local_base) const {
  torch::NoGradGuard ng;
  for (const auto& p : pieces) {
    local.narrow(0, p.local - local_base, p.numel()).copy_(full_flat.narrow(0, fullOffset(p.name) + p.begin, p.numel()));
  }
}

bool AssembledState::wants(const std::string& kind, const ShardPiece& piece) const {
  auto k = covered_.find(kind);
  if (k == covered_.end()) return true;
  auto t = k->second.find(piece.name);
  if (t == k->second.end()) return true;
  int64_t at = piece.begin;
  for (const auto& [lo, hi] : t->second) {
    if (lo > at) break;
    at = std::max(at, hi);
  }
  return at < piece.end;
}

void AssembledState::put(const std::string& kind, const ShardPiece& piece, const torch::Tensor& values) {
  torch::NoGradGuard ng;
  auto& f = flat_[kind];
  if (!f.defined()) f = torch::zeros({map_->fullNumel()}, torch::kFloat);
  f.narrow(0, map_->fullOffset(piece.name) + piece.begin, piece.numel()).copy_(values.reshape({-1}));
  Intervals& iv = covered_[kind][piece.name];
  iv.push_back({piece.begin, piece.end});
  std::sort(iv.begin(), iv.end());
  Intervals merged;
  for (const auto& r : iv) {
    if (!merged.empty() && r.first <= merged.back().second) merged.back().second = std::max(merged.back().second, r.second);
    else merged.push_back(r);
  }
  iv = std::move(merged);
}

core::Status AssembledState::complete(const std::string& kind) const {
  for (const auto& [name, shape] : map_->full()) {
    const ShardPiece whole{name, 0, product(shape), 0};
    if (wants(kind, whole)) return core::internalError("checkpoint assembly lacks " + kind + " of tensor '" + name + "'");
  }
  return core::okStatus();
}

torch::Tensor AssembledState::flat(const std::string& kind) const {
  auto it = flat_.find(kind);
  return it == flat_.end() ? torch::zeros({map_->fullNumel()}, torch::kFloat) : it->second;
}

std::vector<std::pair<std::string, torch::Tensor>> AssembledState::tensors(const std::string& kind) const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  const torch::Tensor f = flat(kind);
  for (const auto& [name, shape] : map_->full()) {
    out.push_back({name, f.narrow(0, map_->fullOffset(name), product(shape)).view(shape)});
  }
  return out;
}

}  // namespace archipelago::runtime
