// libFuzzer target: a job YAML file through core::loadJob, the loader every
// verb runs first (and the one a checkpoint's state.json job_yaml goes
// through on resume). Corpus: tests/fuzz/corpus/job_yaml. CI runs it through
// tests/core/fuzz_smoke_test.cpp.
//
// loadJob reads a path, so each input is written to job.yaml in a private
// scratch directory (fuzz/scratch_dir.h); cluster.yaml beside it lets
// `cluster: cluster.yaml` inputs reach the cluster-file loader too.
//
// Invariants: loadJob never throws (every failure is a Status); an accepted
// job validates; the resolved YAML it dumps (what a run directory and a
// checkpoint keep) loads again, and dumping that gives the same text.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "archipelago/core/config.h"
#include "archipelago/core/files.h"
#include "fuzz/scratch_dir.h"

namespace archipelago::fuzz {

// The scratch directory, with cluster.yaml beside the inputs.
inline const std::filesystem::path& jobFuzzDir() {
  static const bool ready = core::writeFile(scratchDir() / "cluster.yaml",
                                            "name: two\nislands:\n  - {name: a, device: cpu, count: 2}\n"
                                            "  - {name: b, device: cpu, count: 1}\n"
                                            "straits:\n  - {a: a, b: b, bandwidth: 100Mbit/s, latency: 5ms}\n")
                                .isOk();
  (void)ready;
  return scratchDir();
}

// loadJob with every exception turned into a trap: none may escape it.
inline core::Result<core::LoadedJob> loadJobNoThrow(const std::filesystem::path& file) {
  core::LoadOptions options;
  options.use_process_env = false;  // the same result whatever the environment holds
  try {
    return core::loadJob(file.string(), options);
  } catch (...) {
    __builtin_trap();
  }
}

inline int fuzzJobYaml(const uint8_t* data, size_t size) {
  const auto& dir = jobFuzzDir();
  const auto file = dir / "job.yaml";
  if (!core::writeFile(file, std::string_view(reinterpret_cast<const char*>(data), size)).isOk()) return 0;
  auto job = loadJobNoThrow(file);
  if (!job.isOk()) return 0;
  if (!core::validateJob(job->job).isOk()) __builtin_trap();
  const std::string dumped = core::dumpJobYaml(job->job);
  const auto again_file = dir / "resolved.yaml";
  if (!core::writeFile(again_file, dumped).isOk()) return 0;
  auto again = loadJobNoThrow(again_file);
  if (!again.isOk()) __builtin_trap();
  if (core::dumpJobYaml(again->job) != dumped) __builtin_trap();
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzJobYaml themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzJobYaml(data, size);
}
#endif
