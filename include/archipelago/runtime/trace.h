// The Chrome/Perfetto trace a run leaves behind (trace.json): compute and
// communication spans per worker. Torch-free. The metrics.jsonl lines are
// written through report::MetricsSink (archipelago/report/metrics.h), next to
// the reader, so writer and reader share one schema; the trace stays here
// because only the runtime writes it and the report only links it.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "archipelago/core/status.h"

namespace archipelago::runtime {

// Chrome trace events ("X" complete events) for one worker; pid = rank so
// Perfetto shows one track group per worker, tid separates compute from
// communication. Thread-safe (the progress engine records from its thread).
class TraceRecorder {
 public:
  enum Track : int { kCompute = 0, kComm = 1, kData = 2, kCheckpoint = 3, kWait = 4 };

  void setProcess(int rank, std::string name);
  // Records [start_us, start_us + dur_us) in wall-clock microseconds.
  void complete(Track track, std::string name, int64_t start_us, int64_t dur_us, nlohmann::json args = {});
  void instant(std::string name, int64_t at_us, nlohmann::json args = {});
  // Writes {"traceEvents": [...]} atomically.
  core::Status writeFile(const std::string& path) const;
  size_t size() const;

  // Merges per-worker trace files into one (launcher, at the end of a run).
  static core::Status merge(const std::vector<std::string>& inputs, const std::string& output);

 private:
  mutable std::mutex mu_;
  int pid_ = 0;
  std::string name_;
  std::vector<nlohmann::json> events_;
};

// RAII span that records into a TraceRecorder and adds its length to a
// seconds accumulator.
class ScopedSpan {
 public:
  ScopedSpan(TraceRecorder* trace, TraceRecorder::Track track, std::string name, double* accumulate_s = nullptr);
  ~ScopedSpan();
  ScopedSpan(const ScopedSpan&) = delete;
  ScopedSpan& operator=(const ScopedSpan&) = delete;

 private:
  TraceRecorder* trace_;
  TraceRecorder::Track track_;
  std::string name_;
  double* acc_;
  int64_t start_us_;
};

}  // namespace archipelago::runtime
