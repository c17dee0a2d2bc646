// A native island backend (runtime/island_backend.h) on libtorch's c10d
// collectives: NCCL for CUDA devices (in a build against a CUDA libtorch
// with NCCL), Gloo for the CPU (Debian's libtorch has it), so the CPU build
// runs the very path a GPU island takes (docs/devices.md "Island
// collectives").
//
// A bucket is summed in three legs, each rank holding its island's i-th
// position:
//   1. allreduce inside the island, on the device (c10d);
//   2. across islands: piece i of the island's sum over the ranks at
//      position i of every island, through the comm layer (host memory, the
//      strait codec) — skipped with one island;
//   3. allgather of the pieces inside the island (c10d).
// Every rank then holds the same sum, bit for bit. ZeRO's reduce-scatters
// and gathers take the same split: inside one island c10d alone; over
// several, a reduce-scatter is the island's c10d allreduce and then this
// position's blocks of every island reduce-scattered across through comm,
// and an allgather is the reverse (across through comm, then each
// position's blocks to the island by c10d). Every collective runs in order
// on one thread of the backend.
//
// Rendezvous: the island's first rank serves a c10d TCPStore on its
// advertised address (an ephemeral port, sent to the others over the comm
// layer), and the process group binds there too. A failed leg is
// kUnavailable, which the elastic loop answers like any peer failure; the
// trainer then drops the backend and goes on through comm. A killed peer
// fails the collective at once (its connections close), and the rank that
// sees it closes its group, so the others waiting on it fail too; a peer
// that stops without closing (SIGSTOP, a partition) is seen only when the
// collective times out after `timeout_s`, which c10d cannot interrupt.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/island_backend.h"

namespace archipelago::runtime {

struct C10dBackendOptions {
  int position = 0;        // this rank's index in its island's part of the gradient group
  int island_size = 1;     // ranks of the gradient group in each island
  int islands = 1;         // islands of the gradient group
  // This rank's island, for the rendezvous (its position 0 serves the store).
  std::shared_ptr<comm::Group> island_group;
  // Position `position` of every island (islands > 1): the cross-island
  // leg; its rank i is island i of `blocks`.
  DpComm* cross = nullptr;
  // ZeRO's blocks: blocks[i][p] is the gradient group's rank of position
  // p in island i (the block it keeps of a reduce-scatter).
  std::vector<std::vector<int>> blocks;
  std::string host = "127.0.0.1";  // this worker's advertised address
  torch::Device device = torch::kCPU;
  torch::ScalarType dtype = torch::kFloat32;  // what the buckets are summed in (train.reduce_dtype)
  double timeout_s = 60;
};

// The c10d library of `device` in this build ("gloo", "nccl"), or an error
// naming the device and what this build has.
core::Result<std::string> c10dLibraryFor(const torch::Device& device);

core::Result<std::unique_ptr<IslandBackend>> makeC10dBackend(const C10dBackendOptions& options);

}  // namespace archipelago::runtime
