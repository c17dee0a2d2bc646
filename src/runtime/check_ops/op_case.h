// The contract between the conformance framework (check_ops.cpp) and the
// operator checks (model_ops.cpp, fp8_ops.cpp, host_ops.cpp): an op takes
// its inputs from an OpContext and hands back its device result with the
// fp64 reference and the two numbers of the tolerance rule (r, n).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace archipelago::runtime::check_ops {

// One input: dev on the device in the op's dtype, ref the same values in
// fp64 on the CPU. Both come from one rounding done on the CPU, so rounding
// the inputs is no part of any measured error.
struct Operand {
  torch::Tensor dev;
  torch::Tensor ref;
};

struct OpContext {
  torch::Device device = torch::kCPU;
  torch::ScalarType dtype = torch::kFloat;  // what the model's ops compute in
  bool quick = false;
  uint64_t seed = 1;

  // normal(mean, std) drawn from (seed, name), rounded to `type`.
  Operand input(torch::IntArrayRef shape, double std, const std::string& name, torch::ScalarType type,
                double mean = 0) const;
  Operand input(torch::IntArrayRef shape, double std, const std::string& name) const {
    return input(shape, std, name, dtype);
  }
  // Shapes: the quick or the full value.
  int64_t size(int64_t quick_value, int64_t full_value) const { return quick ? quick_value : full_value; }
};

struct OpResult {
  torch::Tensor device;      // on the device, any dtype
  torch::Tensor reference;   // fp64 on the CPU, as many elements as device
  torch::Tensor normalizer;  // fp64 per element; undefined = max |reference| (normwise)
  std::string dtype;         // the format the op computed in: "bf16", "fp8", "int8", ...
  int roundings = 1;         // r of the tolerance rule
  int64_t reduction = 0;     // n of the tolerance rule
  std::string rounding_format;  // whose unit roundoff u is; empty = dtype
  std::string note;             // shown in the table (e.g. the FP8 backend)
};

using OpFn = OpResult (*)(const OpContext&);
struct OpDef {
  const char* name;
  OpFn run;
};

// "fp32" | "bf16" | "fp16" | "fp64".
std::string formatName(torch::ScalarType t);

std::vector<OpDef> modelOps();  // model_ops.cpp: the decoder's and the MoE's operators
std::vector<OpDef> fp8Ops();    // fp8_ops.cpp: the FP8 linear, both recipes
std::vector<OpDef> hostOps();   // host_ops.cpp: the AdamW step and the codec round trips

}  // namespace archipelago::runtime::check_ops
