// ZeRO-3 through the real binary (launcher, coordinator, worker processes,
// comm over 127.0.0.1) against the same job trained by one process: three
// workers in two islands with uneven shares 5/2/1 (micro-batch counts 3/1/1,
// so two of them run idle passes), killed half-way, and the checkpoint the
// shards assembled resumed by one process and by four ZeRO-3 workers with
// other shares and other slice boundaries, both evaluating. The mechanics
// of one rank (gradients of its slice, weights held only where used) are
// in sharded_params_test.cpp.
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/core/config.h"
#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testutil::checkpointModel;
using testutil::expectCurve;
using testutil::jobYaml;
using testutil::kTol;
using testutil::outputOf;
using testutil::reference;
using testutil::scratchRoot;

TEST(ZeroThree, UnevenSharesMatchSingleProcessAndTheCheckpointResumesUnderOtherLayouts) {
  const int steps = 12, k = 6;
  auto ref = reference("z3_ref", steps, "");
  const std::string islands =
      "    - {name: east, count: 2}\n    - {name: west, count: 1}\n"
      "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  fs::path cut = scratchRoot() / "z3";
  std::string yaml = jobYaml(cut, islands, steps, "", "{kind: sync}", ", shares: [5, 2, 1], zero: 3");
  yaml.replace(yaml.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(testutil::runTrain(yaml, "z3", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(cut / "checkpoints" / checkpointDirName(k))) << outputOf("z3");
  std::ostringstream log;
  log << std::ifstream(cut / "logs" / "rank0.log").rdbuf();
  EXPECT_THAT(log.str(), HasSubstr("optimizer shard (ZeRO-3)"));
  expectCurve(cut, ref, 1, k, kTol, "ZeRO-3 before the cut");
  EXPECT_EQ(testutil::samplesByRank(cut), (std::map<int, int64_t>{{0, 5}, {1, 2}, {2, 1}}));
  // Assembled from three slices: every tensor whole, by name.
  auto ck = loadCheckpoint((cut / "checkpoints" / checkpointDirName(k)).string());
  ASSERT_TRUE(ck.isOk()) << ck.status().toString();
  auto full = model::buildModel(checkpointModel(*ck), 0);
  ASSERT_TRUE(full.isOk()) << full.status().toString();
  std::map<std::string, std::vector<int64_t>> want, got;
  for (auto& [n, t] : (*full)->namedParameters()) want[n] = t.sizes().vec();
  for (auto& [n, t] : ck->weights) got[n] = t.sizes().vec();
  EXPECT_EQ(got, want);
  // Resumed by one process and by four ZeRO-3 workers (shares 1/3/3/1),
  // both evaluating at the end: the same validation loss.
  std::map<std::string, double> val;
  for (const auto& [count, extra, name] : std::vector<std::tuple<int, std::string, std::string>>{
           {1, "", "z3_rs1"}, {4, ", shares: [1, 3, 3, 1], zero: 3", "z3_rs4"}}) {
    fs::path run = scratchRoot() / name;
    fs::create_directories(run);
    fs::copy(cut / "checkpoints", run / "checkpoints", fs::copy_options::recursive);
    std::string y = jobYaml(run, "    - {name: a, count: " + std::to_string(count) + "}", steps, "", "{kind: sync}", extra);
    y.replace(y.find("eval_every: 0"), 13, "eval_every: " + std::to_string(steps));
    ASSERT_EQ(testutil::runTrain(y, name, {"--resume"}), 0) << outputOf(name);
    expectCurve(run, ref, k + 1, steps, kTol, name);
    const auto evals = testutil::metricLines(run, "eval");
    ASSERT_FALSE(evals.empty()) << outputOf(name);
    val[name] = evals.back()["val_loss"].get<double>();
  }
  EXPECT_EQ(testutil::samplesByRank(scratchRoot() / "z3_rs4"), (std::map<int, int64_t>{{0, 1}, {1, 3}, {2, 3}, {3, 1}}));
  EXPECT_NEAR(val["z3_rs4"], val["z3_rs1"], kTol * ref[0]);
}

TEST(ZeroThree, RefusesWhatItCannotReduce) {
  auto msg = [](const std::string& train_extra) {
    const fs::path file = scratchRoot() / "z3_refuse.yaml";
    std::ofstream(file) << jobYaml(scratchRoot() / "z3_refuse", "    - {name: a, count: 2}", 2, "", "{kind: sync}",
                                   train_extra);
    auto job = core::loadJob(file.string());
    return job.isOk() ? std::string() : job.status().message();
  };
  EXPECT_THAT(msg(", zero: 3, reduce_dtype: bf16"), HasSubstr("train.reduce_dtype"));
  EXPECT_EQ(msg(", zero: 3"), "");
}

}  // namespace
}  // namespace archipelago::runtime
