// Where and in what a worker computes (docs/devices.md "Devices" and
// "Dtypes"): the torch device of its island (`torch_device`, "auto" from
// the catalog kind), at the index its launcher gave it, checked before
// anything starts; and its compute dtype.
#pragma once

#include <string>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/core/workers.h"

namespace archipelago::runtime {

// The torch device type of a catalog device kind: cpu kinds the CPU,
// NVIDIA and AMD (ROCm builds of libtorch report cuda) kinds cuda, Huawei
// privateuseone (Ascend's plug-in), Intel xpu. Unknown kinds are an error
// naming the island field.
core::Result<std::string> torchDeviceOfKind(const std::string& kind, const std::string& field);

struct DevicePlacement {
  torch::Device device{torch::kCPU};
  std::string dtype = "fp32";              // fp32 | bf16 | fp16 | fp8
  torch::ScalarType compute = torch::kFloat32;
  std::string describe() const { return device.str() + " " + dtype; }
};

// The worker's device and dtype, probed: allocates and computes there. The
// error names the island, its device kind, the torch device and what
// libtorch reports. The index: the one torch_device names, else the local
// rank its launcher set (LOCAL_RANK, SLURM_LOCALID, ...), else its index in
// the island.
// With `check_ops` (train.check_ops) the quick operator conformance check
// (check_ops.h) runs there too, and a device outside tolerance is refused
// naming the island, the ops, the device and the dtype.
core::Result<DevicePlacement> placeWorker(const core::JobConfig& job, const core::WorkerInfo& w, bool check_ops = false);

}  // namespace archipelago::runtime
