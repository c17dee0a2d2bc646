// Device catalog: YAML parsing, lookup and the shipped default.
#include "archipelago/plan/catalog.h"

#include <cstdint>
#include <cstdlib>
#include <filesystem>

#include <yaml-cpp/yaml.h>

#include "archipelago/core/files.h"

namespace archipelago::plan {

const char* dtypeName(Dtype d) {
  switch (d) {
    case Dtype::kFp32: return "fp32";
    case Dtype::kBf16: return "bf16";
    case Dtype::kFp8: return "fp8";
    case Dtype::kInt8: return "int8";
  }
  return "?";
}

core::Result<Dtype> parseDtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return Dtype::kFp32;
  if (s == "bf16" || s == "fp16" || s == "bfloat16") return Dtype::kBf16;
  if (s == "fp8" || s == "fp8_e4m3" || s == "fp8_e5m2") return Dtype::kFp8;
  if (s == "int8") return Dtype::kInt8;
  return core::invalidArgument("dtype '" + s + "' is not one of fp32|bf16|fp8|int8");
}

double DeviceSpec::peakFlops(Dtype d) const {
  switch (d) {
    case Dtype::kFp8:
      if (fp8_flops > 0) return fp8_flops;
      [[fallthrough]];
    case Dtype::kBf16:
      if (bf16_flops > 0) return bf16_flops;
      [[fallthrough]];
    case Dtype::kFp32:
      return fp32_flops;
    case Dtype::kInt8:
      return int8_ops > 0 ? int8_ops : bf16_flops;
  }
  return fp32_flops;
}

core::Status DeviceCatalog::mergeYaml(const std::string& yaml_text, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return core::invalidArgument(origin + ": not valid YAML: " + e.what());
  }
  const YAML::Node devs = root["devices"];
  if (!devs || !devs.IsMap()) {
    return core::invalidArgument(origin + ": expected a top-level 'devices:' mapping of kind -> fields");
  }
  static const char* kKnown[] = {"vendor", "description", "fp32_tflops", "bf16_tflops", "fp8_tflops",
                                 "int8_tflops", "memory_gb", "memory_bw_gbs", "node_bw_gbs", "nic_gbits",
                                 "devices_per_node", "matmul_efficiency", "fp8_efficiency",
                                 "memory_efficiency", "kernel_overhead_us", "link_latency_us"};
  for (const auto& kv : devs) {
    const std::string kind = kv.first.as<std::string>();
    const YAML::Node n = kv.second;
    if (!n.IsMap()) return core::invalidArgument(origin + ": devices." + kind + ": expected a mapping");
    DeviceSpec d = has(kind) ? devices_[kind] : DeviceSpec{};
    d.kind = kind;
    for (const auto& f : n) {
      const std::string key = f.first.as<std::string>();
      bool known = false;
      for (const char* k : kKnown) known = known || key == k;
      if (!known) {
        return core::invalidArgument(origin + ": devices." + kind + "." + key +
                                     ": unknown field; expected one of fp32_tflops, bf16_tflops, fp8_tflops, "
                                     "int8_tflops, memory_gb, memory_bw_gbs, node_bw_gbs, nic_gbits, "
                                     "devices_per_node, matmul_efficiency, fp8_efficiency, ...");
      }
    }
    try {
      auto num = [&](const char* key, double scale, double& out) {
        if (n[key]) out = n[key].as<double>() * scale;
      };
      if (n["vendor"]) d.vendor = n["vendor"].as<std::string>();
      if (n["description"]) d.description = n["description"].as<std::string>();
      num("fp32_tflops", 1e12, d.fp32_flops);
      num("bf16_tflops", 1e12, d.bf16_flops);
      num("fp8_tflops", 1e12, d.fp8_flops);
      num("int8_tflops", 1e12, d.int8_ops);
      num("memory_gb", 1e9, d.memory_bytes);
      num("memory_bw_gbs", 1e9, d.memory_bandwidth);
      num("node_bw_gbs", 1e9, d.node_bandwidth);
      num("nic_gbits", 1e9 / 8, d.nic_bandwidth);
      num("matmul_efficiency", 1, d.matmul_efficiency);
      num("fp8_efficiency", 1, d.fp8_efficiency);
      num("memory_efficiency", 1, d.memory_efficiency);
      num("kernel_overhead_us", 1e-6, d.kernel_overhead_s);
      num("link_latency_us", 1e-6, d.link_latency);
      if (n["devices_per_node"]) d.devices_per_node = n["devices_per_node"].as<int64_t>();
    } catch (const YAML::Exception& e) {
      return core::invalidArgument(origin + ": devices." + kind + ": bad value: " + e.what());
    }
    if (d.bf16_flops <= 0 && d.fp32_flops <= 0) {
      return core::invalidArgument(origin + ": devices." + kind + ": needs bf16_tflops or fp32_tflops > 0");
    }
    if (d.memory_bytes <= 0 || d.memory_bandwidth <= 0) {
      return core::invalidArgument(origin + ": devices." + kind + ": needs memory_gb and memory_bw_gbs > 0");
    }
    if (d.matmul_efficiency <= 0 || d.matmul_efficiency > 1) {
      return core::invalidArgument(origin + ": devices." + kind + ".matmul_efficiency: expected (0, 1]");
    }
    if (d.devices_per_node < 1) d.devices_per_node = 1;
    if (d.node_bandwidth <= 0) d.node_bandwidth = d.nic_bandwidth > 0 ? d.nic_bandwidth : 1e9;
    if (d.nic_bandwidth <= 0) d.nic_bandwidth = 1.25e9;
    devices_[kind] = d;
  }
  return core::okStatus();
}

core::Status DeviceCatalog::mergeFile(const std::string& path) {
  auto text = core::readFile(path);
  if (!text.isOk()) return text.status().withContext("catalog file (an existing YAML file)");
  return mergeYaml(*text, path);
}

core::Result<DeviceCatalog> DeviceCatalog::builtin() {
  DeviceCatalog c;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("ARCHIPELAGO_CATALOG")) candidates.push_back(env);
#ifdef ARCHIPELAGO_SOURCE_DIR
  candidates.push_back(std::string(ARCHIPELAGO_SOURCE_DIR) + "/configs/catalog/devices.yaml");
#endif
  candidates.push_back("configs/catalog/devices.yaml");
  for (const auto& p : candidates) {
    std::error_code ec;
    if (std::filesystem::exists(p, ec)) {
      ARCH_RETURN_IF_ERROR(c.mergeFile(p));
      return c;
    }
  }
  ARCH_RETURN_IF_ERROR(c.mergeYaml(builtinCatalogYaml(), "<built-in catalog>"));
  return c;
}

core::Result<DeviceSpec> DeviceCatalog::get(const std::string& kind) const {
  auto it = devices_.find(kind);
  if (it == devices_.end()) {
    std::string known;
    for (const auto& [k, v] : devices_) known += (known.empty() ? "" : ", ") + k;
    return core::notFound("device kind '" + kind + "' is not in the catalog (known: " + known +
                          "); add it with --catalog FILE");
  }
  return it->second;
}

std::vector<std::string> DeviceCatalog::kinds() const {
  std::vector<std::string> out;
  for (const auto& [k, v] : devices_) out.push_back(k);
  return out;
}

}  // namespace archipelago::plan
