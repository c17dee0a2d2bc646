#include "archipelago/runtime/placement.h"

#include "archipelago/model/device.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/runtime/check_ops.h"
#include "archipelago/runtime/launch_env.h"

namespace archipelago::runtime {

core::Result<std::string> torchDeviceOfKind(const std::string& kind, const std::string& field) {
  if (kind == "cpu" || kind.rfind("cpu-", 0) == 0) return std::string("cpu");
  ARCH_ASSIGN_OR_RETURN(auto catalog, plan::DeviceCatalog::builtin());
  auto spec = catalog.get(kind);
  if (!spec.isOk()) {
    return core::invalidArgument(field + ".device: '" + kind + "' is not in the device catalog; set " + field +
                                 ".torch_device to the torch device it computes on (cpu, cuda, ...)");
  }
  const std::string& v = spec->vendor;
  if (v == "nvidia" || v == "amd") return std::string("cuda");
  if (v == "huawei") return std::string("privateuseone");
  if (v == "intel") return std::string("xpu");
  if (v == "generic") return std::string("cpu");
  return core::invalidArgument(field + ".device: kind '" + kind + "' of vendor '" + v + "' has no default torch device; set " +
                               field + ".torch_device");
}

core::Result<DevicePlacement> placeWorker(const core::JobConfig& job, const core::WorkerInfo& w, bool check_ops) {
  const std::string field = "cluster.islands[" + std::to_string(w.island_index) + "]";
  const auto& island = job.cluster.islands.at(static_cast<size_t>(w.island_index));
  std::string spec = island.torch_device;
  if (spec == "auto") {
    ARCH_ASSIGN_OR_RETURN(spec, torchDeviceOfKind(island.device, field));
  }
  ARCH_ASSIGN_OR_RETURN(auto local, localRankFromEnv());
  const int64_t index = local.value >= 0 ? local.value : w.local_index;
  auto device = model::chooseDevice(spec, index);
  if (!device.isOk()) return device.status().withContext(field + ".torch_device");
  DevicePlacement p;
  p.device = *device;
  p.dtype = w.dtype;
  auto compute = model::computeScalarType(w.dtype);
  if (!compute.isOk()) return compute.status().withContext(field + ".dtype");
  p.compute = *compute;
  const std::string what = "island '" + island.name + "' (device " + island.device + ", torch_device " +
                           island.torch_device + " -> " + p.device.str() + ")";
  core::Status st = model::probeDevice(p.device);
  if (!st.isOk()) {
    return core::invalidArgument(what + ": " + st.message() + "; set " + field +
                                    ".torch_device to a device this host has (e.g. cpu)");
  }
  if (check_ops) {
    CheckOpsOptions co;
    co.device = p.device.str();
    co.dtype = p.dtype;
    co.quick = true;
    ARCH_ASSIGN_OR_RETURN(auto checks, checkOps(co));
    st = requireConformance(checks);
    if (!st.isOk()) {
      return core::invalidArgument(what + ": " + st.message() + " (train.check_ops; `archipelago check ops --device " +
                                      co.device + " --dtype " + co.dtype + "` prints the table)");
    }
  }
  return p;
}

}  // namespace archipelago::runtime
