#include "archipelago/runtime/parallel/c10d_tensor_parallel.h"

#include <fmt/format.h>

#include "archipelago/runtime/c10d_backend.h"

#if ARCHIPELAGO_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "runtime/c10d_group.h"
#endif

namespace archipelago::runtime::parallel {

#if ARCHIPELAGO_WITH_GLOO
namespace {

using Collectives = model::compat::C10dCollectives;

class C10dTensorParallel final : public TensorParallelCollectives {
 public:
  C10dTensorParallel(c10::intrusive_ptr<Collectives> group, int rank, int size, torch::Device device, std::string library)
      : group_(std::move(group)), rank_(rank), size_(size), device_(device), library_(std::move(library)) {}
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void allreduceSum(torch::Tensor& t) override { reduce(t, c10d::ReduceOp::SUM, "sum"); }
  void allreduceMax(torch::Tensor& t) override { reduce(t, c10d::ReduceOp::MAX, "max"); }

  torch::Tensor reduceScatter(const torch::Tensor& t, int64_t dim) override {
    torch::Tensor whole = dimFirstOn(t, dim, device_);
    const int64_t block = whole.size(0) / size_;
    std::vector<int64_t> offsets;  // the blocks as elements of the contiguous whole
    for (int i = 0; i <= size_; ++i) offsets.push_back(i * (whole.numel() / size_));
    run("reduce-scatter (sequence)",
        [&] { c10dReduceScatterBlocks(*group_, library_, whole.view({-1}), offsets, rank_); });
    torch::Tensor out = whole.narrow(0, rank_ * block, block);
    return out.transpose(0, dim).to(t.device(), t.scalar_type()).contiguous();
  }

  torch::Tensor allgather(const torch::Tensor& t, int64_t dim) override {
    std::vector<at::Tensor> in{dimFirstOn(t, dim, device_)};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int i = 0; i < size_; ++i) out[0].push_back(torch::empty_like(in[0]));
    run("allgather (sequence)", [&] { group_->allgather(out, in)->wait(); });
    return torch::cat(out[0], 0).transpose(0, dim).to(t.device(), t.scalar_type()).contiguous();
  }

 private:
  void reduce(torch::Tensor& t, c10d::ReduceOp op, const char* what) {
    // In place when t is already contiguous fp32/fp64 on the device (the
    // usual case); otherwise a wire copy, copied back.
    std::vector<at::Tensor> io{t.detach().to(device_, tensorParallelWireType(t)).contiguous()};
    run(std::string("allreduce (") + what + ")", [&] {
      c10d::AllreduceOptions o;
      o.reduceOp = op;
      group_->allreduce(io, o)->wait();
    });
    if (io[0].data_ptr() != t.data_ptr()) t.detach().copy_(io[0]);
  }

  // A failed collective closes the group (c10dCall) and throws.
  template <typename F>
  void run(const std::string& what, F&& f) {
    core::Status st = c10dCall(group_, fmt::format("c10d {} (rank {} of {})", library_, rank_, size_), f);
    if (!st.isOk()) fail(st, what);
  }

  c10::intrusive_ptr<Collectives> group_;
  int rank_, size_;
  torch::Device device_;
  std::string library_;
};

}  // namespace

core::Result<std::shared_ptr<TensorParallelCollectives>> makeC10dTensorParallel(const C10dTensorParallelOptions& o) {
  ARCH_ASSIGN_OR_RETURN(const std::string library, c10dLibraryFor(o.device));
  ARCH_ASSIGN_OR_RETURN(auto group, makeC10dGroup({.members = o.group, .host = o.host, .device = o.device,
                                                     .timeout_s = o.timeout_s, .name = "tensor-parallel"}));
  return std::shared_ptr<TensorParallelCollectives>(
      std::make_shared<C10dTensorParallel>(std::move(group), o.group->rank(), o.group->size(), o.device, library));
}

#else

core::Result<std::shared_ptr<TensorParallelCollectives>> makeC10dTensorParallel(const C10dTensorParallelOptions& o) {
  ARCH_RETURN_IF_ERROR(c10dLibraryFor(o.device).status());
  return core::internalError("unreachable");
}

#endif

}  // namespace archipelago::runtime::parallel
