#include "archipelago/runtime/trace.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "archipelago/core/clock.h"
#include "archipelago/core/files.h"
#include "archipelago/core/log.h"

namespace archipelago::runtime {

void TraceRecorder::setProcess(int rank, std::string name) {
  std::lock_guard<std::mutex> lock(mu_);
  pid_ = rank;
  name_ = std::move(name);
}

void TraceRecorder::complete(Track track, std::string name, int64_t start_us, int64_t dur_us, nlohmann::json args) {
  nlohmann::json e = {{"name", std::move(name)}, {"ph", "X"}, {"ts", start_us}, {"dur", dur_us}, {"tid", static_cast<int>(track)}};
  if (!args.is_null()) e["args"] = std::move(args);
  std::lock_guard<std::mutex> lock(mu_);
  e["pid"] = pid_;
  events_.push_back(std::move(e));
}

void TraceRecorder::instant(std::string name, int64_t at_us, nlohmann::json args) {
  nlohmann::json e = {{"name", std::move(name)}, {"ph", "i"}, {"s", "p"}, {"ts", at_us}, {"tid", 0}};
  if (!args.is_null()) e["args"] = std::move(args);
  std::lock_guard<std::mutex> lock(mu_);
  e["pid"] = pid_;
  events_.push_back(std::move(e));
}

size_t TraceRecorder::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return events_.size();
}

core::Status TraceRecorder::writeFile(const std::string& path) const {
  nlohmann::json doc;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto events = nlohmann::json::array();
    events.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", pid_}, {"args", {{"name", name_}}}});
    const char* tracks[] = {"compute", "comm", "data", "checkpoint", "wait"};
    for (int t = 0; t < 5; ++t) {
      events.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", pid_}, {"tid", t}, {"args", {{"name", tracks[t]}}}});
    }
    for (const auto& e : events_) events.push_back(e);
    doc["traceEvents"] = std::move(events);
    doc["displayTimeUnit"] = "ms";
  }
  return core::writeFileAtomic(path, doc.dump());
}

core::Status TraceRecorder::merge(const std::vector<std::string>& inputs, const std::string& output) {
  auto all = nlohmann::json::array();
  for (const auto& in : inputs) {
    std::ifstream f(in);
    if (!f) continue;  // a worker that died before writing its trace
    try {
      auto doc = nlohmann::json::parse(f);
      for (auto& e : doc["traceEvents"]) all.push_back(std::move(e));
    } catch (const std::exception& e) {
      ARCH_LOG_WARN("skipping unreadable trace '{}': {}", in, e.what());
    }
  }
  nlohmann::json doc = {{"traceEvents", std::move(all)}, {"displayTimeUnit", "ms"}};
  return core::writeFileAtomic(output, doc.dump());
}

ScopedSpan::ScopedSpan(TraceRecorder* trace, TraceRecorder::Track track, std::string name, double* accumulate_s)
    : trace_(trace), track_(track), name_(std::move(name)), acc_(accumulate_s), start_us_(core::wallMicros()) {}

ScopedSpan::~ScopedSpan() {
  int64_t dur = core::wallMicros() - start_us_;
  if (acc_) *acc_ += static_cast<double>(dur) / 1e6;
  if (trace_) trace_->complete(track_, std::move(name_), start_us_, dur);
}

}  // namespace archipelago::runtime
