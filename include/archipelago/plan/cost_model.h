// The analytical cost model: per layer and device kind, the time of forward
// and backward (matmuls at achieved FLOP/s, memory-bound kernels at achieved
// bandwidth, TP and EP communication on the link each crosses), the bytes a
// stage holds (weights, grads, optimizer state by ZeRO level, activations
// with and without recomputation), and collective times. The planner and the
// simulator share it so their numbers agree by construction.
#pragma once

#include <cstdint>
#include <string>

#include "archipelago/plan/calibration.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {

enum class Recompute { kNone, kSelective, kFull };
inline constexpr Recompute kRecomputes[] = {Recompute::kNone, Recompute::kSelective, Recompute::kFull};
const char* recomputeName(Recompute r);
// The inverse of recomputeName; the error lists the names.
core::Result<Recompute> parseRecompute(const std::string& name);
enum class Schedule { k1F1B, kInterleaved, kDualPipe };
inline constexpr Schedule kSchedules[] = {Schedule::k1F1B, Schedule::kInterleaved, Schedule::kDualPipe};
const char* scheduleName(Schedule s);
core::Result<Schedule> parseSchedule(const std::string& name);

// How training runs, independent of the cluster mapping.
struct TrainSetup {
  int64_t global_batch_tokens = 4 << 20;
  int64_t seq_len = 4096;
  Dtype compute_dtype = Dtype::kBf16;  // matmul dtype (fp8 = DeepSeek-style fp8 GEMMs)
  double weight_bytes = 2;     // bf16 working weights
  double grad_bytes = 4;       // fp32 gradient accumulation buffers
  double optimizer_bytes = 12; // fp32 master + Adam m and v
  double act_bytes = 2;        // activation element size
  double dispatch_bytes = 2;   // EP token element size on the wire (1 = fp8 dispatch)
  bool flash_attention = true; // no s^2 attention activations
  bool sequence_parallel = true;
  double tp_overlap = 0.0;     // fraction of TP collectives hidden under compute
  double ep_overlap = 0.0;     // fraction of EP all-to-all hidden (DualPipe ~ 1)
  double memory_reserve_bytes = 3e9;  // framework, allocator fragmentation, comm buffers
};

// Bandwidths a stage's collectives see (bytes/s per device, per direction).
struct StageLinks {
  double node_bandwidth = 0;   // TP / small EP inside a node
  double nic_bandwidth = 0;    // DP, PP and large EP between nodes
  double latency = 5e-6;
};

// Cost of one pipeline item (0 = embedding, 1..L = transformer layer l-1,
// L+1 = LM head) for one micro-batch on one device kind.
struct ItemCost {
  double fwd_s = 0;        // forward incl. exposed TP/EP comm
  double bwd_s = 0;        // backward (+ recomputation) incl. exposed comm
  double model_flops = 0;  // fwd+bwd model FLOPs (no recompute) per micro-batch
  double hw_flops = 0;     // incl. recomputation
  double params = 0;       // parameters held per device (after TP/EP split)
  double dense_params = 0; // of which replicated over the full DP group
  double act_bytes = 0;    // activation bytes stashed per in-flight micro-batch
  double tp_comm_s = 0;    // exposed TP time (included in fwd/bwd)
  double ep_comm_s = 0;    // exposed EP time (included in fwd/bwd)
};

class CostModel {
 public:
  CostModel(const ModelSpec& model, TrainSetup setup, const CalibrationProfile* profile = nullptr)
      : model_(model), setup_(setup), profile_(profile) {}

  const ModelSpec& model() const { return model_; }
  const TrainSetup& setup() const { return setup_; }
  int64_t numItems() const { return model_.n_layers + 2; }

  // Seconds for `count` GEMMs of `gemm_flops` each on `dev` in `dtype`.
  double matmulTime(const DeviceSpec& dev, Dtype dtype, double gemm_flops, double count) const;
  // Achieved FLOP/s for one GEMM size (calibration, else catalog derating).
  double achievedFlops(const DeviceSpec& dev, Dtype dtype, double gemm_flops) const;
  double memoryTime(const DeviceSpec& dev, double bytes) const;

  ItemCost itemCost(int64_t item, const DeviceSpec& dev, const StageLinks& links, int64_t tp, int64_t ep,
                    int64_t micro_batch, Recompute rc) const;

  // Bytes per device for weights+grads+optimizer of `params` (of which
  // `dense_params` are sharded by ZeRO over `dp`, the rest over `expert_dp`).
  double stateBytes(double params, double dense_params, int64_t dp, int64_t expert_dp, int zero) const;

  // Ring collective times over n participants of `bytes` per participant.
  static double allreduceTime(double bytes, int64_t n, double bandwidth, double latency);
  static double reduceScatterTime(double bytes, int64_t n, double bandwidth, double latency);
  static double allToAllTime(double bytes, int64_t n, double bandwidth, double latency);

 private:
  ModelSpec model_;
  TrainSetup setup_;
  const CalibrationProfile* profile_;
};

}  // namespace archipelago::plan
