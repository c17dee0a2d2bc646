// From plan to run through the real binary: `archipelago train JOB --plan
// PLAN.json` runs the layout the plan holds (here two pipeline stages with
// layers [3, 1] and ZeRO-1, as `archipelago plan --layout` wrote it) and
// follows the single-process curve; a plan for another cluster is refused
// before anything starts. The overrides themselves, and what is said when
// the runtime applies a plan differently, are checked in
// tests/plan/plan_to_job_test.cpp.
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testutil::expectCurve;
using testutil::jobYaml;
using testutil::kTol;
using testutil::outputOf;
using testutil::reference;
using testutil::scratchRoot;

// `archipelago plan JOB JOB --layout LAYOUT --out FILE` (the job as cluster and model); its exit code.
int planOf(const fs::path& job, const std::string& layout, const fs::path& file) {
  const std::string cmd = std::string(ARCHIPELAGO_BINARY) + " plan " + job.string() + " " + job.string() + " --layout " +
                          layout + " --seq-len 32 --global-batch-tokens 256 --out " + file.string() + " > " +
                          (scratchRoot() / "plan.out").string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

TEST(PlanRun, TrainRunsThePlansLayoutAndRefusesAPlanForAnotherCluster) {
  const int steps = 12;
  auto ref = reference("plan_ref", steps, "");
  const fs::path run = scratchRoot() / "plan_run", file = scratchRoot() / "plan.json";
  const std::string yaml = jobYaml(run, "    - {name: a, count: 2}", steps, "", "{kind: sync}");
  std::ofstream(scratchRoot() / "plan_job.yaml") << yaml;
  // Two stages: the embedding and layers 1-3, then layer 4 and the head; ZeRO-1 as the planner prices it.
  ASSERT_EQ(planOf(scratchRoot() / "plan_job.yaml", "pp=2,mb=2,stages=4+2", file), 0)
      << testutil::fileText(scratchRoot() / "plan.out");
  ASSERT_EQ(testutil::runTrain(yaml, "plan_run", {"--plan", file.string()}), 0) << outputOf("plan_run");
  EXPECT_THAT(outputOf("plan_run"), HasSubstr("--set strategy.pipeline_stages=2"));
  EXPECT_THAT(outputOf("plan_run"), HasSubstr("--set train.zero=1"));
  const auto par = testutil::metricLines(run, "parallel");
  ASSERT_FALSE(par.empty()) << outputOf("plan_run");
  EXPECT_EQ(par.back()["pipeline_stages"].get<int>(), 2);
  EXPECT_EQ(par.back()["stage_layers"].get<std::vector<int64_t>>(), (std::vector<int64_t>{3, 1}));
  expectCurve(run, ref, 1, steps, kTol, "--plan with two stages");

  // A plan for another cluster is refused before anything starts.
  EXPECT_NE(testutil::runTrain(jobYaml(scratchRoot() / "plan_bad", "    - {name: a, count: 3}", steps, "",
                                       "{kind: sync}"),
                               "plan_bad", {"--plan", file.string()}),
            0);
  EXPECT_THAT(outputOf("plan_bad"), HasSubstr("cluster.islands[*].count"));
}

}  // namespace
}  // namespace archipelago::runtime
