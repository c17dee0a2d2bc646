// Predicted step time of our own small runs (CPU workers on this machine,
// emulated straits), for the trainer to print next to the measured time and
// for bench/predict_local.sh.
//
// What it models (docs/planner.md, "Local prediction"): each worker's
// per-step commit, then forward+backward of its share at the measured cost
// of the job's own model (calibration: thread CPU time with the real
// kernels), split into micro-batches; all workers of this host sharing its
// cores (single-threaded workers placed on cores the kernel's way,
// otherwise processor sharing, with the other load measured on a shared
// host) at the measured co-run factor for the number running at once; each
// worker on its own clock between meetings (DiLoCo islands drift apart
// between outer steps and the faster waits);
// the EMULATED slowdown as the trainer applies it (a sleep of
// (slowdown-1) x the worker's measured compute wall time, which frees its
// core); the rebalancer moving batch shares toward equal compute time, as
// the trainer does at its rebalance steps; gradient allreduce inside each
// island and over the EMULATED straits (codec, latency), overlapped with the
// others' remaining compute; the per-step control allreduce; the optimizer.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/plan/calibration.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {

struct StepPrediction {
  double compute_s = 0;     // slowest worker's forward+backward (+ emulated slowdown) at the settled shares
  double comm_s = 0;        // exposed gradient reduction + control values (amortised for DiLoCo)
  double optimizer_s = 0;
  double overhead_s = 0;    // every worker's per-step commit before its step (not in rank 0's timed step)
  double corun_compute = 1;   // co-run factors applied with all workers running at once
  double corun_optimizer = 1;
  double compute_cv = 0;      // run-to-run spread of a worker's compute while co-running (calibrated)
  double total_s = 0;       // mean over the steps the trainer times (incl. those before rebalancing)
  double settled_s = 0;     // one step at the settled shares
  double model_flops = 0;   // per step, all workers
  double host_cores = 0;    // cores assumed shared by the workers (0 = not modelled)
  double background_procs = 0;  // other runnable threads on the host (measured at calibration)
  bool oversubscribed = false;  // workers x threads > cores
  bool measured_parts = false;  // compute from measured model parts (else GEMM profile / catalog)
  std::vector<int64_t> shares;  // settled batch shares per rank
  std::string detail;       // one readable line
};

// Key of the job model's measured parts in a CalibrationProfile: part
// "model" is the whole model's forward (loss) and backward; the key holds
// every shape field that changes the cost.
std::string localPartKey(const std::string& part, const ModelSpec& model, int64_t seq_len, const std::string& dtype);

// One worker's step in a replay (seconds from the replay's start): its
// compute starts after its per-step work `pre`, ends at `end`, and with an
// EMULATED slowdown s it sleeps until done = end + (s-1) x (end - start);
// it leaves the step at `finish` (its group's reduction, the control
// values and the optimizer behind it).
struct WorkerTimes {
  double start = 0;
  double end = 0;
  double done = 0;
  double finish = 0;
};

// The other load on the host: the demand (threads) of each other
// scheduling group; per_thread: our workers' threads compete with them one
// by one (otherwise our job is one group, shared fairly with the others).
struct HostLoad {
  std::vector<double> groups;
  bool per_thread = false;
};

// When a group that has met after a step leaves it: step (in the segment),
// the members (worker indices, all done), every worker's times in that
// step (the members' start/end/done set). Returns the members' finish
// (not before the last of them is done).
using GroupRelease = std::function<double(int64_t step, const std::vector<size_t>& members,
                                          const std::vector<WorkerTimes>& times)>;

// The host the workers of a replay share.
struct HostModel {
  double cores = 0;    // <= 0: not modelled (every worker runs at full speed)
  double threads = 1;  // intra-op threads per worker
  // The other load: our job gets the cores left next to it (fair share
  // between groups, equal within ours).
  HostLoad background;
  std::vector<DeviceCalibration::Corun> corun;
  // Single-threaded workers on whole cores, the kernel's way: a worker that
  // starts computing takes the least busy core (the lowest-numbered of
  // equals) and shares it equally with the workers there; when a core's
  // load falls two below another's, the latest arrival on the busier one
  // moves over (the idle core pulls work). So with 3 workers on 2 cores two
  // of them run at half speed, not all three at 2/3 (measured here: a
  // worker that sleeps and wakes got 0.38-0.57 of a core in 50 of 58
  // steps). false: processor sharing (every running thread the same share
  // of the cores our job gets).
  bool per_core = false;
};

// Replays `steps` steps from one meeting of all workers to the next: worker
// r runs pre[r] then work[r] CPU seconds (measured alone) on the host's
// cores (a sleeping or waiting worker frees its core), sleeps its EMULATED
// slowdown, (slowdown-1) x its compute wall time, then waits for its group
// (the workers with the same island[] value; all workers after the last step);
// the group leaves at release() and each member starts its next step. Each
// worker runs on its own clock, so one island's compute speeds up while
// another sleeps or waits (DiLoCo islands drift apart between outer steps).
// With n workers computing each unit of work costs corunFactor(n).
// Returns times[step][worker].
std::vector<std::vector<WorkerTimes>> replaySegment(const std::vector<double>& pre, const std::vector<double>& work,
                                                    const std::vector<double>& slowdown, const std::vector<int>& island,
                                                    int64_t steps, const HostModel& host, const GroupRelease& release);

// Expected maximum of n independent standard normal variables (0 for n <= 1):
// how far past the mean a group of n ranks that meet every step waits, in
// standard deviations of one rank's compute.
double expectedMaxOfNormals(int64_t n);

// job: the resolved job (cluster, model, train, strategy, data.seq_len);
// vocab: the tokenizer's vocabulary (job.model.vocab_size may be 0).
core::Result<StepPrediction> predictStepTime(const core::JobConfig& job, int64_t vocab,
                                             const DeviceCatalog& catalog,
                                             const CalibrationProfile* profile);

}  // namespace archipelago::plan
