// Synchronous data parallelism between islands whose layouts differ
// (docs/parallelism.md "Per-island layouts"): island a runs TP=2, island b
// PP=2, and each step's gradient must still be the sum over every replica
// of the job. Their ranks hold different pieces of the model, so there is
// no rank-to-rank pairing to allreduce over: the sum goes by tensor name.
//
// Every rank's flat buffer is a set of runs of the single-process flat
// layout (ShardMap). After each island has summed its own replicas (the
// DataParallel part over same-position ranks), the first replica of every
// island holds the island's sum exactly once. Those ranks form the bridge:
// each sends every rank of the other islands the elements it contributes
// that the other rank holds (an element held by several ranks of one
// island, such as a norm weight under TP, is contributed by the first),
// in one all-to-all. Each rank then adds the islands' sums in island order,
// so every holder of an element computes the same bits, and hands the
// result to its island's other replicas (a broadcast over its
// same-position ranks). Traffic: each element crosses to each other
// island once per holder there, fp32 and uncompressed.
//
// Under DiLoCo the same exchange averages the islands' pseudo-gradients at
// an outer step (islandMean: weighted by the tokens each island trained on,
// the control values summed alongside), the outer sync's cross-island
// exchange for layouts that cannot pair ranks by position. Streaming DiLoCo
// averages one fragment at a time: a fragment is a range of the
// single-process layout, so it names the same tensors on every rank, and a
// rank holds its elements as one contiguous range of its own buffer
// (rangeMean; the plan restricted to the range, made once per range).
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <memory>
#include <string>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/dp_comm.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/parallel/part.h"
#include "archipelago/runtime/shard_map.h"

namespace archipelago::runtime::parallel {

// Elements [global, global + n) of the single-process flat layout, at
// `local` in a rank's flat buffer.
struct FlatRun {
  int64_t global = 0, local = 0, n = 0;
  bool operator==(const FlatRun&) const = default;
};

// A rank's runs over its flat buffer [0, numel): sorted by global index,
// neighbours merged where both indices continue.
std::vector<FlatRun> heldRuns(const ShardMap& map, int64_t numel);

// What bridge member `me` sends to and receives from every member, as runs
// of its own buffer in global order (both ends list the same elements in
// the same order). `runs`: every member's heldRuns; `island`: every
// member's island. Fails when an island does not cover an element `me`
// holds exactly once (it would be summed twice or not at all).
struct BridgePlan {
  std::vector<std::vector<FlatRun>> send, recv;  // per member
  std::vector<size_t> send_counts, recv_counts;  // per member: elements of send / recv
  std::vector<int> islands;                      // the islands, ascending
  std::vector<int> island;                       // per member
  int me = 0;
};
core::Result<BridgePlan> bridgePlan(const std::vector<std::vector<FlatRun>>& runs, const std::vector<int>& island,
                                    int me);

// Where a rank's buffer is cut by `global_cuts` (ascending offsets of the
// single-process layout, first 0, last its size): per cut, how many of the
// rank's elements lie before it. Fails when the rank's elements of one
// range are not contiguous in its buffer.
core::Result<std::vector<int64_t>> localCuts(const std::vector<FlatRun>& runs, const std::vector<int64_t>& global_cuts);

class IslandBridge final : public Part {
 public:
  // `bridge`: the bridge group (null on a rank that is not in it), its
  // members' islands and every member's runs; `peers`: this rank's
  // same-position ranks of its island, the bridge member first (null: none).
  IslandBridge(FlatParams& flat, std::shared_ptr<comm::Group> bridge, BridgePlan plan, DpComm* peers,
               std::vector<std::vector<FlatRun>> runs = {})
      : flat_(flat), bridge_(std::move(bridge)), plan_(std::move(plan)), peers_(peers), runs_(std::move(runs)) {}
  // Every rank of the job: exchanges its runs with the bridge (a member)
  // and builds the plan.
  static core::Result<std::unique_ptr<IslandBridge>> create(FlatParams& flat, const ShardMap& map,
                                                            std::shared_ptr<comm::Group> bridge,
                                                            std::vector<int> island_of_member, DpComm* peers);
  std::string name() const override { return "island bridge"; }
  // After the island's own reduction: the job-wide sum on every rank.
  core::Status reduceGradients(StepStats& stats) override;
  // `values` (this rank's flat layout, identical within its island): the
  // islands' mean weighted by `tokens` (this island's count; equal weights
  // if no island counted any); `control`: this island's sums, replaced by
  // the islands' sum. Every rank of the job calls it with as many values.
  core::Status islandMean(std::span<float> values, double tokens, std::vector<double>& control);
  // The same for the elements of single-process range [global_begin,
  // global_end) only: `values` are this rank's of them (contiguous in its
  // buffer; localCuts). Every rank of the job calls it for the same range.
  core::Status rangeMean(int64_t global_begin, int64_t global_end, std::span<float> values, double tokens,
                         std::vector<double>& control);
  // Elements this rank sends per step (for the log).
  int64_t sentPerStep() const;

 private:
  // sum = sum over islands, in island order, of weight[k] x island k's values.
  core::Status exchange(const BridgePlan& plan, std::span<float> values, const std::map<int, float>& weight);
  // The islands' token-weighted mean over `plan` (a member), control summed.
  core::Status mean(const BridgePlan& plan, std::span<float> values, double tokens, std::vector<double>& control);
  // The bridge member's values (and `extra`) to the island's other replicas.
  core::Status toPeers(std::span<float> values, std::span<double> extra);
  FlatParams& flat_;
  std::shared_ptr<comm::Group> bridge_;
  BridgePlan plan_;
  DpComm* peers_;
  std::vector<std::vector<FlatRun>> runs_;  // every member's (bridge members only)
  std::map<std::pair<int64_t, int64_t>, BridgePlan> range_plans_;
  // Host buffers of exchange(), kept across steps: what it sends, what it
  // receives, the sum.
  std::vector<float> out_, in_, sum_;
};

}  // namespace archipelago::runtime::parallel
