// Helpers the libtorch benches share: preparing the dataset, launching the
// local workers of one run and checking every rank finished, reading the
// metrics.jsonl a run left behind, and small list/median utilities.
// Header-only (each bench is one translation unit).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "archipelago/core/clock.h"
#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/data/prepare.h"
#include "archipelago/runtime/trainer.h"
#include "comm/launch_local.h"

namespace archipelago::bench {

// Prepares `data` from `corpus` unless `data` already holds a dataset.
inline core::Status ensureDataset(const std::string& data, const std::string& corpus) {
  namespace fs = std::filesystem;
  if (fs::exists(fs::path(data) / "manifest.json")) return core::okStatus();
  std::printf("preparing %s from %s ...\n", data.c_str(), corpus.c_str());
  std::fflush(stdout);
  data::PrepareOptions po;
  po.inputs = {corpus};
  po.out = data;
  auto rep = data::prepareDataset(po);
  if (!rep.isOk()) return rep.status().withContext("cannot prepare " + data + " from " + corpus);
  return core::okStatus();
}

// Runs `fn` on `options.world` forked local ranks; an error names the run
// and the first rank that failed (its message and exit code).
inline core::Result<std::vector<comm::RankOutcome>> launchRun(const std::string& name,
                                                              const comm::LocalLaunchOptions& options,
                                                              const comm::LocalRankFn& fn,
                                                              comm::SharedBlock** shared = nullptr) {
  ARCH_ASSIGN_OR_RETURN(auto outcomes, comm::launchLocal(options, fn, shared));
  for (size_t r = 0; r < outcomes.size(); ++r) {
    if (!outcomes[r].message.empty() || outcomes[r].exit_code != 0) {
      return core::internalError(name + " rank " + std::to_string(r) + ": " + outcomes[r].message + " (exit " +
                                 std::to_string(outcomes[r].exit_code) + ")");
    }
  }
  return outcomes;
}

// run.json of a run directory (docs/report.md), written before the run
// starts: `started` is now, every worker's island/device/slowdown, and
// "emulated": true (the benches emulate devices and straits on one host).
inline void writeRunJson(const std::filesystem::path& dir, const std::string& job_file, const core::JobConfig& job,
                         const std::string& strategy) {
  nlohmann::json ranks = nlohmann::json::array();
  const auto workers = runtime::workersOf(job.cluster);
  for (const auto& w : workers) {
    ranks.push_back({{"rank", w.rank}, {"island", w.island}, {"device", w.device}, {"slowdown", w.slowdown}});
  }
  nlohmann::json run = {{"job", job_file},
                        {"started", static_cast<double>(core::wallMicros()) / 1e6},
                        {"world", static_cast<int>(workers.size())},
                        {"ranks", ranks},
                        {"strategy", strategy},
                        {"emulated", true}};
  std::ofstream(dir / "run.json") << run.dump() << "\n";
}

// Every line of a metrics.jsonl that parses as JSON, in order.
inline std::vector<nlohmann::json> readMetrics(const std::filesystem::path& path) {
  std::vector<nlohmann::json> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded()) out.push_back(std::move(j));
  }
  return out;
}

// Per rank, the "step" lines' sums over steps > `after_step` (the first
// steps warm up allocations and connections).
struct RankSteps {
  int64_t steps = 0;
  double compute_s = 0, step_s = 0;
};
inline std::map<int, RankSteps> stepTotals(const std::vector<nlohmann::json>& lines, int64_t after_step) {
  std::map<int, RankSteps> out;
  for (const auto& j : lines) {
    if (j.value("kind", "") != "step" || j.value("step", int64_t{0}) <= after_step) continue;
    RankSteps& r = out[j.value("rank", 0)];
    ++r.steps;
    r.compute_s += j.value("compute_s", 0.0);
    r.step_s += j.value("step_s", 0.0);
  }
  return out;
}

// "1,2,3" -> {"1","2","3"}
inline std::vector<std::string> splitList(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, ',')) {
    if (!x.empty()) out.push_back(x);
  }
  return out;
}

inline double median(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace archipelago::bench
