// The run report: reads the run directory a training run leaves behind
// (run.json, metrics.jsonl, trace.json; contract in docs/report.md) and turns
// it into something a person can open: RUN/report/index.html (self-contained,
// inline SVG charts), summary.txt and one .svg per chart. Several runs can be
// compared in one report (sync vs DiLoCo vs streaming).
//
// Torch-free on purpose (the report layer sits below runtime): it builds and
// tests without libtorch, and any tool can read run directories with it.
// metrics.jsonl is read through the same schema the trainers write with
// (metrics.h).
//
// Robustness rules (the metrics format grows, and runs crash mid-line):
// unknown `kind`s and unknown fields are ignored; lines that are not a JSON
// object, lack a string `kind`, or lack the key fields of a known kind are
// skipped and counted, never fatal.
#pragma once

#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/report/metrics.h"

namespace archipelago::report {

// ---- what the run directory holds -------------------------------------------
// (metrics.jsonl's records are declared in metrics.h)

// One worker as listed in run.json.
struct RunRank {
  int rank = 0;
  std::string island;
  std::string device;
  double slowdown = 1.0;  // EMULATED compute stretch factor
};

// Everything read from one run directory.
struct RunData {
  std::filesystem::path dir;
  std::string name;  // directory name, used in legends and comparisons

  // run.json (absent file: has_run_json false, fields stay default)
  bool has_run_json = false;
  std::string job;
  double started = 0;  // unix seconds; 0 = unknown
  int world = 0;
  std::vector<RunRank> ranks;
  std::string strategy;
  bool emulated = false;

  std::vector<StepRecord> steps;
  std::vector<EvalRecord> evals;
  std::vector<OuterRecord> outers;
  std::vector<EventRecord> events;
  std::vector<MoeRecord> moe;
  std::vector<PipelineRecord> pipeline;
  std::optional<ParallelRecord> parallel;
  std::optional<PredictionRecord> prediction;
  std::vector<MemoryRecord> memory;  // per worker
  std::vector<ReplicaRecord> replicas;
  std::optional<SummaryRecord> summary;

