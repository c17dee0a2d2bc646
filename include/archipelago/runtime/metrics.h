// What a run leaves behind while it runs: metrics.jsonl lines (the contract
// is in docs/report.md) and a Chrome/Perfetto trace of compute and
// communication per worker. Torch-free.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "archipelago/core/status.h"

namespace archipelago::runtime {

// Appends JSON lines to a file shared by all workers of a run. Each line is
// written with one write(2) on an O_APPEND descriptor, so lines from
// different processes never interleave.
class MetricsSink {
 public:
  MetricsSink() = default;
  ~MetricsSink();
  MetricsSink(const MetricsSink&) = delete;
  MetricsSink& operator=(const MetricsSink&) = delete;

  core::Status open(const std::string& path);
  bool isOpen() const { return fd_ >= 0; }
  // Adds "time" (unix seconds) if absent and appends the line.
  void write(nlohmann::json line);

 private:
  int fd_ = -1;
};

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
