// The metrics.jsonl schema: one typed record per `kind` a run writes, one
// writer (formatMetricsLine, MetricsSink) and one reader (parseMetricsRecord)
// for all of them. Trainers, the launcher and benches build these records;
// the report reads them back. Before this file the writers built ad-hoc JSON
// and the reader parsed it separately, and the two drifted (a field read that
// nobody wrote, one field under two names, kinds the reader did not know).
// The contract, every kind and field, is docs/report.md. Torch-free.
//
// Each record lists its fields once, in `fields(F&)`; the writer and the
// reader both walk that list, so a field cannot exist on one side only.
// Field rules:
//   * a numeric field holding NaN (kMissing) or an empty optional is not
//     written, and a missing or null number reads back as NaN / nullopt;
//   * `count` fields are doubles holding whole numbers (tokens, bytes): they
//     are written as JSON integers;
//   * `key` fields must be present for the line to be valid; a line without
//     them is malformed (skipped and counted by the report);
//   * empty strings and empty arrays are not written (unless a key);
//   * unknown fields are ignored on reading (the format grows).
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::report {

// A numeric field the line did not carry (or carried as null).
inline constexpr double kMissing = std::numeric_limits<double>::quiet_NaN();

// kind "step": one per logged step per worker (both trainers). Times are
// seconds of this step; `time` (unix seconds) is when the step ended.
struct StepRecord {
  static constexpr const char* kKind = "step";
  int64_t step = 0;
  int rank = 0;
  std::string island;
  int64_t epoch = 0;  // membership generation (elastic runs; 0 otherwise)
  double loss = kMissing;        // the world's mean loss (the island's between DiLoCo outer steps)
  double local_loss = kMissing;  // this worker's own tokens only
  double lr = kMissing;
  double samples = kMissing, tokens = kMissing;  // counts of this worker's batch share
  double compute_s = kMissing;  // forward+backward (pipeline: busy time of the stage), emulated slowdown included
  double comm_s = kMissing;     // collectives and transfers, wait_s included
  // The part of comm_s this worker sat blocked on peers after its own
  // compute: the gradient reduction's tail after backward (data-parallel
  // trainer: the slowest peer's compute plus the transfer that did not
  // overlap), or the receive waits and send drain inside the pipeline
  // schedule (schedule window minus busy time; pipeline/expert trainer).
  double wait_s = kMissing;
  double data_s = kMissing, optimizer_s = kMissing, step_s = kMissing;
  double compute_cpu_s = kMissing;  // CPU seconds of the forward+backward thread (data-parallel trainer)
  double cpu_s = kMissing;          // CPU seconds of the whole process in the step
  double minor_faults = kMissing;   // pages touched for the first time in the step (count)
  double peak_rss_bytes = kMissing; // the process's peak resident memory since its previous step record
  // Model state this worker holds: fp32 masters, gradients, compute copies
  // and optimizer moments (ZeRO: its slices), plus (ZeRO-3) the memory kept
  // for gathered units (a pool: the most it held at once).
  double state_bytes = kMissing;
  double tensor_peak_bytes = kMissing;  // the most bytes of CPU tensors live at once since the previous record
  double tokens_per_s = kMissing, grad_norm = kMissing;
  double slowdown = kMissing;  // EMULATED compute stretch of this worker
  double share = kMissing;     // samples of the global batch assigned to this worker (count)
  double commit_s = kMissing;  // elastic: copying the rollback point
  int stage = -1;              // pipeline stage (-1: not a pipeline run)
  double micro_batches = kMissing;
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.key("step", step), f.key("rank", rank), f.field("island", island), f.field("epoch", epoch);
    f.field("loss", loss), f.field("local_loss", local_loss), f.field("lr", lr);
    f.count("samples", samples), f.count("tokens", tokens);
    f.field("compute_s", compute_s), f.field("comm_s", comm_s), f.field("wait_s", wait_s);
    f.field("data_s", data_s), f.field("optimizer_s", optimizer_s), f.field("step_s", step_s);
    f.field("compute_cpu_s", compute_cpu_s), f.field("cpu_s", cpu_s), f.count("minor_faults", minor_faults);
    f.count("peak_rss_bytes", peak_rss_bytes);
    f.count("state_bytes", state_bytes);
    f.count("tensor_peak_bytes", tensor_peak_bytes);
    f.field("tokens_per_s", tokens_per_s), f.field("grad_norm", grad_norm);
    f.field("slowdown", slowdown), f.count("share", share), f.field("commit_s", commit_s);
    if (stage >= 0 || !f.kWriting) f.field("stage", stage);
    f.count("micro_batches", micro_batches), f.field("time", time);
  }
};

