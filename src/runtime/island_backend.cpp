#include "archipelago/runtime/island_backend.h"

#include "archipelago/model/torch_compat.h"

namespace archipelago::runtime {

std::string CommBackend::describe() const { return "comm (" + dp_->describe() + ")"; }

torch::TensorOptions CommBackend::wireOptions(const torch::Device& device, torch::ScalarType dtype) const {
  return model::compat::hostStagingOptions(device, dtype);
}

std::unique_ptr<PendingReduce> CommBackend::allreduceSum(torch::Tensor wire) {
  const auto n = static_cast<size_t>(wire.numel());
  if (wire.scalar_type() == torch::kBFloat16) {
    return dp_->allreduceSumBf16Async(std::span<uint16_t>(reinterpret_cast<uint16_t*>(wire.data_ptr<at::BFloat16>()), n));
  }
  return dp_->allreduceSumAsync(std::span<float>(wire.data_ptr<float>(), n));
}

}  // namespace archipelago::runtime
