// Tensor-parallel collectives on libtorch's c10d (strategy.island_collectives:
// c10d): the partial sums of row-parallel layers and sequence parallelism's
// reduce-scatters and allgathers run on the workers' own tensors through
// the device's collective library, NCCL on a GPU island (activations never
// leave the device), Gloo on the CPU, so the CPU build runs the path a GPU
// island takes (docs/devices.md "Island collectives"). A tensor-parallel
// group always lies inside one island. The values carried and reduced are
// those of the comm path (tensorParallelWireType); Gloo has no
// reduce-scatter in libtorch 1.13, so there it is an allreduce of which
// each rank keeps its block (twice the bytes; NCCL reduce-scatters).
// Failures: as the island backend's (c10d_backend.h), a collective cannot
// be interrupted before its timeout; a tensor-parallel layout cannot shrink,
// so the job restarts from its newest checkpoint.
#pragma once

#include <memory>
#include <string>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/parallel/tensor_parallel.h"

namespace archipelago::runtime::parallel {

struct C10dTensorParallelOptions {
  std::shared_ptr<comm::Group> group;  // the tensor-parallel group (rendezvous; its rank order is TP rank order)
  std::string host = "127.0.0.1";      // this worker's advertised address
  torch::Device device = torch::kCPU;
  double timeout_s = 60;
};

// Every rank of the group calls it at once. An error names the device and
// the libraries this build has (c10dLibraryFor) or the rendezvous failure.
core::Result<std::shared_ptr<TensorParallelCollectives>> makeC10dTensorParallel(const C10dTensorParallelOptions& o);

}  // namespace archipelago::runtime::parallel
