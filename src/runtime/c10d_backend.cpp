#include "archipelago/runtime/c10d_backend.h"

#include <algorithm>
#include <future>

#include <fmt/format.h>

#include "archipelago/core/background_queue.h"
#include "archipelago/model/torch_compat.h"

// Set by src/runtime/CMakeLists.txt (0 or 1).
#ifndef ARCHIPELAGO_WITH_GLOO
#define ARCHIPELAGO_WITH_GLOO 0
#endif
#ifndef ARCHIPELAGO_WITH_NCCL
#define ARCHIPELAGO_WITH_NCCL 0
#endif

#if ARCHIPELAGO_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "runtime/c10d_group.h"
#endif

namespace archipelago::runtime {

core::Result<std::string> c10dLibraryFor(const torch::Device& device) {
  if (device.is_cpu() && ARCHIPELAGO_WITH_GLOO) return std::string("gloo");
  if (device.is_cuda() && ARCHIPELAGO_WITH_NCCL && ARCHIPELAGO_WITH_GLOO) return std::string("nccl");
  return core::invalidArgument(fmt::format(
      "strategy.island_collectives: c10d has no collective library for device '{}' in this build (it has: {}{}); "
      "use strategy.island_collectives: comm",
      device.str(), ARCHIPELAGO_WITH_GLOO ? "gloo for cpu" : "none",
      ARCHIPELAGO_WITH_NCCL ? ", nccl for cuda" : ""));
}

#if ARCHIPELAGO_WITH_GLOO
namespace {

using Collectives = model::compat::C10dCollectives;

class FutureReduce final : public PendingReduce {
 public:
  explicit FutureReduce(std::future<core::Status> f) : f_(std::move(f)) {}
  core::Status wait() override { return f_.get(); }

 private:
  std::future<core::Status> f_;
};

// [begin, end) of piece i when n elements are cut into k pieces.
std::pair<int64_t, int64_t> pieceOf(int64_t n, int k, int i) { return {n * i / k, n * (i + 1) / k}; }

class C10dBackend final : public IslandBackend {
 public:
  C10dBackend(const C10dBackendOptions& o, c10::intrusive_ptr<Collectives> group, std::string library)
      : o_(o), group_(std::move(group)), library_(std::move(library)) {}

  std::string describe() const override {
    std::string s = fmt::format("c10d {} inside islands of {}", library_, o_.island_size);
    if (o_.islands > 1) s += fmt::format(", comm across {} islands ({})", o_.islands, o_.cross->describe());
    return s;
  }

  torch::TensorOptions wireOptions(const torch::Device& device, torch::ScalarType dtype) const override {
    return torch::TensorOptions().device(device).dtype(dtype);
  }

  std::unique_ptr<PendingReduce> allreduceSum(torch::Tensor wire) override {
    auto done = std::make_shared<std::promise<core::Status>>();
    auto f = done->get_future();
    queue_.submit(
        [this, wire, done] {
          core::Status st = sum(wire);
          done->set_value(st);
          return st;
        },
        [done](const core::Status& first) { done->set_value(first); });
    return std::make_unique<FutureReduce>(std::move(f));
  }

 private:
  core::Status sum(const torch::Tensor& wire) {
    core::Status st = legs(wire);
    // A failed leg closes the group at once, and with it its connections,
    // so a peer waiting on this rank inside a collective fails now too
    // rather than at its timeout (the queue skips the buckets after this one).
    if (!st.isOk()) group_.reset();
    return st;
  }

  core::Status legs(const torch::Tensor& wire) {
    try {
      torch::NoGradGuard no_grad;
      std::vector<at::Tensor> t{wire};
      group_->allreduce(t)->wait();
      if (o_.islands > 1) {
        ARCH_RETURN_IF_ERROR(acrossIslands(wire));
        gatherPieces(wire);
      }
      return core::okStatus();
    } catch (const std::exception& e) {
      return core::unavailable(fmt::format("c10d {} collective inside the island (position {} of {}): {}", library_,
                                           o_.position, o_.island_size, e.what()));
    }
  }

  // Leg 2: this position's piece of the island's sum over every island.
  core::Status acrossIslands(const torch::Tensor& wire) {
    const auto [lo, hi] = pieceOf(wire.numel(), o_.island_size, o_.position);
    torch::Tensor piece = wire.narrow(0, lo, hi - lo);
    torch::Tensor host = piece.is_cpu() ? piece : piece.to(model::compat::hostStagingOptions(piece.device(), piece.scalar_type()));
    const auto n = static_cast<size_t>(host.numel());
    std::unique_ptr<PendingReduce> op =
        host.scalar_type() == torch::kBFloat16
            ? o_.cross->allreduceSumBf16Async(
                  std::span<uint16_t>(reinterpret_cast<uint16_t*>(host.data_ptr<at::BFloat16>()), n))
            : o_.cross->allreduceSumAsync(std::span<float>(host.data_ptr<float>(), n));
    ARCH_RETURN_IF_ERROR(op->wait().withContext("c10d backend: the cross-island leg"));
    if (!piece.is_cpu()) piece.copy_(host);
    return core::okStatus();
  }

  // Leg 3: every position's piece to every rank of the island (the pieces
  // padded to one size, as c10d's allgather wants).
  void gatherPieces(const torch::Tensor& wire) {
    const int64_t n = wire.numel();
    const int k = o_.island_size;
    const int64_t chunk = (n + k - 1) / k;
    const auto [lo, hi] = pieceOf(n, k, o_.position);
    std::vector<at::Tensor> in{torch::zeros({chunk}, wire.options())};
    in[0].narrow(0, 0, hi - lo).copy_(wire.narrow(0, lo, hi - lo));
    std::vector<std::vector<at::Tensor>> out(1);
    for (int i = 0; i < k; ++i) out[0].push_back(torch::empty({chunk}, wire.options()));
    group_->allgather(out, in)->wait();
    for (int i = 0; i < k; ++i) {
      const auto [a, b] = pieceOf(n, k, i);
      if (i != o_.position) wire.narrow(0, a, b - a).copy_(out[0][static_cast<size_t>(i)].narrow(0, 0, b - a));
    }
  }

  C10dBackendOptions o_;
  c10::intrusive_ptr<Collectives> group_;
  std::string library_;
  core::BackgroundQueue queue_;  // last: joined before the members its tasks use
};

}  // namespace

core::Result<std::unique_ptr<IslandBackend>> makeC10dBackend(const C10dBackendOptions& o) {
  ARCH_ASSIGN_OR_RETURN(const std::string library, c10dLibraryFor(o.device));
  if (o.islands > 1 && !o.cross) return core::invalidArgument("c10d backend: several islands need the cross-island group");
  if (library == "gloo" && o.dtype != torch::kFloat32) {
    return core::invalidArgument("train.reduce_dtype: bf16 cannot be summed by c10d's Gloo (libtorch 1.13's has no "
                                 "bf16 sum); use train.reduce_dtype: fp32 or strategy.island_collectives: comm");
  }
  ARCH_ASSIGN_OR_RETURN(auto group, makeC10dGroup({.members = o.island_group, .host = o.host, .device = o.device,
                                                     .timeout_s = o.timeout_s, .name = "island"}));
  return std::unique_ptr<IslandBackend>(std::make_unique<C10dBackend>(o, std::move(group), library));
}

#else

core::Result<std::unique_ptr<IslandBackend>> makeC10dBackend(const C10dBackendOptions& o) {
  ARCH_RETURN_IF_ERROR(c10dLibraryFor(o.device).status());
  return core::internalError("unreachable");
}

#endif

}  // namespace archipelago::runtime
