// The shipped catalog compiled in (a copy of configs/catalog/devices.yaml;
// tests/plan checks the two are identical), so the binary works from any
// directory.
#include "archipelago/plan/catalog.h"

namespace archipelago::plan {

const char* builtinCatalogYaml() {
  return R"ARCHCAT(# Archipelago device catalog: dense (not sparse) peak throughput per device
# from public vendor datasheets. Units: *_tflops in TFLOP/s (TOP/s for int8),
# memory_gb in GB (1e9), memory_bw_gbs / node_bw_gbs in GB/s per direction,
# nic_gbits = scale-out NIC share per device in Gbit/s. fp8_tflops: 0 = not
# supported (planner falls back to bf16). matmul_efficiency / fp8_efficiency:
# achieved fraction of peak for large GEMMs in training (replaced by a
# calibration profile when one is given); see docs/planner.md for how they
# were set. Extend with `archipelago plan --catalog my.yaml` (same format;
# entries there override these).
devices:
  # NVIDIA H100 SXM5 80GB. Source: NVIDIA H100 Tensor Core GPU datasheet
  # (fp32 67, bf16 989.4, fp8 1978.9, int8 1978.9 dense; HBM3 80 GB 3.35 TB/s;
  # NVLink 4 900 GB/s bidirectional). NIC: ConnectX-7 400 Gb/s per GPU (DGX H100).
  h100:
    vendor: nvidia
    description: H100 SXM5 80GB
    fp32_tflops: 67
    bf16_tflops: 989.4
    fp8_tflops: 1978.9
    int8_tflops: 1978.9
    memory_gb: 80
    memory_bw_gbs: 3350
    node_bw_gbs: 450
    nic_gbits: 400
    devices_per_node: 8
    matmul_efficiency: 0.62
    fp8_efficiency: 0.45
  # NVIDIA H200 SXM 141GB: H100's compute with more and faster HBM.
  # Source: NVIDIA H200 Tensor Core GPU datasheet (fp32 67; bf16 1979,
  # fp8 3958, int8 3958 with sparsity, half that dense; HBM3e 141 GB
  # 4.8 TB/s; NVLink 900 GB/s bidirectional). NIC as DGX H200: 400 Gb/s.
  h200:
    vendor: nvidia
    description: H200 SXM 141GB
    fp32_tflops: 67
    bf16_tflops: 989.4
    fp8_tflops: 1978.9
    int8_tflops: 1978.9
    memory_gb: 141
    memory_bw_gbs: 4800
    node_bw_gbs: 450
    nic_gbits: 400
    devices_per_node: 8
    matmul_efficiency: 0.62
    fp8_efficiency: 0.45
  # NVIDIA H800 SXM5 (China-market H100): same compute and HBM as H100,
  # NVLink cut to 400 GB/s bidirectional. Source: NVIDIA H800 product brief;
  # DeepSeek-V3 technical report (sec. 3.1: 8 GPUs per node, NVLink/NVSwitch,
  # 400 Gb/s InfiniBand per GPU).
  h800:
    vendor: nvidia
    description: H800 SXM5 80GB
    fp32_tflops: 67
    bf16_tflops: 989.4
    fp8_tflops: 1978.9
    int8_tflops: 1978.9
    memory_gb: 80
    memory_bw_gbs: 3350
    node_bw_gbs: 200
    nic_gbits: 400
    devices_per_node: 8
    matmul_efficiency: 0.62
    fp8_efficiency: 0.45
  # NVIDIA H20 96GB (China-market Hopper). Source: NVIDIA H20 product brief
  # (fp32 44, bf16 148, fp8 296, int8 296 dense; HBM3 96 GB 4.0 TB/s;
  # NVLink 900 GB/s bidirectional).
  h20:
    vendor: nvidia
    description: H20 96GB
    fp32_tflops: 44
    bf16_tflops: 148
    fp8_tflops: 296
    int8_tflops: 296
    memory_gb: 96
    memory_bw_gbs: 4000
    node_bw_gbs: 450
    nic_gbits: 400
    devices_per_node: 8
    matmul_efficiency: 0.75
    fp8_efficiency: 0.6
  # NVIDIA A100 SXM4 80GB. Source: NVIDIA A100 Tensor Core GPU datasheet
  # (fp32 19.5, bf16 312, int8 624 dense; HBM2e 80 GB 2,039 GB/s; NVLink 3
  # 600 GB/s bidirectional). NIC: HDR 200 Gb/s per GPU (DGX A100 / Selene).
  a100:
    vendor: nvidia
    description: A100 SXM4 80GB
    fp32_tflops: 19.5
    bf16_tflops: 312
    fp8_tflops: 0
    int8_tflops: 624
    memory_gb: 80
    memory_bw_gbs: 2039
    node_bw_gbs: 300
    nic_gbits: 200
    devices_per_node: 8
    matmul_efficiency: 0.60
    fp8_efficiency: 0.60
  # NVIDIA A800 SXM4 80GB (China-market A100): NVLink 400 GB/s bidirectional.
  # Source: NVIDIA A800 product brief.
  a800:
    vendor: nvidia
    description: A800 SXM4 80GB
    fp32_tflops: 19.5
    bf16_tflops: 312
    fp8_tflops: 0
    int8_tflops: 624
    memory_gb: 80
    memory_bw_gbs: 2039
    node_bw_gbs: 200
    nic_gbits: 200
    devices_per_node: 8
    matmul_efficiency: 0.60
    fp8_efficiency: 0.60
  # NVIDIA L40S 48GB (PCIe, no NVLink). Source: NVIDIA L40S datasheet
  # (fp32 91.6, bf16 362.05, fp8 733, int8 733 dense; GDDR6 48 GB 864 GB/s;
  # PCIe Gen4 x16 64 GB/s bidirectional).
  l40s:
    vendor: nvidia
    description: L40S 48GB PCIe
    fp32_tflops: 91.6
    bf16_tflops: 362.05
    fp8_tflops: 733
    int8_tflops: 733
    memory_gb: 48
    memory_bw_gbs: 864
    node_bw_gbs: 32
    nic_gbits: 100
    devices_per_node: 8
    matmul_efficiency: 0.55
    fp8_efficiency: 0.4
  # AMD Instinct MI300X 192GB. Source: AMD Instinct MI300X data sheet
  # (fp32 matrix 163.4, bf16 1307.4, fp8 2614.9, int8 2614.9 dense; HBM3
  # 192 GB 5.3 TB/s; Infinity Fabric 896 GB/s aggregate bidirectional peer).
  mi300x:
    vendor: amd
    description: Instinct MI300X 192GB OAM
    fp32_tflops: 163.4
    bf16_tflops: 1307.4
    fp8_tflops: 2614.9
    int8_tflops: 2614.9
    memory_gb: 192
    memory_bw_gbs: 5300
    node_bw_gbs: 448
    nic_gbits: 400
    devices_per_node: 8
    matmul_efficiency: 0.45
    fp8_efficiency: 0.32
  # Huawei Ascend 910B. Source: Huawei Atlas 800T A2 training server
  # datasheet / Ascend 910 series brief (about 313 TFLOP/s fp16, 640 TOP/s
  # int8; 64 GB HBM2e 1.6 TB/s; HCCS 392 GB/s aggregate per chip; 8 x 200GE
  # RoCE per 8-chip server). No fp8.
  ascend910b:
    vendor: huawei
    description: Ascend 910B 64GB
    fp32_tflops: 78
    bf16_tflops: 313
    fp8_tflops: 0
    int8_tflops: 640
    memory_gb: 64
    memory_bw_gbs: 1600
    node_bw_gbs: 196
    nic_gbits: 200
    devices_per_node: 8
    matmul_efficiency: 0.5
    fp8_efficiency: 0.5
  # A 2-socket CPU server as one device: 2 x AMD EPYC 9654 (96 cores each,
  # 2.4 GHz base, AVX-512 on a 256-bit datapath: 32 fp32 FLOP/cycle/core,
  # 64 bf16 with AVX512_BF16). Source: AMD EPYC 9654 product page (12
  # channels DDR5-4800 per socket = 460.8 GB/s per socket). 1.5 TB DRAM.
  cpu:
    vendor: amd
    description: 2-socket EPYC 9654 server (192 cores)
    fp32_tflops: 14.7
    bf16_tflops: 29.5
    fp8_tflops: 0
    int8_tflops: 59
    memory_gb: 1536
    memory_bw_gbs: 921
    node_bw_gbs: 64
    nic_gbits: 100
    devices_per_node: 1
    matmul_efficiency: 0.5
    fp8_efficiency: 0.5
    kernel_overhead_us: 10
  # One CPU core driven by one local worker (our emulated islands). A generic
  # x86-64 core with two 256-bit FMA units at ~2.5 GHz (32 fp32 FLOP/cycle).
  # Real local numbers come from a calibration profile.
  cpu-core:
    vendor: generic
    description: one x86-64 core (local worker)
    fp32_tflops: 0.08
    bf16_tflops: 0.08
    fp8_tflops: 0
    int8_tflops: 0.16
    memory_gb: 16
    memory_bw_gbs: 20
    node_bw_gbs: 5
    nic_gbits: 10
    devices_per_node: 1
    matmul_efficiency: 0.5
    fp8_efficiency: 0.5
    kernel_overhead_us: 5
)ARCHCAT";
}

}  // namespace archipelago::plan
