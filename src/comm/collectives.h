// Internal: the collective algorithms, written against a Mesh and an
// ordered rank list, so Group ops and the phases of the hierarchical
// allreduce (which run on sub-lists of a group) share one implementation.
// Tags: group id (16) | 0 (1) | sequence (19) | phase (8) | step*64+piece (20).
// (Point-to-point tags have bit 47 set; see Group::nextP2pTag.)
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "comm/mesh.h"

namespace archipelago::comm::algo {

struct Ctx {
  Mesh* mesh = nullptr;
  std::vector<int> ranks;  // global ranks, ordered
  int me = 0;              // index of this process in ranks
  uint64_t tag_base = 0;
  core::Deadline deadline = core::Deadline::never();
  const core::AbortFlag* abort = nullptr;
  const CommOptions* opt = nullptr;
  bool same_host_copy = true;  // OpOptions::same_host_copy

  SendHandle send(int peer, uint64_t tag, const void* data, size_t bytes) const {
    return mesh->send(peer, tag, data, bytes, same_host_copy);
  }
  int n() const { return static_cast<int>(ranks.size()); }
  uint64_t tag(uint32_t phase, uint32_t sub) const {
    return tag_base | (static_cast<uint64_t>(phase & 0xff) << 20) | (sub & 0xfffff);
  }
  Ctx withRanks(std::vector<int> r, int my_index) const {
    Ctx c = *this;
    c.ranks = std::move(r);
    c.me = my_index;
    return c;
  }
};

// In-place ring over blocks: block i = counts[i] elements (in order, packed).
// rs: reduce-scatter so that member i holds the reduced block i; ag:
// allgather the blocks. divide_by != 0: the owner divides its reduced block.
core::Status ring(const Ctx& c, uint8_t* data, std::span<const size_t> counts, DType dtype, ReduceOp op, bool rs,
                  bool ag, double divide_by, uint32_t phase);
// Latency-optimal allreduce (recursive doubling, non-powers of two folded in).
core::Status recursiveDoubling(const Ctx& c, uint8_t* data, size_t count, DType dtype, ReduceOp op, double divide_by,
                               uint32_t phase);
// Bandwidth-optimal in 2 log2(p) steps (Rabenseifner): reduce-scatter by
// recursive halving, allgather by recursive doubling, over the largest
// power of two p <= n; the other n - p members fold in and out.
core::Status halvingDoubling(const Ctx& c, uint8_t* data, size_t count, DType dtype, ReduceOp op, double divide_by,
                             uint32_t phase);
// What kAuto runs for n members and `count` elements (CommOptions'
// small_message_bytes and halving_doubling_bytes).
AllreduceAlgo autoAllreduceAlgo(int n, size_t count, size_t elem_bytes, const CommOptions& opt);
core::Status allreduce(const Ctx& c, uint8_t* data, size_t count, DType dtype, ReduceOp op, double divide_by,
                       AllreduceAlgo algo, uint32_t phase);
// f32 ring allreduce whose every hop carries codec-encoded bytes; the owner
// of each block round-trips its own copy so all members end bit-identical.
core::Status ringCodec(const Ctx& c, float* data, size_t count, CodecKind codec, double divide_by, uint32_t phase,
                       uint64_t* wire_bytes);
core::Status broadcast(const Ctx& c, uint8_t* data, size_t bytes, int root, uint32_t phase);
core::Status alltoallv(const Ctx& c, const uint8_t* in, std::span<const size_t> send_bytes, uint8_t* out,
                       std::span<const size_t> recv_bytes, uint32_t phase);
core::Status barrier(const Ctx& c, uint32_t phase);
std::vector<size_t> evenCounts(size_t count, int parts);

// Tag phases reserved by the Group ops (the algorithms above take a phase).
constexpr uint32_t kPhaseWeightSum = 255;  // sum of the weights of kWeightedAvg
constexpr uint32_t kMaxHierChunks = 64;    // hierarchical chunk c uses phases 1+3c..3+3c

}  // namespace archipelago::comm::algo
