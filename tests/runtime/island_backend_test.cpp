// strategy.island_collectives: c10d (runtime/c10d_backend.h,
// runtime/parallel/c10d_tensor_parallel.h) through the real binary. Gloo
// sums the gradient buckets inside each island on the workers' own tensors,
// the path NCCL takes on a GPU island, and the comm layer carries the
// cross-island leg; tensor parallelism's and ZeRO's collectives go through
// Gloo too. Clipped every step, so a piece summed twice or missed leaves
// the single-process curve and global norms.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "runtime/layout_runs.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;
using testutil::jobYaml;
using testutil::scratchRoot;

const char* kTwoPairs = "    - {name: a, count: 2}\n    - {name: b, count: 2}\n"
                          "  straits: [{a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}]";

TEST(IslandCollectives, C10dInsideOneIslandFollowsTheSingleProcessRun) {
  const fs::path run = testutil::expectClippedRunMatches("icone", "    - {name: a, count: 2}", testutil::kSteps, "",
                                                         "{kind: sync, island_collectives: c10d}",
                                                         "c10d gloo, one island of 2");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("gradient buckets: c10d gloo inside islands of 2"));
}

TEST(IslandCollectives, C10dInsideTwoIslandsWithCommAcrossFollowsTheSingleProcessRun) {
  const fs::path run = testutil::expectClippedRunMatches("ictwo", kTwoPairs, testutil::kSteps, "",
                                                         "{kind: sync, island_collectives: c10d}",
                                                         "c10d gloo in islands a and b, comm across");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("c10d gloo inside islands of 2, comm across 2 islands"));
}

TEST(IslandCollectives, C10dSumsEachIslandsInnerStepsUnderDiloco) {
  // The identity DiLoCo (plain SGD, H = 1, outer lr 1, no momentum) is
  // synchronous SGD: c10d sums each island's inner gradients, comm the
  // outer step's pseudo-gradients.
  const int steps = 10;
  auto ref = testutil::sgdDilocoReference("icdl_ref", steps);
  const fs::path run = scratchRoot() / "icdl";
  ASSERT_EQ(testutil::runTrain(testutil::sgdDiloco(jobYaml(run, kTwoPairs, steps, "",
                                                           "{kind: diloco, inner_steps: 1, outer_lr: 1.0, "
                                                           "outer_momentum: 0.0, nesterov: false, "
                                                           "island_collectives: c10d}")),
                               "icdl"),
            0)
      << testutil::outputOf("icdl");
  testutil::expectCurve(run, ref, 1, steps, 2e-4, "c10d inside islands, DiLoCo H=1 across");
  const std::string log = testutil::rank0Log(run);
  EXPECT_THAT(log, HasSubstr("gradient buckets: c10d gloo inside islands of 2"));
  EXPECT_THAT(log, Not(HasSubstr("comm across")));
}

// Tensor parallelism's collectives through c10d (Gloo here, NCCL on a GPU
// island): the row-parallel partial sums, and with sequence parallelism the
// reduce-scatters and allgathers, on the single-process curve.
TEST(IslandCollectives, C10dCarriesTensorParallelismWithAndWithoutSequenceParallelism) {
  auto ref = testutil::reference("ictp_ref", testutil::kSteps, "");
  for (const auto& [name, strategy] : {std::pair{"ictp", "{tensor_parallel: 2, island_collectives: c10d}"},
                                       std::pair{"ictp_sp", "{tensor_parallel: 2, sequence_parallel: true, "
                                                            "island_collectives: c10d}"}}) {
    const fs::path run = scratchRoot() / name;
    ASSERT_EQ(testutil::runTrain(jobYaml(run, "    - {name: a, count: 2}", testutil::kSteps, "", strategy), name), 0)
        << testutil::outputOf(name);
    testutil::expectCurve(run, ref, 1, testutil::kSteps, testutil::kTol, name);
    EXPECT_THAT(testutil::rank0Log(run), HasSubstr("tensor-parallel collectives: c10d gloo in groups of 2")) << name;
  }
}

