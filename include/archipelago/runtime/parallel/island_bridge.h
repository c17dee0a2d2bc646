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
// island once per holder there, in fp32 or the codec.
//
// Under DiLoCo the same exchange averages the islands' pseudo-gradients at
// an outer step (islandMean: weighted by the tokens each island trained on,
// the control values summed alongside), the outer sync's cross-island
// exchange for layouts that cannot pair ranks by position. It goes one
// range of the single-process layout at a time (the whole model, or one of
// streaming's fragments, which so names the same tensors on every rank); a
// rank holds its elements of a range as one contiguous range of its own
// buffer, and the plan restricted to the range is made once. Gradients
// and means may cross in an element-wise codec (bf16, fp16): each member
// rounds its own values first (with error feedback, per range), and a
// rounded value encodes to itself, so every rank sums the same bits for
// every island.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <memory>
#include <string>
#include <vector>

#include "archipelago/comm/codec.h"
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
  std::vector<FlatRun> contributes;              // what `me` contributes for its island
  int me = 0;
};
core::Result<BridgePlan> bridgePlan(const std::vector<std::vector<FlatRun>>& runs, const std::vector<int>& island,
                                    int me);

// Where a rank's buffer is cut by `global_cuts` (ascending offsets of the
// single-process layout, first 0, last its size): per cut, how many of the
// rank's elements lie before it. Fails unless the rank's elements of each
// range (in any order) are the next range of its buffer.
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
  // and builds the plan. A member holds its flat buffer's elements
  // [local_begin, local_end) (-1: to the end; ZeRO-2: its optimizer slice).
  static core::Result<std::unique_ptr<IslandBridge>> create(FlatParams& flat, const ShardMap& map,
                                                            std::shared_ptr<comm::Group> bridge,
                                                            std::vector<int> island_of_member, DpComm* peers,
                                                            int64_t local_begin = 0, int64_t local_end = -1);
  std::string name() const override { return "island bridge"; }
  // After the island's own reduction: the job-wide sum on every rank.
  core::Status reduceGradients(StepStats& stats) override;
  // `values`: this rank's elements of single-process range [global_begin,
  // global_end) (contiguous in its buffer: localCuts; identical within its
  // island), replaced by the islands' mean weighted by `tokens` (this
  // island's count; equal weights if no island counted any); `control`:
  // this island's sums, replaced by the islands' sum. Every rank of the job
  // calls it for the same range. `bytes_sent`: what this rank sent.
  core::Status islandMean(int64_t global_begin, int64_t global_end, std::span<float> values, double tokens,
                          std::vector<double>& control, uint64_t& bytes_sent);
  // The codec the values cross in (the gradient sum and islandMean): none,
  // bf16 or fp16 (element-wise).
  core::Status setCodec(comm::CodecKind kind, bool error_feedback);
  // Whether every island holds the same bits of every element of
  // `values` (this rank's flat layout): each island's contributions hashed
  // element by element (global index and bits, summed: the order does not
  // matter), one allgather over the bridge; kInternal naming the islands
  // otherwise. Every rank of the job calls it; the digest on success.
  core::Result<uint64_t> compareIslands(std::span<const float> values);
  // Elements this rank sends per step (for the log).
  int64_t sentPerStep() const;

 private:
  // sum = sum over islands, in island order, of weight[k] x island k's
  // values (crossing in codec_ when set); returns the bytes sent.
  core::Result<uint64_t> exchange(const BridgePlan& plan, std::span<float> values, const std::map<int, float>& weight);
  // The members' blocks of out_ to in_ in codec_; returns the bytes sent.
  core::Result<uint64_t> alltoall(const BridgePlan& plan);
  // The elements `held` lists (runs of `values`) rounded as every other
  // island will decode them, with error feedback kept under `key`.
  void roundOwn(std::span<float> values, const std::vector<FlatRun>& held, std::pair<int64_t, int64_t> key);
  // The plan of one range of the single-process layout (made on first use).
  core::Result<const BridgePlan*> rangePlan(int64_t global_begin, int64_t global_end, size_t values);
  // The bridge member's values (and `extra`) to the island's other replicas.
  core::Status toPeers(std::span<float> values, std::span<double> extra);
  FlatParams& flat_;
  std::shared_ptr<comm::Group> bridge_;
  BridgePlan plan_;
  DpComm* peers_;
  std::vector<std::vector<FlatRun>> runs_;  // every member's (bridge members only)
  std::map<std::pair<int64_t, int64_t>, BridgePlan> range_plans_;
  comm::CodecKind codec_ = comm::CodecKind::kNone;
  bool error_feedback_ = false;
  std::map<std::pair<int64_t, int64_t>, comm::ErrorFeedback> feedback_;  // per range
  std::vector<uint8_t> wire_out_, wire_in_;  // encoded blocks
  std::vector<float> own_;                    // roundOwn's gathered values
  // Host buffers of exchange(), kept across steps: what it sends, what it
  // receives, the sum.
  std::vector<float> out_, in_, sum_;
};

}  // namespace archipelago::runtime::parallel