// kind "eval": validation loss after `step` (rank 0).
struct EvalRecord {
  static constexpr const char* kKind = "eval";
  int64_t step = 0;
  double val_loss = kMissing;  // key: present, null when it diverged
  double time = kMissing;

  template <class F> void fields(F& f) { f.key("step", step), f.key("val_loss", val_loss), f.field("time", time); }
};

// kind "outer": one cross-island synchronisation of one fragment (DiLoCo
// outer step, streaming fragment), per rank.
struct OuterRecord {
  static constexpr const char* kKind = "outer";
  std::string strategy;  // diloco | streaming
  int64_t step = 0;      // the step at which the result was applied
  int64_t sent_step = -1;  // the step whose parameters were sent (streaming overlap: earlier)
  int64_t round = -1;    // per fragment, from 1 (-1 on reading: the line's index)
  int fragment = 0;
  int rank = 0;
  int island = -1;       // island index of the rank
  double params = kMissing;                 // parameters in the fragment (count)
  std::string codec;
  double bytes_strait = kMissing;           // payload this rank put on the strait for the fragment (count)
  double bytes_strait_measured = kMissing;  // the transport's strait counter since the last line (count)
  double shared = kMissing;   // fragments exchanged together (the final sync: all)
  bool control = false;       // carried the control values (loss, stop) along
  double sync_s = kMissing;   // the exchange
  double wait_s = kMissing;   // the training loop blocked on the result
  std::string digest;         // first 16 hex of the fragment's hash: replicas must agree
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.field("strategy", strategy), f.key("step", step), f.field("sent_step", sent_step), f.field("round", round);
    f.field("fragment", fragment), f.field("rank", rank), f.field("island", island), f.count("params", params);
    f.field("codec", codec), f.count("bytes_strait", bytes_strait);
    f.count("bytes_strait_measured", bytes_strait_measured), f.count("shared", shared);
    f.field("control", control), f.field("sync_s", sync_s), f.field("wait_s", wait_s), f.field("digest", digest);
    f.field("time", time);
  }
};

// kind "event": checkpoint, failure, epoch, join, resync, recovered, stop,
// started, rebalance (trainers), replace, restart (launcher), or a new name.
struct EventRecord {
  static constexpr const char* kKind = "event";
  std::string event;
  int64_t step = -1;  // -1: not tied to a step
  std::optional<int64_t> rank;         // the rank it concerns (join, replace) or that wrote it
  std::optional<int64_t> epoch;        // elastic runs
  std::string detail;                  // one line for people
  std::optional<int64_t> failed_rank;  // failure
  std::vector<int64_t> workers;        // epoch: the ranks alive in the new epoch
  double stall_s = kMissing;      // checkpoint: the training loop's stall
  double transfer_s = kMissing;   // join: receiving the live state
  double recovery_s = kMissing;   // recovered: failure to first completed step
  double rebuild_s = kMissing;    // epoch: rebuilding the groups
  double detected_at = kMissing;  // failure: unix seconds it was detected
  std::optional<int64_t> pid;     // started
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.key("event", event), f.field("step", step), f.field("rank", rank), f.field("epoch", epoch);
    f.field("detail", detail), f.field("failed_rank", failed_rank), f.field("workers", workers);
    f.field("stall_s", stall_s), f.field("transfer_s", transfer_s), f.field("recovery_s", recovery_s);
    f.field("rebuild_s", rebuild_s), f.field("detected_at", detected_at), f.field("pid", pid), f.field("time", time);
  }
};

