// Calibration: measured achieved FLOP/s of the devices we actually have, per
// device kind, dtype and GEMM size, stored as a JSON profile. When a profile
// covers a kind, the cost model prices matmuls with it instead of the
// catalog's default derating. The runtime feeds it measured matmul timings
// (libtorch); this layer owns the data structure, its file format and the
// lookup (log-log interpolation over GEMM size).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/plan/catalog.h"

namespace archipelago::plan {

struct CalibrationPoint {
  double gemm_flops = 0;      // 2*m*n*k of one GEMM (the shape class)
  double achieved_flops = 0;  // FLOP/s measured for that shape
};

// A measured forward and backward of one model part (e.g. the average
// decoder layer of a job's model, or its embedding + head + loss) for one
// micro-batch of `tokens` tokens, with the framework's real kernels:
// attention, softmax, norms, activations and autograd included.
struct ItemTiming {
  double tokens = 0;
  double fwd_s = 0;
  double bwd_s = 0;
};

// Everything measured about one device kind.
struct DeviceCalibration {
  std::map<std::string, std::vector<CalibrationPoint>> matmul;  // dtype name -> points sorted by gemm_flops
  std::map<std::string, std::vector<ItemTiming>> items;         // part key -> points sorted by tokens
  double memory_bandwidth = 0;  // achieved bytes/s of elementwise kernels; 0 = unknown
  double step_overhead_s = 0;   // fixed per-step work of every worker before its compute (the trainer's
                                // elastic commit: copies of parameters and optimizer state)
  double loopback_bandwidth = 0; // bytes/s between local workers (for local runs); 0 = unknown
  double loopback_cpu_per_byte = 0;  // CPU seconds (sender + receiver) per byte over loopback TCP; 0 = unknown
  double optimizer_s_per_param = 0;  // measured optimizer step (grad norm + AdamW) per parameter; 0 = unknown
  double host_cores = 0;        // CPU cores the local workers share; 0 = unknown
  double background_procs = 0;  // other runnable processes on the host while calibrating (mean; shared machines)
  // Their mean runnable count per scheduling group (the kernel's autogroups
  // share the cores fairly between groups, not processes).
  std::vector<double> background_groups;
  // Thread CPU time / wall time of the calibration's timed runs (one
  // thread): the share of a core a worker got next to the other load;
  // 0 = not measured.
  double alone_core_share = 0;
  int64_t threads = 1;          // intra-op threads per worker the timings were taken with
  // Sharing the host with each other: CPU seconds per unit of work when
  // `threads` copies of a worker's step run at once, relative to one copy
  // alone (shared caches, memory bandwidth, sibling hardware threads,
  // context switches when there are more copies than cores). Separate for
  // forward+backward and for the optimizer (memory-bound). Empty = unknown
  // (1.0 assumed).
  // compute_cv: the spread of one copy's forward+backward from run to run
  // while co-running (robust standard deviation / median; 0 = unknown): a
  // synchronous group waits for its slowest member every step.
  struct Corun {
    int64_t threads = 0;
    double compute_factor = 1;
    double optimizer_factor = 1;
    double compute_cv = 0;
  };
  std::vector<Corun> corun;  // sorted by threads
};

class CalibrationProfile {
 public:
  // Records one GEMM measurement (m x k times k x n in `seconds`); points of
  // the same shape class are averaged.
  void addMatmul(const std::string& kind, Dtype dtype, double m, double n, double k, double seconds);
  // Records a measured part (see ItemTiming); a point at the same token
  // count replaces the earlier one.
  void addItemTiming(const std::string& kind, const std::string& key, double tokens, double fwd_s, double bwd_s);
  // Forward/backward seconds of part `key` at `tokens`: linear in tokens
  // through the two nearest measured points (a fixed per-call cost plus a
  // per-token cost), proportional when only one point exists; nullopt when
  // the part was not measured on `kind`.
  std::optional<ItemTiming> itemTiming(const std::string& kind, const std::string& key, double tokens) const;
  DeviceCalibration& device(const std::string& kind) { return devices_[kind]; }
  const DeviceCalibration* find(const std::string& kind) const;
  bool empty() const { return devices_.empty(); }

  // Achieved FLOP/s for a GEMM of `gemm_flops` on `kind`, or nullopt when the
  // profile has no points for that kind/dtype (falls back to fp32 points for
  // other dtypes on the same kind only if that is all there is).
  std::optional<double> achievedFlops(const std::string& kind, Dtype dtype, double gemm_flops) const;

  std::string toJson() const;
  static core::Result<CalibrationProfile> fromJson(const std::string& text);
  core::Status save(const std::string& path) const;
  static core::Result<CalibrationProfile> load(const std::string& path);

 private:
  std::map<std::string, DeviceCalibration> devices_;
};

}  // namespace archipelago::plan
