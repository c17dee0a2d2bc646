#include "archipelago/runtime/c10d_backend.h"

#include <algorithm>
#include <functional>
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
    return enqueue([this, wire] { return legs(wire); });
  }

  // ZeRO: block r of a reduce-scatter or gather is the gradient group's
  // rank r, position p of island i (o_.blocks[i][p]). Inside one island,
  // c10d alone; over several, c10d inside and comm across, as the buckets.
  std::unique_ptr<PendingReduce> reduceScatterSum(torch::Tensor wire, std::vector<size_t> counts) override {
    return enqueue([this, wire, counts] {
      std::vector<int64_t> at{0};
      for (size_t c : counts) at.push_back(at.back() + static_cast<int64_t>(c));
      ARCH_RETURN_IF_ERROR(checkBlocks("reduce-scatter", at));
      if (o_.islands == 1) return guarded([&] { c10dReduceScatterBlocks(*group_, library_, wire, at, o_.position); });
      // The island's sum, then this position's blocks over every island.
      ARCH_RETURN_IF_ERROR(guarded([&] { allreduceInside(wire); }));
      return blocksAcrossIslands(wire, at, false);
    });
  }

  core::Status allgatherSlices(torch::Tensor wire, std::vector<int64_t> offsets) override {
    return enqueue([this, wire, offsets] {
      ARCH_RETURN_IF_ERROR(checkBlocks("allgather", offsets));
      if (o_.islands == 1) return guarded([&] { c10dAllgatherBlocks(*group_, wire, offsets, o_.position); });
      // This position's blocks of every island, then every position's to the island.
      ARCH_RETURN_IF_ERROR(blocksAcrossIslands(wire, offsets, true));
      return guarded([&] { packsInsideIsland(wire, offsets); });
    })->wait();
  }

 private:
  // Every collective of the group runs on the backend's one thread, in the
  // order the ranks ask for them. A failed one closes the group at once,
  // and with it its connections, so a peer waiting on this rank inside a
  // collective fails now too rather than at its timeout (the queue skips
  // the tasks after this one).
  std::unique_ptr<PendingReduce> enqueue(std::function<core::Status()> task) {
    auto done = std::make_shared<std::promise<core::Status>>();
    auto f = done->get_future();
    queue_.submit(
        [this, task = std::move(task), done] {
          core::Status st = task();
          if (!st.isOk()) group_.reset();
          done->set_value(st);
          return st;
        },
        [done](const core::Status& first) { done->set_value(first); });
    return std::make_unique<FutureReduce>(std::move(f));
  }

  core::Status checkBlocks(const char* what, const std::vector<int64_t>& offsets) const {
    const size_t ranks = static_cast<size_t>(o_.islands) * static_cast<size_t>(o_.island_size);
    if (offsets.size() == ranks + 1 && o_.blocks.size() == static_cast<size_t>(o_.islands)) return core::okStatus();
    return core::internalError(fmt::format("c10d backend: ZeRO's {} over {} blocks, but the group is {} island(s) of {}",
                                           what, offsets.size() - 1, o_.islands, o_.island_size));
  }

  // c10d's exceptions as kUnavailable, which the elastic loop answers like any peer failure.
  template <typename F>
  core::Status guarded(F&& f) {
    return c10dCall(group_,
                    fmt::format("c10d {} collective inside the island (position {} of {})", library_, o_.position,
                                o_.island_size),
                    f);
  }

  void allreduceInside(const torch::Tensor& wire) {
    std::vector<at::Tensor> t{wire};
    group_->allreduce(t)->wait();
  }

  core::Status legs(const torch::Tensor& wire) {
    ARCH_RETURN_IF_ERROR(guarded([&] { allreduceInside(wire); }));
    if (o_.islands == 1) return core::okStatus();
    ARCH_RETURN_IF_ERROR(acrossIslands(wire));
    return guarded([&] { gatherPieces(wire); });
  }

  // Leg 2: this position's piece of the island's sum over every island.
  core::Status acrossIslands(const torch::Tensor& wire) {
    const auto [lo, hi] = pieceOf(wire.numel(), o_.island_size, o_.position);
    torch::Tensor piece = wire.narrow(0, lo, hi - lo);
    torch::Tensor host = piece.is_cpu() ? piece : piece.to(model::compat::hostStagingOptions(piece.device(), piece.scalar_type()));
    ARCH_RETURN_IF_ERROR(crossSum(host, {}).withContext("c10d backend: the cross-island leg"));
    if (!piece.is_cpu()) piece.copy_(host);
    return core::okStatus();
  }

  // `host` (fp32 or bf16 host memory) over the cross-island group: summed
  // whole, or with counts reduce-scattered (each island keeps its block).
  core::Status crossSum(const torch::Tensor& host, const std::vector<size_t>& counts) {
    const auto n = static_cast<size_t>(host.numel());
    std::unique_ptr<PendingReduce> op;
    if (host.scalar_type() == torch::kBFloat16) {
      std::span<uint16_t> bits(reinterpret_cast<uint16_t*>(host.data_ptr<at::BFloat16>()), n);
      op = counts.empty() ? o_.cross->allreduceSumBf16Async(bits) : o_.cross->reduceScatterSumBf16Async(bits, counts);
    } else {
      std::span<float> values(host.data_ptr<float>(), n);
      op = counts.empty() ? o_.cross->allreduceSumAsync(values) : o_.cross->reduceScatterSumAsync(values, counts);
    }
    return op->wait();
  }

  // ZeRO over several islands, across: the blocks of this position in
  // every island (the cross group's rank order), through host memory over
  // the comm layer: reduce-scattered, each island keeping its own block, or
  // allgathered from each island's own block.
  core::Status blocksAcrossIslands(const torch::Tensor& wire, const std::vector<int64_t>& at, bool gather) {
    const int me = o_.cross->rank();
    std::vector<int64_t> block, cross_at{0};
    std::vector<size_t> counts;
    for (int i = 0; i < o_.islands; ++i) {
      block.push_back(o_.blocks[static_cast<size_t>(i)][static_cast<size_t>(o_.position)]);
      counts.push_back(static_cast<size_t>(at[block.back() + 1] - at[block.back()]));
      cross_at.push_back(cross_at.back() + static_cast<int64_t>(counts.back()));
    }
    auto slot = [&](const torch::Tensor& t, int i) { return t.narrow(0, cross_at[i], cross_at[i + 1] - cross_at[i]); };
    auto own = [&](int i) { return wire.narrow(0, at[block[i]], at[block[i] + 1] - at[block[i]]); };
    torch::Tensor host = torch::empty({cross_at.back()}, model::compat::hostStagingOptions(wire.device(), wire.scalar_type()));
    for (int i = 0; i < o_.islands; ++i) {
      if (!gather || i == me) slot(host, i).copy_(own(i));
    }
    core::Status st =  // gathers are fp32
        gather ? o_.cross->allgatherSlices(std::span<float>(host.data_ptr<float>(), static_cast<size_t>(host.numel())),
                                           cross_at)
               : crossSum(host, counts);
    ARCH_RETURN_IF_ERROR(st.withContext(std::string("c10d backend: ZeRO's ") + (gather ? "allgather" : "reduce-scatter") +
                                        " across islands"));
    for (int i = 0; i < o_.islands; ++i) {
      if (gather ? i != me : i == me) own(i).copy_(slot(host, i));
    }
    return core::okStatus();
  }

  // ZeRO over several islands, inside: each position holds its blocks of
  // every island; those packs go to every rank of the island.
  void packsInsideIsland(const torch::Tensor& wire, const std::vector<int64_t>& at) {
    std::vector<int64_t> packs{0};  // pack p = the blocks of position p, island by island
    for (int p = 0; p < o_.island_size; ++p) {
      int64_t n = 0;
      for (const auto& island : o_.blocks) n += at[island[static_cast<size_t>(p)] + 1] - at[island[static_cast<size_t>(p)]];
      packs.push_back(packs.back() + n);
    }
    torch::Tensor packed = torch::empty({packs.back()}, wire.options());
    auto move = [&](int p, bool in) {
      int64_t o = packs[static_cast<size_t>(p)];
      for (const auto& island : o_.blocks) {
        const int b = island[static_cast<size_t>(p)];
        const int64_t n = at[b + 1] - at[b];
        if (in) packed.narrow(0, o, n).copy_(wire.narrow(0, at[b], n));
        else wire.narrow(0, at[b], n).copy_(packed.narrow(0, o, n));
        o += n;
      }
    };
    move(o_.position, true);
    c10dAllgatherBlocks(*group_, packed, packs, o_.position);
    for (int p = 0; p < o_.island_size; ++p) {
      if (p != o_.position) move(p, false);
    }
  }

  // Leg 3: every position's piece to every rank of the island.
  void gatherPieces(const torch::Tensor& wire) {
    std::vector<int64_t> offsets;
    for (int i = 0; i < o_.island_size; ++i) offsets.push_back(pieceOf(wire.numel(), o_.island_size, i).first);
    offsets.push_back(wire.numel());
    c10dAllgatherBlocks(*group_, wire, offsets, o_.position);
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