// kind "moe": expert load of one MoE layer at one step: on rank 0
// (data-parallel trainer) or summed over the ranks (pipeline/expert trainer,
// written by rank 0).
struct MoeRecord {
  static constexpr const char* kKind = "moe";
  int64_t step = 0;
  int rank = 0;
  int layer = 0;
  std::vector<double> tokens_per_expert;   // key: assignments the router chose (before the capacity limit)
  std::vector<double> dropped_per_expert;  // assignments over capacity (empty: not written)
  double dropped = kMissing;
  // Capacity of the layer per expert in assignments, summed over the ranks
  // the line covers. Read also from "capacity_sum" (older pipeline runs).
  double capacity = kMissing;
  double aux_loss = kMissing;
  double expert_parallel = kMissing;  // EP group size (pipeline/expert trainer)
  double dispatch_bytes = kMissing;   // rank 0's all-to-all bytes to other members so far
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.key("step", step), f.field("rank", rank), f.key("layer", layer), f.keyCount("tokens_per_expert", tokens_per_expert);
    f.count("dropped_per_expert", dropped_per_expert), f.count("dropped", dropped), f.count("capacity", capacity);
    f.field("aux_loss", aux_loss), f.count("expert_parallel", expert_parallel);
    f.count("dispatch_bytes", dispatch_bytes), f.field("time", time);
  }
};

// kind "pipeline": one per logged step of a pipeline-parallel run (rank 0):
// per stage busy time and bubble (1 - busy / the pipeline's schedule window).
struct PipelineRecord {
  static constexpr const char* kKind = "pipeline";
  int64_t step = 0;
  int stages = 0;  // 0 on reading: the length of busy_s
  int64_t micro_batches = 0;
  std::vector<int64_t> stage_layers;
  std::vector<double> busy_s;  // key: per stage, seconds (mean over pipelines)
  std::vector<double> bubble;  // key: per stage, fraction of the window
  double bubble_mean = kMissing, window_s = kMissing;
  double bubble_theory = kMissing;  // "bubble_1f1b_theory": (p-1)/(m+p-1)
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.key("step", step), f.field("stages", stages), f.field("micro_batches", micro_batches);
    f.field("stage_layers", stage_layers), f.key("busy_s", busy_s), f.key("bubble", bubble);
    f.field("bubble_mean", bubble_mean), f.field("window_s", window_s);
    f.field("bubble_1f1b_theory", bubble_theory), f.field("time", time);
  }
};

// kind "parallel": the pipeline / expert layout, once at the start (rank 0).
struct ParallelRecord {
  static constexpr const char* kKind = "parallel";
  int64_t pipeline_stages = 1;
  std::vector<int64_t> stage_layers;
  int64_t replicas = 1;
  int64_t expert_parallel = 1;
  std::vector<int64_t> expert_begin;
  int64_t tensor_parallel = 1;
  std::vector<int64_t> shares;
  bool recompute = false;
  std::string strategy;
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.field("pipeline_stages", pipeline_stages), f.field("stage_layers", stage_layers), f.field("replicas", replicas);
    f.field("expert_parallel", expert_parallel), f.field("expert_begin", expert_begin);
    f.field("tensor_parallel", tensor_parallel), f.field("shares", shares);
    f.field("recompute", recompute), f.field("strategy", strategy), f.field("time", time);
  }
};

// kind "prediction": the planner's step-time prediction for this job on
// this machine, once at the start (data-parallel trainer, rank 0).
struct PredictionRecord {
  static constexpr const char* kKind = "prediction";
  double predicted_step_s = kMissing, compute_s = kMissing, comm_s = kMissing;
  std::string detail;
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.field("predicted_step_s", predicted_step_s), f.field("compute_s", compute_s), f.field("comm_s", comm_s);
    f.field("detail", detail), f.field("time", time);
  }
};

