// The expert all-to-all on libtorch's c10d (strategy.island_collectives:
// c10d): token rows go to their experts' owners and back through the
// device's collective library, NCCL's all-to-all on a GPU island, Gloo's
// on the CPU, so the CPU build runs the path a GPU island takes
// (docs/devices.md "Island collectives"). An expert group always lies
// inside one island. Rows travel in fp32 and counts in int64, as on the
// comm path, so both follow the single-process run; there is no dispatch
// codec here (the config refuses one with c10d). Failures: as the island
// backend's (c10d_backend.h); an expert layout cannot shrink, so the job
// restarts from its newest checkpoint.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/status.h"
#include "archipelago/runtime/parallel/expert.h"

namespace archipelago::runtime::parallel {

struct C10dExpertExchangeOptions {
  std::shared_ptr<comm::Group> group;  // the expert group (rendezvous; its rank order is member order)
  std::vector<int64_t> expert_begin;   // as model::ExpertExchange::expertBegin
  std::string host = "127.0.0.1";      // this worker's advertised address
  torch::Device device = torch::kCPU;
  double timeout_s = 60;
};

// Every member of the group calls it at once. An error names the device
// and the libraries this build has (c10dLibraryFor) or the rendezvous failure.
core::Result<std::shared_ptr<RuntimeExpertExchange>> makeC10dExpertExchange(const C10dExpertExchangeOptions& o);

}  // namespace archipelago::runtime::parallel
