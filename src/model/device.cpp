#include "archipelago/model/device.h"

#include "archipelago/model/layers.h"
#include "archipelago/model/torch_compat.h"

namespace archipelago::model {

std::string torchErrorLine(const c10::Error& e) {
  const std::string s = e.what_without_backtrace();
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

core::Result<torch::Device> parseDevice(const std::string& spec) {
  try {
    return torch::Device(spec);
  } catch (const c10::Error& e) {
    return core::invalidArgument("torch device '" + spec + "': " + torchErrorLine(e));
  }
}

core::Result<torch::Device> chooseDevice(const std::string& spec, int64_t local_index) {
  ARCH_ASSIGN_OR_RETURN(auto d, parseDevice(spec));
  if (d.is_cpu() || d.has_index()) return d;
  if (local_index < 0 || local_index > 127) {
    return core::invalidArgument("torch device '" + spec + "': no device index and no local rank to take it from");
  }
  return torch::Device(d.type(), static_cast<c10::DeviceIndex>(local_index));
}

core::Status probeDevice(const torch::Device& device) {
  const std::string name = device.str();
  const int64_t count = compat::deviceCount(device.type());
  try {
    auto a = torch::ones({8, 8}, torch::TensorOptions().device(device));
    const double sum = torch::matmul(a, a).sum().to(torch::kCPU).item<double>();
    if (sum != 512.0) return core::internalError("device " + name + ": an 8x8 matmul of ones summed to " + std::to_string(sum));
  } catch (const c10::Error& e) {
    return core::failedPrecondition("device " + name + " is not usable (libtorch sees " + std::to_string(count) + " " +
                             c10::DeviceTypeName(device.type(), true) + " device" + (count == 1 ? "" : "s") +
                             "): " + torchErrorLine(e));
  }
  return core::okStatus();
}

core::Result<torch::ScalarType> computeScalarType(const std::string& dtype) {
  if (dtype == "fp8") return torch::kBFloat16;
  return parseDtype(dtype);
}

}  // namespace archipelago::model