// kind "memory": the planner's memory model for one worker (written by
// every worker once it is set up; plan/worker_memory.h), to set beside the
// step records' tensor_peak_bytes.
struct MemoryRecord {
  static constexpr const char* kKind = "memory";
  int rank = 0;
  double predicted_bytes = kMissing, state_bytes = kMissing, rollback_bytes = kMissing, activation_bytes = kMissing;
  std::string detail;
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.key("rank", rank), f.count("predicted_bytes", predicted_bytes), f.count("state_bytes", state_bytes);
    f.count("rollback_bytes", rollback_bytes), f.count("activation_bytes", activation_bytes);
    f.field("detail", detail), f.field("time", time);
  }
};

// kind "replica": a rank's parameter digest at the end of an elastic run;
// replicas must agree (checked bit-identical by hash).
struct ReplicaRecord {
  static constexpr const char* kKind = "replica";
  int rank = 0;
  int64_t step = 0;
  std::string digest;  // key: hex
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.key("rank", rank), f.key("step", step), f.key("digest", digest), f.field("time", time);
  }
};

// kind "summary": written once at the end (the worker holding rank 0's
// result, or the strategies bench). Its values take precedence over those
// derived from the other lines. Absent fields stay nullopt.
struct SummaryRecord {
  static constexpr const char* kKind = "summary";
  std::optional<int64_t> steps, first_step;
  std::optional<double> wall_s, tokens, final_loss, final_val_loss, predicted_step_s, measured_step_s;
  std::optional<double> bytes_strait;  // everything the run sent over straits (the strategies bench's counter)
  std::optional<double> lr;            // the strategies bench's peak learning rate
  std::optional<bool> stopped_early;
  double time = kMissing;

  template <class F> void fields(F& f) {
    f.field("steps", steps), f.field("first_step", first_step), f.field("wall_s", wall_s);
    f.count("tokens", tokens), f.field("final_loss", final_loss), f.field("final_val_loss", final_val_loss);
    f.field("predicted_step_s", predicted_step_s), f.field("measured_step_s", measured_step_s);
    f.count("bytes_strait", bytes_strait), f.field("lr", lr), f.field("stopped_early", stopped_early);
    f.field("time", time);
  }
};

// Every kind this product writes.
using MetricsRecord = std::variant<StepRecord, EvalRecord, OuterRecord, EventRecord, MoeRecord, PipelineRecord,
                                   ParallelRecord, PredictionRecord, MemoryRecord, ReplicaRecord, SummaryRecord>;

// The `kind` names of MetricsRecord's alternatives, in its order.
std::vector<std::string> metricsKinds();

// One JSON object (no newline) with "kind" first. `time` is written as it
// is (MetricsSink fills it in).
std::string formatMetricsLine(const MetricsRecord& record);

// What one line of metrics.jsonl holds.
struct ParsedMetricsLine {
  enum class Status { kBlank, kRecord, kMalformed, kUnknownKind };
  Status status = Status::kBlank;
  std::string kind;                     // kUnknownKind: the name it carried
  std::optional<MetricsRecord> record;  // kRecord only
};

// Parses one line. Never fails: blank lines, lines that are not a JSON
// object, have no string `kind` or lack a key field, and unknown kinds are
// reported through the status.
ParsedMetricsLine parseMetricsRecord(std::string_view line);

// Appends records to a metrics.jsonl shared by all workers of a run. Each
// line is written with one write(2) on an O_APPEND descriptor, so lines from
// different processes never interleave. Not thread-safe per object (one
// owner); write() of a closed sink does nothing.
class MetricsSink {
 public:
  MetricsSink() = default;
  ~MetricsSink();
  MetricsSink(const MetricsSink&) = delete;
  MetricsSink& operator=(const MetricsSink&) = delete;

  core::Status open(const std::string& path);
  bool isOpen() const { return fd_ >= 0; }
  // Sets `time` to now (unix seconds) when the record has none and appends
  // the line.
  void write(MetricsRecord record);

 private:
  int fd_ = -1;
};

}  // namespace archipelago::report
