// Everything that differs between the libtorch versions Archipelago builds
// against, in one place: Debian's libtorch 1.13 (the CPU flavour CI runs)
// and the libtorch of a current PyTorch installation (the CUDA flavour,
// docs/runtime.md "Build flavours"). Code elsewhere uses only what both
// provide, or asks here.
#pragma once

#include <cstdint>

#include <c10/core/DeviceType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/torch.h>
#include <torch/version.h>

#define ARCH_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// float8 dtypes (at::kFloat8_e4m3fn, at::kFloat8_e5m2) and at::_scaled_mm
// arrived in PyTorch 2.1; 2.1-2.3 return (out, amax), later versions out.
#define ARCH_TORCH_HAS_FLOAT8 ARCH_TORCH_AT_LEAST(2, 1)

namespace archipelago::model::compat {

// Devices of `type` that libtorch can drive (1 for the CPU, 0 when no
// backend of that type is compiled in or registered).
inline int64_t deviceCount(c10::DeviceType type) {
  if (type == c10::DeviceType::CPU) return 1;
  if (!c10::impl::hasDeviceGuardImpl(type)) return 0;
  return c10::impl::getDeviceGuardImpl(type)->deviceCount();
}

// Host memory the device can copy from and to asynchronously: page-locked
// where the device is an accelerator with a pinned allocator (CUDA / ROCm),
// ordinary memory otherwise (the CPU needs no staging at all).
inline torch::TensorOptions hostStagingOptions(const torch::Device& device, torch::ScalarType dtype) {
  auto o = torch::TensorOptions().dtype(dtype).device(torch::kCPU);
  return device.is_cuda() ? o.pinned_memory(true) : o;
}

// Waits until every operation queued on `device` has finished (timings
// of asynchronous devices are meaningless without it). No-op on the CPU.
inline void synchronize(const torch::Device& device) {
  if (device.is_cpu()) return;
  if (c10::impl::hasDeviceGuardImpl(device.type())) {
    const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
    impl->getStream(device).synchronize();
  }
}

}  // namespace archipelago::model::compat
