// The device catalog: what one accelerator (or CPU server) can do on paper,
// from public vendor datasheets (configs/catalog/devices.yaml cites each
// entry). The cost model multiplies these peaks by achieved-efficiency
// factors (catalog defaults, or a calibration profile when one is loaded).
// Users extend or override entries with their own YAML (--catalog FILE).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::plan {

// Numeric formats the cost model prices separately.
enum class Dtype { kFp32, kBf16, kFp8, kInt8 };
const char* dtypeName(Dtype d);
core::Result<Dtype> parseDtype(const std::string& s);

// One device kind. Bandwidths are bytes/s per direction per device.
struct DeviceSpec {
  std::string kind;          // catalog key: h100, mi300x, ascend910b, cpu, ...
  std::string vendor;
  std::string description;
  double fp32_flops = 0;     // dense peak FLOP/s
  double bf16_flops = 0;     // dense peak (fp16 where bf16 is the same rate)
  double fp8_flops = 0;      // 0 = not supported (falls back to bf16)
  double int8_ops = 0;
  double memory_bytes = 0;   // HBM / device memory capacity
  double memory_bandwidth = 0;
  double node_bandwidth = 0;   // intra-node fabric (NVLink / Infinity Fabric / HCCS / PCIe)
  double nic_bandwidth = 0;    // scale-out NIC share of one device
  double link_latency = 5e-6;  // per collective hop inside an island
  int64_t devices_per_node = 8;
  // Achieved fraction of peak for large matmuls (MFU-like derating) when no
  // calibration profile covers this kind; fp8 has its own (scaling overheads).
  double matmul_efficiency = 0.6;
  double fp8_efficiency = 0.45;
  // Fraction of memory bandwidth reached by elementwise / norm kernels.
  double memory_efficiency = 0.7;
  double kernel_overhead_s = 4e-6;  // fixed cost per GEMM launch

  // Peak for a dtype, falling back to the next wider supported format.
  double peakFlops(Dtype d) const;
};

class DeviceCatalog {
 public:
  // Parses a catalog YAML document (top-level `devices:` mapping of kind ->
  // fields). Units: flops in TFLOP/s (`bf16_tflops`), memory in GB
  // (`memory_gb`), bandwidths in GB/s (`memory_bw_gbs`, `node_bw_gbs`,
  // `nic_gbits` for the NIC in Gbit/s). Later entries override earlier ones.
  core::Status mergeYaml(const std::string& yaml_text, const std::string& origin);
  core::Status mergeFile(const std::string& path);

  // The catalog shipped in the repo (configs/catalog/devices.yaml), found
  // via ARCHIPELAGO_CATALOG, the source tree, or the working directory;
  // falls back to the copy compiled into the library.
  static core::Result<DeviceCatalog> builtin();

  core::Result<DeviceSpec> get(const std::string& kind) const;
  bool has(const std::string& kind) const { return devices_.count(kind) > 0; }
  std::vector<std::string> kinds() const;
  void put(DeviceSpec spec) { devices_[spec.kind] = std::move(spec); }

 private:
  std::map<std::string, DeviceSpec> devices_;
};

// The text of the catalog compiled into the library (kept in sync with
// configs/catalog/devices.yaml by a test).
const char* builtinCatalogYaml();

}  // namespace archipelago::plan
