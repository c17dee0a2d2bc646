// The gradient sum by tensor name between islands of different layouts
// (runtime/parallel/island_bridge.h).
#include "archipelago/runtime/parallel/island_bridge.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "archipelago/core/clock.h"
#include "archipelago/runtime/host_view.h"

namespace archipelago::runtime::parallel {

namespace {

// Sorted, disjoint global intervals [first, second).
using Intervals = std::vector<std::pair<int64_t, int64_t>>;

Intervals intervalsOf(const std::vector<FlatRun>& runs) {
  Intervals out;
  for (const auto& r : runs) {
    if (!out.empty() && out.back().second == r.global) out.back().second += r.n;
    else out.push_back({r.global, r.global + r.n});
  }
  return out;
}

Intervals unite(const Intervals& a, const Intervals& b) {
  Intervals all(a);
  all.insert(all.end(), b.begin(), b.end());
  std::sort(all.begin(), all.end());
  Intervals out;
  for (const auto& iv : all) {
    if (!out.empty() && iv.first <= out.back().second) out.back().second = std::max(out.back().second, iv.second);
    else out.push_back(iv);
  }
  return out;
}

Intervals subtract(const Intervals& a, const Intervals& b) {
  Intervals out;
  size_t j = 0;
  for (auto [lo, hi] : a) {
    while (j < b.size() && b[j].second <= lo) ++j;
    for (size_t k = j; k < b.size() && b[k].first < hi; ++k) {
      if (b[k].first > lo) out.push_back({lo, b[k].first});
      lo = std::max(lo, b[k].second);
    }
    if (lo < hi) out.push_back({lo, hi});
  }
  return out;
}

// The parts of `runs` (sorted by global) inside `set`, as runs of the same buffer.
std::vector<FlatRun> clip(const std::vector<FlatRun>& runs, const Intervals& set) {
  std::vector<FlatRun> out;
  size_t j = 0;
  for (const auto& r : runs) {
    const int64_t lo = r.global, hi = r.global + r.n;
    while (j < set.size() && set[j].second <= lo) ++j;
    for (size_t k = j; k < set.size() && set[k].first < hi; ++k) {
      const int64_t a = std::max(lo, set[k].first), b = std::min(hi, set[k].second);
      if (a < b) out.push_back({a, r.local + (a - lo), b - a});
    }
  }
  return out;
}

int64_t countOf(const std::vector<FlatRun>& runs) {
  int64_t n = 0;
  for (const auto& r : runs) n += r.n;
  return n;
}

}  // namespace

std::vector<FlatRun> heldRuns(const ShardMap& map, int64_t numel) {
  std::vector<FlatRun> runs;
  for (const auto& p : map.pieces(0, numel)) runs.push_back({map.fullOffset(p.name) + p.begin, p.local, p.numel()});
  std::sort(runs.begin(), runs.end(), [](const FlatRun& a, const FlatRun& b) { return a.global < b.global; });
  std::vector<FlatRun> out;
  for (const auto& r : runs) {
    if (!out.empty() && out.back().global + out.back().n == r.global && out.back().local + out.back().n == r.local) {
      out.back().n += r.n;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

core::Result<BridgePlan> bridgePlan(const std::vector<std::vector<FlatRun>>& runs, const std::vector<int>& island,
                                    int me) {
  const size_t n = runs.size();
  if (island.size() != n || me < 0 || static_cast<size_t>(me) >= n) {
    return core::invalidArgument("bridge plan: one run list and one island per member, and `me` among them");
  }
  // What each member contributes: what it holds and no earlier member of its island holds.
  std::vector<Intervals> held(n), contrib(n);
  std::map<int, Intervals> before;  // island -> held by its members so far
  for (size_t m = 0; m < n; ++m) {
    held[m] = intervalsOf(runs[m]);
    Intervals& seen = before[island[m]];
    contrib[m] = subtract(held[m], seen);
    seen = unite(seen, held[m]);
  }
  BridgePlan plan;
  plan.me = me;
  plan.island = island;
  plan.contributes = clip(runs[static_cast<size_t>(me)], contrib[static_cast<size_t>(me)]);
  for (const auto& [isl, iv] : before) plan.islands.push_back(isl);
  plan.send.resize(n);
  plan.recv.resize(n);
  const size_t self = static_cast<size_t>(me);
  std::map<int, int64_t> received;
  for (size_t q = 0; q < n; ++q) {
    if (island[q] == island[self]) continue;
    plan.send[q] = clip(runs[self], contrib[self]);
    plan.send[q] = clip(plan.send[q], held[q]);
    plan.recv[q] = clip(runs[self], contrib[q]);
    received[island[q]] += countOf(plan.recv[q]);
  }
  for (size_t q = 0; q < n; ++q) {
    plan.send_counts.push_back(static_cast<size_t>(countOf(plan.send[q])));
    plan.recv_counts.push_back(static_cast<size_t>(countOf(plan.recv[q])));
  }
  const int64_t mine = countOf(runs[self]);
  for (int isl : plan.islands) {
    if (isl == island[self]) continue;
    if (received[isl] != mine) {
      return core::internalError("island bridge: island " + std::to_string(isl) + "'s first replica covers " +
                                 std::to_string(received[isl]) + " of the " + std::to_string(mine) +
                                 " elements member " + std::to_string(me) + " holds; every island must hold the whole model");
    }
  }
  return plan;
}

core::Result<std::vector<int64_t>> localCuts(const std::vector<FlatRun>& runs, const std::vector<int64_t>& global_cuts) {
  std::vector<int64_t> out{0};
  for (size_t c = 0; c + 1 < global_cuts.size(); ++c) {
    // The range's elements, in any order, must be the buffer's next ones.
    int64_t lo = -1, hi = 0, n = 0;
    for (const auto& r : clip(runs, {{global_cuts[c], global_cuts[c + 1]}})) {
      lo = lo < 0 ? r.local : std::min(lo, r.local);
      hi = std::max(hi, r.local + r.n);
      n += r.n;
    }
    if (n > 0 && (lo != out.back() || hi - lo != n)) {
      return core::failedPrecondition("this rank's elements of the single-process range [" +
                                      std::to_string(global_cuts[c]) + ", " + std::to_string(global_cuts[c + 1]) +
                                      ") are not the next range of its flat buffer (expert parallelism puts the "
                                      "experts last: streaming's fragments need one fragment, or no expert groups)");
    }
    out.push_back(out.back() + n);
  }
  return out;
}

core::Result<std::unique_ptr<IslandBridge>> IslandBridge::create(FlatParams& flat, const ShardMap& map,
                                                                  std::shared_ptr<comm::Group> bridge,
                                                                  std::vector<int> island_of_member, DpComm* peers,
                                                                  int64_t local_begin, int64_t local_end) {
  BridgePlan plan;
  if (bridge) {
    // Every member's runs: the counts, then the runs padded to the longest.
    std::vector<FlatRun> mine;
    const int64_t hi = local_end < 0 ? flat.numel() : local_end;
    for (const auto& r : heldRuns(map, flat.numel())) {
      const int64_t a = std::max(r.local, local_begin), b = std::min(r.local + r.n, hi);
      if (a < b) mine.push_back({r.global + (a - r.local), a, b - a});
    }
    const size_t n = static_cast<size_t>(bridge->size());
    int64_t count = static_cast<int64_t>(mine.size());
    std::vector<int64_t> counts(n);
    ARCH_RETURN_IF_ERROR(bridge->allgather(&count, counts.data(), 1, comm::DType::kI64));
    const size_t longest = static_cast<size_t>(*std::max_element(counts.begin(), counts.end()));
    std::vector<int64_t> out(longest * 3, 0), all(longest * 3 * n);
    for (size_t i = 0; i < mine.size(); ++i) {
      out[i * 3] = mine[i].global;
      out[i * 3 + 1] = mine[i].local;
      out[i * 3 + 2] = mine[i].n;
    }
    ARCH_RETURN_IF_ERROR(bridge->allgather(out.data(), all.data(), longest * 3, comm::DType::kI64));
    std::vector<std::vector<FlatRun>> runs(n);
    for (size_t m = 0; m < n; ++m) {
      for (size_t i = 0; i < static_cast<size_t>(counts[m]); ++i) {
        const int64_t* r = all.data() + (m * longest + i) * 3;
        runs[m].push_back({r[0], r[1], r[2]});
      }
    }
    ARCH_ASSIGN_OR_RETURN(plan, bridgePlan(runs, island_of_member, bridge->rank()));
    return std::make_unique<IslandBridge>(flat, std::move(bridge), std::move(plan), peers, std::move(runs));
  }
  return std::make_unique<IslandBridge>(flat, std::move(bridge), std::move(plan), peers);
}

int64_t IslandBridge::sentPerStep() const {
  size_t n = 0;
  for (size_t c : plan_.send_counts) n += c;
  return static_cast<int64_t>(n);
}

// The members' blocks: fp32 as they are, or each encoded on its own.
core::Result<uint64_t> IslandBridge::alltoall(const BridgePlan& plan) {
  if (codec_ == comm::CodecKind::kNone) {
    ARCH_RETURN_IF_ERROR(bridge_->alltoallv(out_.data(), plan.send_counts, in_.data(), plan.recv_counts, comm::DType::kF32));
    uint64_t sent = 0;
    for (size_t c : plan.send_counts) sent += c * sizeof(float);
    return sent;
  }
  const auto wire = [&](size_t n) { return n == 0 ? size_t{0} : comm::encodedSize(codec_, n); };
  std::vector<size_t> send_bytes, recv_bytes;
  for (size_t c : plan.send_counts) send_bytes.push_back(wire(c));
  for (size_t c : plan.recv_counts) recv_bytes.push_back(wire(c));
  size_t total_out = 0, total_in = 0;
  for (size_t b : send_bytes) total_out += b;
  for (size_t b : recv_bytes) total_in += b;
  wire_out_.resize(total_out);
  wire_in_.resize(total_in);
  size_t at = 0, byte = 0;
  for (size_t q = 0; q < plan.send_counts.size(); ++q) {
    const size_t n = plan.send_counts[q];
    if (n > 0) comm::encode(codec_, {out_.data() + at, n}, {wire_out_.data() + byte, send_bytes[q]});
    at += n;
    byte += send_bytes[q];
  }
  ARCH_RETURN_IF_ERROR(bridge_->alltoallv(wire_out_.data(), send_bytes, wire_in_.data(), recv_bytes, comm::DType::kU8));
  at = byte = 0;
  for (size_t q = 0; q < plan.recv_counts.size(); ++q) {
    const size_t n = plan.recv_counts[q];
    if (n > 0) ARCH_RETURN_IF_ERROR(comm::decode(codec_, {wire_in_.data() + byte, recv_bytes[q]}, {in_.data() + at, n}));
    at += n;
    byte += recv_bytes[q];
  }
  return static_cast<uint64_t>(total_out);
}

// The all-to-all of the contributions and the weighted sum in island order.
core::Result<uint64_t> IslandBridge::exchange(const BridgePlan& plan, std::span<float> values,
                                              const std::map<int, float>& weight) {
  float* grads = values.data();
  const size_t n = plan.send.size();
  // Where each member's block starts in out_ / in_.
  std::vector<size_t> from(n + 1, 0);
  size_t send_total = 0;
  for (size_t q = 0; q < n; ++q) {
    from[q + 1] = from[q] + plan.recv_counts[q];
    send_total += plan.send_counts[q];
  }
  out_.resize(send_total);
  in_.resize(from[n]);
  size_t at = 0;
  for (const auto& runs : plan.send) {
    for (const auto& r : runs) {
      std::memcpy(out_.data() + at, grads + r.local, static_cast<size_t>(r.n) * sizeof(float));
      at += static_cast<size_t>(r.n);
    }
  }
  ARCH_ASSIGN_OR_RETURN(const uint64_t sent, alltoall(plan));
  const int64_t numel = static_cast<int64_t>(values.size());
  sum_.assign(static_cast<size_t>(numel), 0.0f);
  const int mine = plan.island[static_cast<size_t>(plan.me)];
  for (int isl : plan.islands) {
    // x 1 is exact: the gradient sum is the plain sum.
    const auto it = weight.find(isl);
    const float w = it == weight.end() ? 1.0f : it->second;
    if (isl == mine) {
      for (int64_t i = 0; i < numel; ++i) sum_[static_cast<size_t>(i)] += w * grads[i];
      continue;
    }
    for (size_t q = 0; q < n; ++q) {
      if (plan.island[q] != isl) continue;
      const float* v = in_.data() + from[q];
      for (const auto& r : plan.recv[q]) {
        float* dst = sum_.data() + r.local;
        for (int64_t i = 0; i < r.n; ++i) dst[i] += w * v[i];
        v += r.n;
      }
    }
  }
  std::memcpy(grads, sum_.data(), sum_.size() * sizeof(float));
  return sent;
}

core::Status IslandBridge::toPeers(std::span<float> values, std::span<double> extra) {
  if (!peers_ || peers_->size() <= 1) return core::okStatus();
  ARCH_RETURN_IF_ERROR(peers_->broadcast(values, 0));
  if (extra.empty()) return core::okStatus();
  // The root's values: the others add zeros.
  if (!bridge_) std::fill(extra.begin(), extra.end(), 0.0);
  return peers_->allreduceSum(extra);
}

core::Status IslandBridge::reduceGradients(StepStats& stats) {
  const auto t0 = core::Clock::now();
  HostView g(flat_.grads(), torch::kFloat32);
  const std::span<float> grads(g.data<float>(), static_cast<size_t>(flat_.numel()));
  if (bridge_) {
    roundOwn(grads, runs_[static_cast<size_t>(plan_.me)], {0, -1});
    ARCH_RETURN_IF_ERROR(exchange(plan_, grads, {}).status().withContext("gradient sum across islands"));
  }
  ARCH_RETURN_IF_ERROR(toPeers(grads, {}).withContext("gradients to the island's other replicas"));
  g.land();
  stats.wait_s += core::secondsSince(t0);
  return core::okStatus();
}

core::Status IslandBridge::setCodec(comm::CodecKind kind, bool error_feedback) {
  if (kind != comm::CodecKind::kNone && kind != comm::CodecKind::kBF16 && kind != comm::CodecKind::kFP16) {
    return core::invalidArgument(std::string("island bridge: codec ") + std::string(comm::codecName(kind)) +
                                 " scales blocks, which differ between the islands' layouts: bf16, fp16 or none");
  }
  codec_ = kind;
  error_feedback_ = error_feedback && kind != comm::CodecKind::kNone;
  return core::okStatus();
}

void IslandBridge::roundOwn(std::span<float> values, const std::vector<FlatRun>& held, std::pair<int64_t, int64_t> key) {
  if (codec_ == comm::CodecKind::kNone) return;
  own_.clear();
  for (const auto& r : held) own_.insert(own_.end(), values.begin() + r.local, values.begin() + r.local + r.n);
  if (error_feedback_) {
    feedback_.try_emplace(key, codec_).first->second.roundTrip(own_);
  } else {
    comm::roundTrip(codec_, own_);
  }
  size_t at = 0;
  for (const auto& r : held) {
    std::copy_n(own_.begin() + static_cast<std::ptrdiff_t>(at), r.n, values.begin() + r.local);
    at += static_cast<size_t>(r.n);
  }
}

core::Result<const BridgePlan*> IslandBridge::rangePlan(int64_t global_begin, int64_t global_end, size_t values) {
  auto it = range_plans_.find({global_begin, global_end});
  if (it != range_plans_.end()) return &it->second;
  // Every member's runs inside the range; this rank's counted from the range's lowest local offset.
  const Intervals range{{global_begin, global_end}};
  std::vector<std::vector<FlatRun>> runs;
  for (const auto& r : runs_) runs.push_back(clip(r, range));
  auto& mine = runs[static_cast<size_t>(plan_.me)];
  int64_t first = mine.empty() ? 0 : mine.front().local;
  for (const auto& r : mine) first = std::min(first, r.local);
  for (auto& r : mine) r.local -= first;
  if (countOf(mine) != static_cast<int64_t>(values)) {
    return core::internalError("island mean of range [" + std::to_string(global_begin) + ", " +
                               std::to_string(global_end) + "): " + std::to_string(values) + " values for the " +
                               std::to_string(countOf(mine)) + " this rank holds");
  }
  ARCH_ASSIGN_OR_RETURN(BridgePlan plan, bridgePlan(runs, plan_.island, plan_.me));
  return &range_plans_.emplace(std::make_pair(global_begin, global_end), std::move(plan)).first->second;
}

core::Status IslandBridge::islandMean(int64_t global_begin, int64_t global_end, std::span<float> values, double tokens,
                                      std::vector<double>& control, uint64_t& bytes_sent) {
  bytes_sent = 0;
  if (bridge_) {
    ARCH_ASSIGN_OR_RETURN(const BridgePlan* plan, rangePlan(global_begin, global_end, values.size()));
    // Every member's island tokens and control sums; one member per island counts.
    const size_t w = 1 + control.size(), n = static_cast<size_t>(bridge_->size());
    std::vector<double> mine(w), all(w * n);
    mine[0] = tokens;
    std::copy(control.begin(), control.end(), mine.begin() + 1);
    ARCH_RETURN_IF_ERROR(bridge_->allgather(mine.data(), all.data(), w, comm::DType::kF64).withContext("island token counts"));
    std::map<int, double> tok;
    std::fill(control.begin(), control.end(), 0.0);
    for (size_t m = 0; m < n; ++m) {
      if (!tok.emplace(plan->island[m], all[m * w]).second) continue;
      for (size_t j = 0; j < control.size(); ++j) control[j] += all[m * w + 1 + j];
    }
    double total = 0;
    for (const auto& [isl, t] : tok) total += t;
    std::map<int, float> weight;
    for (const auto& [isl, t] : tok) {
      weight[isl] = total > 0 ? static_cast<float>(t / total) : 1.0f / static_cast<float>(tok.size());
    }
    // This island's values as every other island will decode them.
    roundOwn(values, {{global_begin, 0, static_cast<int64_t>(values.size())}}, {global_begin, global_end});
    auto sent = exchange(*plan, values, weight);
    if (!sent.isOk()) return sent.status().withContext("pseudo-gradient mean across islands");
    bytes_sent = *sent;
  }
  return toPeers(values, control).withContext("the islands' mean to the island's other replicas");
}

namespace {
// One element's share of an island digest (splitmix64 of its index and bits).
uint64_t elementHash(int64_t global, float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  uint64_t z = static_cast<uint64_t>(global) * 0x9E3779B97F4A7C15ULL + bits;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
}  // namespace

core::Result<uint64_t> IslandBridge::compareIslands(std::span<const float> values) {
  if (!bridge_) return uint64_t{0};
  uint64_t mine = 0;  // wraps: a sum over the island's contributions, in any order
  for (const auto& r : plan_.contributes) {
    for (int64_t i = 0; i < r.n; ++i) mine += elementHash(r.global + i, values[static_cast<size_t>(r.local + i)]);
  }
  const size_t n = static_cast<size_t>(bridge_->size());
  int64_t sent = 0;
  std::memcpy(&sent, &mine, sizeof(sent));
  std::vector<int64_t> all(n);
  ARCH_RETURN_IF_ERROR(bridge_->allgather(&sent, all.data(), 1, comm::DType::kI64).withContext("island digests"));
  std::map<int, uint64_t> digest;
  for (size_t m = 0; m < n; ++m) {
    uint64_t d = 0;
    std::memcpy(&d, &all[m], sizeof(d));
    digest[plan_.island[m]] += d;
  }
  for (const auto& [isl, d] : digest) {
    if (d != digest.begin()->second) {
      return core::internalError("the islands' copies of the model differ: island " +
                                 std::to_string(digest.begin()->first) + " and island " + std::to_string(isl) +
                                 " hold other values for some tensor");
    }
  }
  return digest.begin()->second;
}

}  // namespace archipelago::runtime::parallel