// ZeRO's collectives through c10d: ZeRO-2's bucket reduce-scatters and
// parameter allgathers inside one island of three, ZeRO-3's per-unit
// gathers and reduce-scatters over two islands of two (c10d inside, comm
// across). Uneven shares: blocks of uneven sizes per bucket and unit (Gloo
// has no reduce-scatter: the padded blocks are NCCL's path, the whole
// allreduce Gloo's).
TEST(IslandCollectives, C10dCarriesZeroInsideOneIslandAndOverTwo) {
  auto ref = testutil::reference("iczr_ref", testutil::kSteps, "");
  for (const auto& [name, zero, islands, describe] :
       {std::tuple{"icz2", 2, "    - {name: a, count: 3}", "c10d gloo inside islands of 3"},
        std::tuple{"icz3", 3, kTwoPairs, "c10d gloo inside islands of 2, comm across 2 islands"}}) {
    const fs::path run = scratchRoot() / name;
    const std::string shares = zero == 2 ? "[5, 2, 1]" : "[3, 3, 1, 1]";
    ASSERT_EQ(testutil::runTrain(jobYaml(run, islands, testutil::kSteps, "", "{kind: sync, island_collectives: c10d}",
                                         ", shares: " + shares + ", zero: " + std::to_string(zero)),
                                 name),
              0)
        << testutil::outputOf(name);
    testutil::expectCurve(run, ref, 1, testutil::kSteps, testutil::kTol, name);
    const std::string log = testutil::rank0Log(run);
    EXPECT_THAT(log, HasSubstr("optimizer shard (ZeRO-" + std::to_string(zero) + ")")) << name;
    EXPECT_THAT(log, HasSubstr("ZeRO-" + std::to_string(zero) + " collectives: " + describe)) << name;
  }
}

// Pipeline and tensor-parallel layouts: the buckets and ZeRO of their
// stage groups (the replicas holding the same tensors) through c10d, as
// the tensor-parallel collectives. PP=2 x 2 replicas with ZeRO-1 (buckets
// allreduced, parameters gathered), TP=2 x 2 replicas with ZeRO-3 and
// uneven shares, clipped every step.
TEST(IslandCollectives, C10dCarriesTheReplicasOfPipelineAndTensorParallelLayouts) {
  const int steps = 10;
  auto ref = testutil::clippedReference("icsg_ref", steps, "");
  for (const auto& [name, strategy, train] :
       {std::tuple{"icpp", "{pipeline_stages: 2, island_collectives: c10d}", ", zero: 1"},
        std::tuple{"ictpz", "{tensor_parallel: 2, island_collectives: c10d}", ", shares: [3, 3, 1, 1], zero: 3"}}) {
    const fs::path run = scratchRoot() / name;
    ASSERT_EQ(testutil::runTrain(testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, "", strategy, train)),
                                 name),
              0)
        << testutil::outputOf(name);
    testutil::expectCurve(run, ref, 1, steps, testutil::kTol, name);
    testutil::expectGradNorms(run, scratchRoot() / "icsg_ref", 1e-5, name);
    const std::string log = testutil::rank0Log(run);
    const char zero = std::string(train).back();
    EXPECT_THAT(log, HasSubstr(std::string("ZeRO-") + zero + " collectives: c10d gloo inside islands of 2")) << name;
    // ZeRO-3 has no buckets: its units carry the gradients.
    if (zero == '1') {
      EXPECT_THAT(log, HasSubstr("gradient buckets: c10d gloo inside islands of 2")) << name;
    }
  }
}

