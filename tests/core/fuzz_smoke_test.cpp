// The job YAML libFuzzer target (tests/fuzz/fuzz_job_yaml.cpp) driven by the
// deterministic mutation loop of tests/fuzz/mutator.h from its seed corpus,
// so every CI run exercises core::loadJob with GCC; plus the inputs the
// fuzzers found, as plain unit tests.
#include <gtest/gtest.h>

#include <chrono>

#define ARCHIPELAGO_FUZZ_SMOKE
#include "fuzz/fuzz_job_yaml.cpp"
#include "fuzz/mutator.h"
#include "archipelago/core/units.h"

namespace archipelago::fuzz {
namespace {

// Each input is a file write plus one or two YAML loads: a few thousand
// inputs fit in the time budget.
TEST(FuzzSmoke, JobYamlTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/job_yaml");
  ASSERT_GE(seeds.size(), 5u);
  const LoopResult r = runMutationLoop(seeds, fuzzJobYaml, {.seed = 31, .iterations = 9000, .random_inputs = 1000});
  EXPECT_GE(r.runs, 1000u);
}

// ---- inputs the fuzzers found ----------------------------------------------------
// Each is kept in the corpus as tests/fuzz/corpus/job_yaml/finding_*.yaml.

std::string findingPath(const std::string& name) { return std::string(ARCHIPELAGO_FUZZ_CORPUS_DIR "/job_yaml/") + name; }

core::Result<core::LoadedJob> loadFinding(const std::string& name) {
  core::LoadOptions o;
  o.use_process_env = false;
  return core::loadJob(findingPath(name), o);
}

void expectError(const std::string& name, const std::string& what) {
  auto job = loadFinding(name);
  ASSERT_FALSE(job.isOk()) << name;
  EXPECT_NE(job.status().message().find(what), std::string::npos) << job.status().toString();
}

// `? - name: slow ...` makes a list the key of a mapping; as<std::string>()
// threw YAML::TypedBadConversion out of loadJob.
TEST(FuzzFinding, JobKeyThatIsAListIsAnErrorNotAnException) {
  expectError("finding_complex_key.yaml", "cluster.?: a key that is a list");
}

// 0.9999999Gbit/s was dumped as "1e+03Mbit/s" (4 digits), which reads back
// as 1Gbit/s and dumps as "1Gbit/s": the resolved job of a run directory or
// checkpoint was not the job that ran.
TEST(FuzzFinding, ResolvedJobKeepsTheExactBandwidth) {
  auto job = loadFinding("finding_lossy_bandwidth.yaml");
  ASSERT_TRUE(job.isOk()) << job.status().toString();
  const std::string dumped = core::dumpJobYaml(job->job);
  const auto dir = jobFuzzDir();
  ASSERT_TRUE(core::writeFile(dir / "again.yaml", dumped).isOk());
  core::LoadOptions o;
  o.use_process_env = false;
  auto again = core::loadJob((dir / "again.yaml").string(), o);
  ASSERT_TRUE(again.isOk()) << again.status().toString();
  EXPECT_EQ(again->job.cluster.default_strait_bandwidth, 0.9999999e9 / 8);
  EXPECT_EQ(core::dumpJobYaml(again->job), dumped);
}

// Doubles were dumped with 6 digits: beta2 = 0.9999999 came back as 1,
// which validation refuses, so such a checkpoint could not resume.
TEST(FuzzFinding, ResolvedJobKeepsEveryDigitOfADouble) {
  auto job = loadFinding("finding_lossy_bandwidth.yaml");
  ASSERT_TRUE(job.isOk()) << job.status().toString();
  job->job.train.beta2 = 0.9999999;
  const auto dir = jobFuzzDir();
  ASSERT_TRUE(core::writeFile(dir / "again.yaml", core::dumpJobYaml(job->job)).isOk());
  core::LoadOptions o;
  o.use_process_env = false;
  auto again = core::loadJob((dir / "again.yaml").string(), o);
  ASSERT_TRUE(again.isOk()) << again.status().toString();
  EXPECT_EQ(again->job.train.beta2, 0.9999999);
}

// 9223372036854775807MiB: llround overflowed and the size became 2^63,
// which was dumped as a number that did not read back.
TEST(FuzzFinding, ByteSizePastTwoToTheSixtyThreeIsAnError) {
  expectError("finding_huge_byte_size.yaml", "strategy.bucket_bytes: got '9223372036854775807MiB'");
  EXPECT_FALSE(core::parseByteSize("16EiB").isOk());
  EXPECT_FALSE(core::parseByteSize("1e19B").isOk());
  EXPECT_EQ(*core::parseByteSize("4MiB"), 4u << 20);
}

// 1e308Gbit/s overflowed to an infinite bandwidth that passed validation.
TEST(FuzzFinding, BandwidthThatOverflowsToInfinityIsAnError) {
  expectError("finding_infinite_bandwidth.yaml", "cluster.default_strait_bandwidth: got '1e308Gbit/s'");
  EXPECT_FALSE(core::parseDuration("1e308h").isOk());
}

// `cluster: &c {x: *c}` reaches itself: the duplicate-key walk recursed
// until the stack overflowed (SIGSEGV).
TEST(FuzzFinding, AliasThatReachesItselfIsWalkedOnce) {
  expectError("finding_alias_cycle.yaml", "cluster.x: unknown key");
}

// Nine lines of aliases of aliases reach one list 10^9 times: the
// duplicate-key walk ran for minutes.
TEST(FuzzFinding, AliasesOfAliasesAreWalkedOnce) {
  const auto start = std::chrono::steady_clock::now();
  expectError("finding_alias_expansion.yaml", "a: unknown key");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

// expert_parallel x pipeline_stages = 2^32 x 2^32 wrapped to 0 and the
// divisibility check divided by it (SIGFPE).
TEST(FuzzFinding, ExpertTimesPipelineProductThatOverflowsIsAnError) {
  expectError("finding_sigfpe.yaml", "strategy.expert_parallel: got 4294967296");
}

}  // namespace
}  // namespace archipelago::fuzz
