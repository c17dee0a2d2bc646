#include "archipelago/runtime/parallel/c10d_expert_exchange.h"

#include <fmt/format.h>

#include "archipelago/runtime/c10d_backend.h"

#if ARCHIPELAGO_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "runtime/c10d_group.h"
#endif

namespace archipelago::runtime::parallel {

#if ARCHIPELAGO_WITH_GLOO
namespace {

class C10dExpertExchange final : public RuntimeExpertExchange {
 public:
  C10dExpertExchange(c10::intrusive_ptr<model::compat::C10dCollectives> group, const C10dExpertExchangeOptions& o,
                     std::string library)
      : group_(std::move(group)),
        rank_(o.group->rank()),
        size_(o.group->size()),
        eb_(o.expert_begin),
        device_(o.device),
        library_(std::move(library)) {}
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  const std::vector<int64_t>& expertBegin() const override { return eb_; }

  std::vector<int64_t> alltoallvInt64(const std::vector<int64_t>& in, const std::vector<int64_t>& send_counts,
                                      const std::vector<int64_t>& recv_counts) override {
    torch::Tensor src = torch::tensor(in, torch::kInt64).to(device_);
    torch::Tensor out = exchange(src, send_counts, recv_counts, "expert all-to-all (counts)").cpu();
    return {out.data_ptr<int64_t>(), out.data_ptr<int64_t>() + out.numel()};
  }

  torch::Tensor alltoallvRows(const torch::Tensor& rows, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows) override {
    torch::Tensor src = rows.detach().to(device_, torch::kFloat).contiguous();
    for (int j = 0; j < size_; ++j) {
      if (j != rank_) bytes_ += static_cast<uint64_t>(send_rows[static_cast<size_t>(j)] * rows.size(1)) * 4;
    }
    return exchange(src, send_rows, recv_rows, "expert all-to-all (rows)").to(rows.device(), rows.scalar_type());
  }

 private:
  // Block j of `src` (send[j] rows) to member j; the blocks received, in member order.
  torch::Tensor exchange(torch::Tensor src, std::vector<int64_t> send, std::vector<int64_t> recv, const char* what) {
    std::vector<int64_t> shape = src.sizes().vec();
    shape[0] = 0;
    for (int64_t r : recv) shape[0] += r;
    torch::Tensor out = torch::empty(shape, src.options());
    core::Status st = c10dCall(group_, fmt::format("c10d {} (member {} of {})", library_, rank_, size_),
                               [&] { group_->alltoall_base(out, src, recv, send)->wait(); });
    if (!st.isOk()) fail(st.withContext(what));
    return out;
  }

  c10::intrusive_ptr<model::compat::C10dCollectives> group_;
  int rank_, size_;
  std::vector<int64_t> eb_;
  torch::Device device_;
  std::string library_;
};

}  // namespace

core::Result<std::shared_ptr<RuntimeExpertExchange>> makeC10dExpertExchange(const C10dExpertExchangeOptions& o) {
  ARCH_ASSIGN_OR_RETURN(const std::string library, c10dLibraryFor(o.device));
  ARCH_ASSIGN_OR_RETURN(auto group, makeC10dGroup({.members = o.group, .host = o.host, .device = o.device,
                                                     .timeout_s = o.timeout_s, .name = "expert"}));
  return std::shared_ptr<RuntimeExpertExchange>(std::make_shared<C10dExpertExchange>(std::move(group), o, library));
}

#else

core::Result<std::shared_ptr<RuntimeExpertExchange>> makeC10dExpertExchange(const C10dExpertExchangeOptions& o) {
  ARCH_RETURN_IF_ERROR(c10dLibraryFor(o.device).status());
  return core::internalError("unreachable");
}

#endif

}  // namespace archipelago::runtime::parallel
