// Internal to the runtime: one c10d process group (libtorch's collective
// libraries: Gloo for the CPU, NCCL for CUDA) over the ranks of a comm
// group, what the island backend (c10d_backend.h) and the tensor-parallel
// collectives (parallel/c10d_tensor_parallel.h) run on. Rendezvous: the
// group's rank 0 serves a c10d TCPStore on an ephemeral port of its
// advertised address and sends "host:port" to the others over the comm
// group; the process group binds to the same address. Compiled only where
// this build has c10d's Gloo (ARCHIPELAGO_WITH_GLOO, set for the runtime).
#pragma once

#if ARCHIPELAGO_WITH_GLOO

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <c10/util/intrusive_ptr.h>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/status.h"
#include "archipelago/model/torch_compat.h"

namespace archipelago::runtime {

struct C10dGroupOptions {
  // Rank i of this group is c10d rank i; every member calls makeC10dGroup.
  std::shared_ptr<comm::Group> members;
  std::string host = "127.0.0.1";  // this worker's advertised address
  torch::Device device = torch::kCPU;
  double timeout_s = 60;  // c10d's own: a collective cannot be interrupted before it
  std::string name;       // the store's key prefix, and what errors call the group
};

// The c10d group for o.device's library (c10dLibraryFor), or kUnavailable
// naming the group, the library, this rank and the address.
core::Result<c10::intrusive_ptr<model::compat::C10dCollectives>> makeC10dGroup(const C10dGroupOptions& o);

// Runs `f` (collectives on `group`, which may throw what c10d throws)
// without autograd. An exception closes the group, and with it its
// connections, so peers waiting on this rank inside a collective fail now
// rather than at their timeout; it comes back kUnavailable as "<who>:
// <what c10d said>". A group closed earlier is kUnavailable at once.
template <typename F>
core::Status c10dCall(c10::intrusive_ptr<model::compat::C10dCollectives>& group, const std::string& who, F&& f) {
  if (!group) return core::unavailable("the group was closed after an earlier failure");
  try {
    torch::NoGradGuard no_grad;
    f();
    return core::okStatus();
  } catch (const std::exception& e) {
    group.reset();
    return core::unavailable(who + ": " + e.what());
  }
}

// Blocks of uneven sizes over a c10d group, whose collectives want one size
// per rank: `wire` (1-D, contiguous, on the group's device) is the group's
// blocks in rank order, block r = [offsets[r], offsets[r+1]) (size+1
// ascending offsets from 0 to wire.numel()). Both throw what c10d throws.
//
// Sums `wire` over the group; block `rank` holds the sum afterwards, the
// others are clobbered. NCCL: a reduce-scatter of the blocks padded to one
// size. libtorch 1.13's Gloo has no reduce-scatter: the whole allreduce.
void c10dReduceScatterBlocks(model::compat::C10dCollectives& group, const std::string& library,
                             const torch::Tensor& wire, std::span<const int64_t> offsets, int rank);
// Every rank's block to every rank: block `rank` is this rank's, the
// others are overwritten (an allgather of the blocks padded to one size).
void c10dAllgatherBlocks(model::compat::C10dCollectives& group, const torch::Tensor& wire,
                         std::span<const int64_t> offsets, int rank);

}  // namespace archipelago::runtime

#endif  // ARCHIPELAGO_WITH_GLOO
