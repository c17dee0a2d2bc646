#include "runtime/c10d_group.h"

#if ARCHIPELAGO_WITH_GLOO

#include <algorithm>
#include <array>
#include <chrono>

#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if ARCHIPELAGO_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "archipelago/comm/address.h"
#include "archipelago/runtime/c10d_backend.h"

namespace archipelago::runtime {

namespace {

// The group's store: its rank 0 serves it, the others learn the port over comm.
core::Result<c10::intrusive_ptr<c10d::Store>> groupStore(const C10dGroupOptions& o) {
  c10d::TCPStoreOptions so;
  so.isServer = o.members->rank() == 0;
  so.port = 0;
  so.numWorkers = o.members->size();
  so.waitWorkers = false;
  so.timeout = std::chrono::milliseconds(static_cast<int64_t>(o.timeout_s * 1000));
  c10::intrusive_ptr<c10d::TCPStore> server;
  std::array<char, 512> address{};  // "host:port" of the store, from rank 0
  if (so.isServer) {
    server = c10::make_intrusive<c10d::TCPStore>(o.host, so);
    const std::string text = comm::joinHostPort(o.host, server->getPort());
    std::copy_n(text.begin(), std::min(text.size(), address.size() - 1), address.begin());
  }
  ARCH_RETURN_IF_ERROR(o.members
                           ->broadcast(address.data(), address.size(), comm::DType::kU8, 0,
                                       comm::OpOptions::within(o.timeout_s))
                           .withContext("c10d " + o.name + ": the store's address"));
  if (server) return c10::intrusive_ptr<c10d::Store>(server);
  ARCH_ASSIGN_OR_RETURN(auto at, comm::splitHostPort(std::string(address.data())));
  so.port = static_cast<uint16_t>(at.second);
  return c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::TCPStore>(at.first, so));
}

}  // namespace

core::Result<c10::intrusive_ptr<model::compat::C10dCollectives>> makeC10dGroup(const C10dGroupOptions& o) {
  ARCH_ASSIGN_OR_RETURN(const std::string library, c10dLibraryFor(o.device));
  const int rank = o.members->rank(), size = o.members->size();
  try {
    ARCH_ASSIGN_OR_RETURN(auto store, groupStore(o));
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("archipelago/" + o.name, store);
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(o.timeout_s * 1000));
    c10::intrusive_ptr<model::compat::C10dCollectives> group;
#if ARCHIPELAGO_WITH_NCCL
    if (library == "nccl") {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, opts);
    }
#endif
    if (library == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(o.host));
      opts->threads = 1;
      group = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, opts);
    }
    return group;
  } catch (const std::exception& e) {
    return core::unavailable(fmt::format("c10d {} ({}, rank {} of {}, address {}): {}", o.name, library, rank, size,
                                         o.host, e.what()));
  }
}

namespace {
int64_t largestBlock(std::span<const int64_t> offsets) {
  int64_t most = 0;
  for (size_t r = 0; r + 1 < offsets.size(); ++r) most = std::max(most, offsets[r + 1] - offsets[r]);
  return most;
}
}  // namespace

void c10dReduceScatterBlocks(model::compat::C10dCollectives& group, const std::string& library,
                             const torch::Tensor& wire, std::span<const int64_t> offsets, int rank) {
  torch::NoGradGuard no_grad;
  if (library == "gloo") {
    std::vector<at::Tensor> io{wire};
    group.allreduce(io)->wait();
    return;
  }
  const int64_t block = largestBlock(offsets);
  const auto r = static_cast<size_t>(rank);
  std::vector<at::Tensor> out{torch::empty({block}, wire.options())};
  std::vector<std::vector<at::Tensor>> in(1);
  for (size_t i = 0; i + 1 < offsets.size(); ++i) {
    const int64_t n = offsets[i + 1] - offsets[i];
    torch::Tensor padded = n == block ? wire.narrow(0, offsets[i], n) : torch::zeros({block}, wire.options());
    if (n != block) padded.narrow(0, 0, n).copy_(wire.narrow(0, offsets[i], n));
    in[0].push_back(padded);
  }
  group.reduce_scatter(out, in)->wait();
  wire.narrow(0, offsets[r], offsets[r + 1] - offsets[r]).copy_(out[0].narrow(0, 0, offsets[r + 1] - offsets[r]));
}

void c10dAllgatherBlocks(model::compat::C10dCollectives& group, const torch::Tensor& wire,
                         std::span<const int64_t> offsets, int rank) {
  torch::NoGradGuard no_grad;
  const int64_t block = largestBlock(offsets);
  const auto r = static_cast<size_t>(rank);
  std::vector<at::Tensor> in{torch::zeros({block}, wire.options())};
  in[0].narrow(0, 0, offsets[r + 1] - offsets[r]).copy_(wire.narrow(0, offsets[r], offsets[r + 1] - offsets[r]));
  std::vector<std::vector<at::Tensor>> out(1);
  for (size_t i = 0; i + 1 < offsets.size(); ++i) out[0].push_back(torch::empty({block}, wire.options()));
  group.allgather(out, in)->wait();
  for (size_t i = 0; i + 1 < offsets.size(); ++i) {
    const int64_t n = offsets[i + 1] - offsets[i];
    if (i != r && n > 0) wire.narrow(0, offsets[i], n).copy_(out[0][i].narrow(0, 0, n));
  }
}

}  // namespace archipelago::runtime

#endif  // ARCHIPELAGO_WITH_GLOO
