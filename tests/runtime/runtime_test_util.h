// Shared by the runtime tests: a small corpus prepared once per test binary
// (byte tokenizer) in a scratch directory, and helpers that run the real
// `archipelago` binary and read what a run leaves in its run directory.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "archipelago/core/config.h"
#include "archipelago/data/prepare.h"

namespace archipelago::runtime::testutil {

namespace fs = std::filesystem;

inline fs::path scratchRoot() {
  static fs::path r = fs::temp_directory_path() / ("arch_runtime_test_" + std::to_string(::getpid()));
  return r;
}
inline fs::path tinyDataDir() { return scratchRoot() / "data"; }

class TinyCorpusEnv : public ::testing::Environment {
 public:
  void SetUp() override {
    fs::create_directories(scratchRoot() / "corpus");
    for (int d = 0; d < 40; ++d) {
      std::ofstream f(scratchRoot() / "corpus" / ("doc" + std::to_string(d) + ".txt"));
      for (int line = 0; line < 30; ++line) {
        f << "Document " << d << " line " << line << ": the union is strong and the people are "
          << (line % 3 == 0 ? "hopeful" : line % 3 == 1 ? "patient" : "free") << ".\n";
      }
    }
    data::PrepareOptions po;
    po.inputs = {(scratchRoot() / "corpus").string()};
    po.out = tinyDataDir().string();
    po.val_fraction = 0.1;
    auto rep = data::prepareDataset(po);
    ASSERT_TRUE(rep.isOk()) << rep.status().toString();
  }
  void TearDown() override { fs::remove_all(scratchRoot()); }
};
inline const auto* const kTinyCorpusEnv = ::testing::AddGlobalTestEnvironment(new TinyCorpusEnv);

inline core::JobConfig loadJobText(const std::string& yaml, const std::string& name) {
  fs::path p = scratchRoot() / (name + ".yaml");
  std::ofstream(p) << yaml;
  auto j = core::loadJob(p.string());
  EXPECT_TRUE(j.isOk()) << j.status().toString();
  return j.isOk() ? j->job : core::JobConfig{};
}

// Runs `archipelago train JOB [args]` (output in NAME.out) and returns its exit code.
inline int runTrain(const std::string& yaml, const std::string& name, const std::vector<std::string>& args = {}) {
  fs::path p = scratchRoot() / (name + ".yaml");
  std::ofstream(p) << yaml;
  std::string cmd = std::string(ARCHIPELAGO_BINARY) + " train " + p.string();
  for (const auto& a : args) cmd += " " + a;
  cmd += " > " + (scratchRoot() / (name + ".out")).string() + " 2>&1";
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

inline std::string fileText(const fs::path& p) {
  std::ifstream f(p);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline std::string outputOf(const std::string& name) {
  std::ifstream f(scratchRoot() / (name + ".out"));
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline std::vector<nlohmann::json> metricLines(const fs::path& run_dir, const std::string& kind) {
  std::vector<nlohmann::json> out;
  std::ifstream f(run_dir / "metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("kind", "") == kind) out.push_back(j);
  }
  return out;
}

// Samples each rank computed per step (its last step line), by rank.
inline std::map<int, int64_t> samplesByRank(const fs::path& run) {
  std::map<int, int64_t> samples;
  for (const auto& j : metricLines(run, "step")) samples[j["rank"].get<int>()] = j["samples"].get<int64_t>();
  return samples;
}

// Global loss per step, as logged by rank 0.
inline std::map<int64_t, double> rank0Losses(const fs::path& run_dir) {
  std::map<int64_t, double> out;
  for (const auto& j : metricLines(run_dir, "step")) {
    if (j.value("rank", -1) == 0) out[j["step"].get<int64_t>()] = j["loss"].get<double>();
  }
  return out;
}

}  // namespace archipelago::runtime::testutil
