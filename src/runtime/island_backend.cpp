#include "archipelago/runtime/island_backend.h"

#include "archipelago/model/torch_compat.h"

namespace archipelago::runtime {

std::string CommBackend::describe() const { return "comm (" + dp_->describe() + ")"; }

torch::TensorOptions CommBackend::wireOptions(const torch::Device& device, torch::ScalarType dtype) const {
  return model::compat::hostStagingOptions(device, dtype);
}

torch::Tensor IslandBackend::wireFor(const torch::Tensor& t, torch::ScalarType dtype, bool values) const {
  const torch::TensorOptions o = wireOptions(t.device(), dtype);
  if (t.scalar_type() == dtype && t.is_contiguous() && t.device() == o.device()) return t;
  torch::Tensor wire = torch::empty({t.numel()}, o);
  if (values) wire.copy_(t);
  return wire;
}

std::unique_ptr<PendingReduce> CommBackend::allreduceSum(torch::Tensor wire) {
  const auto n = static_cast<size_t>(wire.numel());
  if (wire.scalar_type() == torch::kBFloat16) {
    return dp_->allreduceSumBf16Async(std::span<uint16_t>(reinterpret_cast<uint16_t*>(wire.data_ptr<at::BFloat16>()), n));
  }
  return dp_->allreduceSumAsync(std::span<float>(wire.data_ptr<float>(), n));
}

std::unique_ptr<PendingReduce> CommBackend::reduceScatterSum(torch::Tensor wire, std::vector<size_t> counts) {
  const auto n = static_cast<size_t>(wire.numel());
  if (wire.scalar_type() == torch::kBFloat16) {
    return dp_->reduceScatterSumBf16Async(
        std::span<uint16_t>(reinterpret_cast<uint16_t*>(wire.data_ptr<at::BFloat16>()), n), counts);
  }
  return dp_->reduceScatterSumAsync(std::span<float>(wire.data_ptr<float>(), n), counts);
}

core::Status CommBackend::allgatherSlices(torch::Tensor wire, std::vector<int64_t> offsets) {
  return dp_->allgatherSlices(std::span<float>(wire.data_ptr<float>(), static_cast<size_t>(wire.numel())), offsets);
}

}  // namespace archipelago::runtime
