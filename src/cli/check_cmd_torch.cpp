// `archipelago check ops`: operator conformance of a device and dtype
// (runtime/check_ops.h, docs/devices.md "Operator conformance").
#include <cstdio>

#include <torch/version.h>

#include "archipelago/model/fp8.h"
#include "archipelago/runtime/check_ops.h"
#include "cli/commands.h"

namespace archipelago::cli {

void addCheckCommands(CLI::App& app) {
  static runtime::CheckOpsOptions o;
  static bool json = false;
  auto* check = app.add_subcommand("check", "check what this machine computes before trusting it with a job");
  check->require_subcommand(1);
  auto* ops = check->add_subcommand("ops", "every operator the model uses, on a device and dtype, against a CPU fp64 reference");
  ops->add_option("--device", o.device, "torch device: cpu, cuda, cuda:1, xpu, privateuseone, ...")->capture_default_str();
  ops->add_option("--dtype", o.dtype, "fp32 | bf16 | fp16 | fp8 (fp8 linears, bf16 elsewhere)")->capture_default_str();
  ops->add_flag("--quick", o.quick, "small shapes (what a worker runs before its first step)");
  ops->add_option("--seed", o.seed, "seed of the random inputs")->capture_default_str();
  ops->add_flag("--json", json, "print the table as one JSON object");
  setAction(ops, []() -> core::Status {
    ARCH_ASSIGN_OR_RETURN(auto checks, runtime::checkOps(o));
    if (json) {
      std::printf("%s\n", runtime::opChecksJson(o, checks).c_str());
    } else {
      std::printf("operator conformance: device %s, dtype %s, %s shapes, libtorch %s\n", o.device.c_str(),
                  o.dtype.c_str(), o.quick ? "quick" : "full", TORCH_VERSION);
      if (o.dtype == "fp8") {
        std::printf("fp8 linears: delayed %s, block %s\n",
                    model::fp8Backend(torch::Device(o.device), model::Fp8Recipe::kDelayed).c_str(),
                    model::fp8Backend(torch::Device(o.device), model::Fp8Recipe::kBlock).c_str());
      }
      std::printf("%s", runtime::formatOpChecks(checks).c_str());
    }
    std::fflush(stdout);
    return runtime::requireConformance(checks);
  });
}

}  // namespace archipelago::cli