// Expert parallelism: the token all-to-all on c10d, the experts' gradients
// over the ranks holding the same experts and the dense ones over all four
// on c10d too. EP=2 x 2 groups (experts 3 + 1), ZeRO-2, uneven shares,
// clipped every step: a slice or a token row lost leaves the curve.
TEST(IslandCollectives, C10dCarriesExpertParallelism) {
  const int steps = 10;
  // Router-bias balancing, as the other expert-parallel tests: with the
  // default balance this layout leaves the single-process curve through
  // comm as well (its auxiliary loss is not the whole batch's).
  const std::string moe = ", moe: {num_experts: 4, top_k: 2, balance: router_bias, router_bias_rate: 0.01}";
  auto ref = testutil::clippedReference("icep_ref", steps, moe);
  const fs::path run = scratchRoot() / "icep";
  ASSERT_EQ(testutil::runTrain(testutil::clipped(jobYaml(run, "    - {name: a, count: 4}", steps, moe,
                                                         "{expert_parallel: 2, expert_counts: [3, 1], "
                                                         "island_collectives: c10d}",
                                                         ", shares: [3, 3, 1, 1], zero: 2")),
                               "icep"),
            0)
      << testutil::outputOf("icep");
  testutil::expectCurve(run, ref, 1, steps, testutil::kTol, "EP=2 x 2 groups through c10d");
  testutil::expectGradNorms(run, scratchRoot() / "icep_ref", 1e-5, "EP=2 x 2 groups through c10d");
  const std::string log = testutil::rank0Log(run);
  EXPECT_THAT(log, HasSubstr("expert all-to-all: c10d gloo in groups of 2"));
  EXPECT_THAT(log, HasSubstr("gradient buckets: c10d gloo inside islands of 4"));
  EXPECT_THAT(log, HasSubstr("expert gradients: c10d gloo inside islands of 2"));
  EXPECT_THAT(log, HasSubstr("ZeRO-2 collectives: c10d gloo inside islands of 2"));
}

// Per-island layouts: each island's own groups on c10d (island a: one
// TP=2 replica, its tensor-parallel collectives; island b: two PP=2
// pipelines, its stage groups' buckets), the bridge across islands on
// comm. Clipped every step.
TEST(IslandCollectives, C10dInsideEachIslandsOwnLayoutWithTheBridgeOnComm) {
  const int steps = 10;
  auto ref = testutil::clippedReference("icpi_ref", steps, "");
  const fs::path run = scratchRoot() / "icpi";
  ASSERT_EQ(testutil::runTrain(testutil::clipped(jobYaml(run,
                                                         "    - {name: a, count: 2, tensor_parallel: 2}\n"
                                                         "    - {name: b, count: 4, pipeline_stages: 2, stage_layers: [3, 1]}",
                                                         steps, "", "{kind: sync, island_collectives: c10d}")),
                               "icpi"),
            0)
      << testutil::outputOf("icpi");
  testutil::expectCurve(run, ref, 1, steps, testutil::kTol, "per-island layouts through c10d");
  testutil::expectGradNorms(run, scratchRoot() / "icpi_ref", 1e-5, "per-island layouts through c10d");
  EXPECT_THAT(testutil::rank0Log(run), HasSubstr("tensor-parallel collectives: c10d gloo in groups of 2"));
  std::ostringstream b_log;  // island b's first pipeline, first stage
  b_log << std::ifstream(run / "logs" / "rank2.log").rdbuf();
  EXPECT_THAT(b_log.str(), HasSubstr("gradient buckets: c10d gloo inside islands of 2"));
}

TEST(IslandCollectives, Bf16BucketsOnGlooAreRefusedNamingTheField) {
  const fs::path run = scratchRoot() / "icbf";
  std::string yaml = jobYaml(run, "    - {name: a, count: 2}", 2, "", "{kind: sync, island_collectives: c10d}",
                             ", reduce_dtype: bf16");
  EXPECT_NE(testutil::runTrain(yaml, "icbf"), 0);
  EXPECT_THAT(testutil::outputOf("icbf"), HasSubstr("train.reduce_dtype: bf16 cannot be summed by c10d's Gloo"));
}

}  // namespace
}  // namespace archipelago::runtime