  int64_t lines = 0;          // non-empty lines read from metrics.jsonl
  int64_t malformed = 0;      // skipped: not JSON, no kind, or missing key fields
  int64_t unknown_kinds = 0;  // ignored: a kind this reader does not know
  std::map<std::string, int64_t> unknown_kind_names;  // how many lines of each unknown kind
  bool has_trace = false;     // trace.json exists
};

// Parses one metrics.jsonl line into `run` (updates the counters). Never fails:
// a bad line only increments run.malformed.
void parseMetricsLine(std::string_view line, RunData& run);

// Reads run.json (optional) and metrics.jsonl (required) of `dir`.
core::Result<RunData> loadRunDir(const std::filesystem::path& dir);

// ---- what is derived from it -----------------------------------------------

// One point of a per-step curve.
struct StepPoint {
  int64_t step = 0;
  double value = 0;   // e.g. mean loss over the ranks that reported the step
  double time_s = 0;  // wall-clock seconds since the run started (latest rank)
  double tokens = 0;  // tokens trained by all ranks up to and including this step (lines without tokens count 0)
};

// Mean training loss per step over ranks (ranks with a non-finite loss are
// left out; a (step, rank) reported twice, e.g. replayed after a restart,
// counts with its last line). Sorted by step. `tokens` is cumulative.
std::vector<StepPoint> meanLossPerStep(const RunData& run);

// Seconds since the run started for a unix timestamp (run.json "started", or
// the earliest step start when run.json lacks it).
double runStartTime(const RunData& run);

struct WorkerStats {
  int rank = 0;
  std::string island;
  std::string device;
  double slowdown = 1.0;
  int64_t steps = 0;
  double samples = 0;
  double tokens = 0;
  double tokens_per_s = 0;  // tokens / sum(step_s)
  double mean_compute_s = 0, mean_comm_s = 0, mean_wait_s = 0, mean_step_s = 0;
  double utilisation = 0;  // sum(compute_s) / wall_s
};

struct IslandStats {
  std::string island;
  int workers = 0;
  double tokens_per_s = 0;  // sum over its workers
  double utilisation = 0;   // mean over its workers of compute / wall
};

// Pipeline bubble over the logged steps (the first logged step is left out
// when there are others: it warms up allocations and connections).
struct PipelineStageStats {
  int stage = 0;
  int64_t layers = 0;  // 0: unknown
  double busy_s = 0;   // mean per step
  double bubble = 0;   // mean fraction of the schedule window
};
struct PipelineStats {
  int stages = 0;
  int64_t micro_batches = 0;  // of the last line
  int64_t steps = 0;          // pipeline lines averaged
  int64_t first_step = 0;     // first step averaged
  std::vector<PipelineStageStats> per_stage;
  double window_s = 0;       // mean schedule window per step
  double bubble_mean = 0;    // mean over steps of the stage-mean bubble
  double bubble_theory = 0;  // 1F1B (p-1)/(m+p-1), mean over the same steps
};

// Routing of one MoE layer summed over every logged line.
struct MoeLayerStats {
  int layer = 0;
  int64_t lines = 0;
  double routed = 0;   // sum of tokens_per_expert (assignments before capacity)
  double dropped = 0;  // sum of `dropped` (or of dropped_per_expert)
  double drop_fraction = 0;
  int64_t last_step = 0;
  std::vector<double> last_tokens_per_expert;   // summed over the ranks of the last step
  std::vector<double> last_dropped_per_expert;  // idem (empty: not written)
  double last_imbalance = 0;  // max / mean of last_tokens_per_expert
  double dispatch_bytes = kMissing;  // largest dispatch_bytes seen
};

struct RunStats {
  int64_t steps = 0;  // distinct steps seen (or summary.steps)
  int64_t first_step = 0, last_step = 0;
  double wall_s = 0;
  double tokens = 0;
  double tokens_per_s = 0;  // aggregate: tokens / wall_s
  std::vector<WorkerStats> workers;  // by rank
  std::vector<IslandStats> islands;  // by name
  std::optional<double> final_loss, final_val_loss;
  std::optional<double> predicted_step_s;
  std::optional<double> measured_step_s;  // summary, else mean over steps of the slowest rank's step_s
  std::map<std::string, int64_t> event_counts;
  int64_t outer_rounds = 0;
  double bytes_strait = 0;  // summary.bytes_strait, else the sum over outer lines
  double mean_sync_s = 0;
  double utilisation = 0;   // mean over workers of compute / wall
  std::optional<PipelineStats> pipeline;  // pipeline-parallel runs
  std::vector<MoeLayerStats> moe_layers;  // by layer
};

RunStats computeRunStats(const RunData& run);

// The pipeline part of computeRunStats: nullopt without "pipeline" lines.
// Means over the logged steps, the first left out when there are others; a
// step logged twice (replayed after a restart) counts with its last line.
std::optional<PipelineStats> pipelineStats(const RunData& run);

// The MoE part of computeRunStats: per layer, every (step, rank) line once.
std::vector<MoeLayerStats> moeLayerStats(const RunData& run);

// The plain-text summary (what `archipelago report` prints and summary.txt holds).
std::string formatSummary(const RunData& run, const RunStats& stats);

// ---- writing the report -----------------------------------------------------

struct ReportOptions {
  std::filesystem::path out_dir;  // empty: <first run dir>/report
  size_t max_points = 4000;       // per series in a chart; longer series are bucket-averaged
};

struct ReportOutput {
  std::filesystem::path dir;
  std::filesystem::path index_html;
  std::filesystem::path summary_txt;
  std::vector<std::filesystem::path> charts;  // every .svg written
  std::string summary;                        // same text as summary.txt
};

// The run directories a list of paths names: a path with metrics.jsonl is a
// run; a path without one whose sub-directories hold runs (the output
// directory of bench_strategies_torch, one run per strategy) stands for
// those runs, in name order. Anything else is an error naming the path.
core::Result<std::vector<std::filesystem::path>> expandRunDirs(const std::vector<std::filesystem::path>& paths);

// Loads every run dir and writes the report. With more than one run, the
// report also holds comparison charts (validation loss vs wall-clock time,
// loss vs step, vs wall-clock and vs tokens) and a comparison table, and
// per-run charts are prefixed "runN_". `run_dirs` go through expandRunDirs;
// when the first names a directory of runs, the default out_dir is
// <that directory>/report.
core::Result<ReportOutput> writeReport(const std::vector<std::filesystem::path>& run_dirs,
                                       const ReportOptions& options = {});

}  // namespace archipelago::report
