// The plan-file libFuzzer target (tests/fuzz/fuzz_plan.cpp) driven by the
// deterministic mutation loop of tests/fuzz/mutator.h from its seed corpus,
// so every CI run exercises Plan::fromJson and the simulator with GCC; plus
// the inputs the fuzzers found, as plain unit tests.
#include <cstdint>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#define ARCHIPELAGO_FUZZ_SMOKE
#include "archipelago/core/files.h"
#include "fuzz/fuzz_plan.cpp"
#include "fuzz/mutator.h"

namespace archipelago::fuzz {
namespace {

TEST(FuzzSmoke, PlanTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/plan");
  ASSERT_GE(seeds.size(), 5u);
  const LoopResult r =
      runMutationLoop(seeds, fuzzPlan, {.seed = 41, .iterations = 20000, .random_inputs = 5000, .min_runs = 2000});
  EXPECT_GE(r.runs, 2000u);
}

// ---- inputs the fuzzers found --------------------------------------------------

nlohmann::json planSeed(const std::string& name) {
  auto text = core::readFile(std::string(ARCHIPELAGO_FUZZ_CORPUS_DIR "/plan/") + name);
  EXPECT_TRUE(text.isOk()) << text.status().toString();
  return nlohmann::json::parse(text.isOk() ? *text : std::string("{}"));
}

std::string errorOf(const nlohmann::json& j) {
  auto p = plan::Plan::fromJson(j.dump());
  return p.isOk() ? std::string("accepted") : p.status().message();
}

// The simulator reads Plan::links[dp_link] for every stage: -1 read before
// the vector.
TEST(FuzzFinding, PlanRefusesALinkNumberThatNamesNoLink) {
  EXPECT_NE(errorOf(planSeed("bad_link.json")).find("field 'groups[0].stages[0].dp_link' is -1"), std::string::npos)
      << errorOf(planSeed("bad_link.json"));
  auto j = planSeed("wan_job.json");
  j["sync_flows"][0]["link"] = 7;
  EXPECT_NE(errorOf(j).find("field 'sync_flows[0].link' is 7"), std::string::npos) << errorOf(j);
}

// micro_batches -1 made the simulator throw std::length_error out of
// simulateStep; 2^62 micro-batches of 4 virtual stages wrapped the
// operation count past its 50M guard and the simulator wrote out of bounds.
TEST(FuzzFinding, PlanRefusesNoMicroBatchesAndSimulatorRefusesAWrappingCount) {
  auto j = planSeed("spanning_pipeline.json");
  j["groups"][0]["micro_batches"] = -1;
  EXPECT_NE(errorOf(j).find("field 'groups[0].micro_batches' is -1"), std::string::npos) << errorOf(j);
  j["groups"][0]["micro_batches"] = int64_t{1} << 62;
  j["groups"][0]["virtual_stages"] = 4;
  auto p = plan::Plan::fromJson(j.dump());
  ASSERT_TRUE(p.isOk()) << p.status().toString();
  auto sim = plan::simulateStep(*p);
  ASSERT_FALSE(sim.isOk());
  EXPECT_EQ(sim.status().code(), core::StatusCode::kResourceExhausted) << sim.status().toString();
}

// nlohmann casts 1e300 to int with undefined behaviour and 2^32 + 1 to 1.
TEST(FuzzFinding, PlanRefusesIntegersThatDoNotFitTheirField) {
  auto j = planSeed("wan_job.json");
  j["groups"][0]["stages"][0]["island"] = 1e300;
  EXPECT_NE(errorOf(j).find("field 'groups[0].stages[0].island' is 1e+300"), std::string::npos) << errorOf(j);
  j = planSeed("wan_job.json");
  j["groups"][0]["zero"] = 4294967297ull;
  EXPECT_NE(errorOf(j).find("field 'groups[0].zero' is 4294967297"), std::string::npos) << errorOf(j);
}

// Found by libFuzzer (fuzz_plan, AddressSanitizer): 3 stages of 3 virtual
// stages each and 8 micro-batches. The interleaved order deals micro-batches
// in rounds of one per stage, so the remainder indexed past the simulator's
// per-device buffers (heap-buffer-overflow in simulateStep).
TEST(FuzzFinding, PlanRefusesInterleavedMicroBatchesThatAreNotAMultipleOfTheStages) {
  auto j = planSeed("finding_interleaved_remainder.json");
  EXPECT_NE(errorOf(j).find("field 'groups[0].micro_batches' is 8, expected a multiple of the group's 3 stages"),
            std::string::npos)
      << errorOf(j);
}

// An unknown schedule or recompute name silently became 1f1b / none.
TEST(FuzzFinding, PlanRefusesAnUnknownScheduleName) {
  auto j = planSeed("interleaved_fp8.json");
  j["groups"][0]["schedule"] = "interleave";
  EXPECT_NE(errorOf(j).find("field 'groups[0].schedule' is 'interleave', expected one of 1f1b|interleaved|dualpipe"),
            std::string::npos)
      << errorOf(j);
}

}  // namespace
}  // namespace archipelago::fuzz
