// The torch device a worker computes on: parsing a device string, choosing
// the index, and checking that libtorch can really allocate and compute
// there before anything starts (docs/devices.md "Devices").
#pragma once

#include <cstdint>
#include <string>

#include <torch/torch.h>

#include "archipelago/core/status.h"

namespace archipelago::model {

// Any device string the linked libtorch parses: cpu, cuda, cuda:1, xpu,
// privateuseone, mps, ... The error lists what libtorch accepts.
core::Result<torch::Device> parseDevice(const std::string& spec);

// `spec` as given when it names an index or the CPU; otherwise its type at
// `local_index` (a worker's rank on its host).
core::Result<torch::Device> chooseDevice(const std::string& spec, int64_t local_index);

// Allocates on `device`, runs a small matmul there and reads it back. The
// error carries the first line of what libtorch reports ("Torch not
// compiled with CUDA enabled") and how many devices of the type it sees.
core::Status probeDevice(const torch::Device& device);

// The first line of what libtorch reports: its messages go on with a
// backtrace or a hint over several lines, and a Status is one line.
std::string torchErrorLine(const c10::Error& e);

// The compute dtype of "fp32" | "bf16" | "fp16" | "fp8" (fp8 linear layers
// compute around bf16: model/fp8.h).
core::Result<torch::ScalarType> computeScalarType(const std::string& dtype);

}  // namespace archipelago::model
