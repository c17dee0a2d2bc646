#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/core/config.h"

namespace archipelago::core {
namespace {

using ::testing::HasSubstr;

class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("arch_config_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    auto p = dir_ / name;
    std::ofstream(p) << text;
    return p.string();
  }
  Result<LoadedJob> load(const std::string& text, LoadOptions opts = {}) {
    opts.use_process_env = false;
    return loadJob(write("job.yaml", text), opts);
  }
  static std::string sourceOf(const LoadedJob& j, const std::string& path) {
    for (const auto& [p, vs] : j.values) {
      if (p == path) return vs.second.kind + ":" + vs.first;
    }
    return "missing";
  }

  std::filesystem::path dir_;
};

const char* kGood = R"(
cluster:
  islands:
    - {name: a, device: cpu, count: 2}
    - {name: b, device: cpu, count: 1, slowdown: 2}
  straits:
    - {a: a, b: b, bandwidth: 1Gbit/s, latency: 20ms}
train:
  steps: 10
  global_batch: 6
)";

TEST_F(ConfigTest, LoadsGoodJobWithUnits) {
  auto j = load(kGood);
  ASSERT_TRUE(j.isOk()) << j.status().toString();
  const auto& c = j->job.cluster;
  ASSERT_EQ(c.islands.size(), 2u);
  EXPECT_EQ(c.worldSize(), 3);
  EXPECT_DOUBLE_EQ(c.islands[1].slowdown, 2.0);
  ASSERT_EQ(c.straits.size(), 1u);
  EXPECT_DOUBLE_EQ(c.straits[0].bandwidth, 1e9 / 8);
  EXPECT_DOUBLE_EQ(c.straits[0].latency, 0.020);
  EXPECT_EQ(j->job.train.steps, 10);
  EXPECT_EQ(sourceOf(*j, "train.steps").substr(0, 5), "file:");
  EXPECT_EQ(sourceOf(*j, "train.lr").substr(0, 8), "default:");
}

TEST_F(ConfigTest, UnknownKeyNamesPathAndAlternatives) {
  auto j = load(std::string(kGood) + "  stepz: 3\n");
  ASSERT_FALSE(j.isOk());
  EXPECT_EQ(j.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(j.status().message(), HasSubstr("train.stepz: unknown key"));
  EXPECT_THAT(j.status().message(), HasSubstr("steps"));
  EXPECT_THAT(j.status().message(), HasSubstr("job.yaml:"));
}

TEST_F(ConfigTest, UnknownTopLevelSection) {
  auto j = load(std::string(kGood) + "trian: {steps: 1}\n");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("trian: unknown key"));
}

TEST_F(ConfigTest, WrongTypeNamesFieldValueAndExpectation) {
  auto j = load(R"(
cluster:
  islands: [{name: a, count: two}]
)");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("cluster.islands[0].count: got 'two'"));
  EXPECT_THAT(j.status().message(), HasSubstr("expected an integer"));
}

TEST_F(ConfigTest, NegativeBandwidthRejected) {
  auto j = load(R"(
cluster:
  islands: [{name: a}, {name: b}]
  straits: [{a: a, b: b, bandwidth: -5Mbit/s}]
)");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("cluster.straits[0].bandwidth: got a negative bandwidth"));
}

TEST_F(ConfigTest, BandwidthWithoutUnitRejected) {
  auto j = load(R"(
cluster:
  islands: [{name: a}, {name: b}]
  straits: [{a: a, b: b, bandwidth: 100}]
)");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("cluster.straits[0].bandwidth: got '100'"));
  EXPECT_THAT(j.status().message(), HasSubstr("Gbit/s"));
}

TEST_F(ConfigTest, StraitNamingMissingIsland) {
  auto j = load(R"(
cluster:
  islands: [{name: east}, {name: west}]
  straits: [{a: east, b: north, bandwidth: 1Gbit/s}]
)");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("cluster.straits[0].b: got 'north'"));
  EXPECT_THAT(j.status().message(), HasSubstr("east, west"));
}

TEST_F(ConfigTest, BatchThatCannotBeSplit) {
  auto j = load(R"(
cluster:
  islands: [{name: a, count: 3}, {name: b, count: 2}]
train: {global_batch: 4}
)");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("train.global_batch: got 4"));
  EXPECT_THAT(j.status().message(), HasSubstr("at least 5"));
}

TEST_F(ConfigTest, BadChoiceListsChoices) {
  auto j = load(std::string(kGood) + "strategy: {kind: dilocco}\n");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("strategy.kind: got 'dilocco'"));
  EXPECT_THAT(j.status().message(), HasSubstr("sync|diloco|streaming"));
}

TEST_F(ConfigTest, C10dIslandCollectivesOnlyWhereTheyCanCarryEveryCollective) {
  // kGood's islands have 2 and 1 workers: the cross-island leg pairs positions.
  auto uneven = load(std::string(kGood) + "strategy: {island_collectives: c10d}\n");
  ASSERT_FALSE(uneven.isOk());
  EXPECT_THAT(uneven.status().message(), HasSubstr("strategy.island_collectives: got c10d;"));
  EXPECT_THAT(uneven.status().message(), HasSubstr("different worker counts"));
  // Under DiLoCo the inner group is one island: any counts will do.
  EXPECT_TRUE(load(std::string(kGood) + "strategy: {kind: diloco, island_collectives: c10d}\n").isOk());
  const std::string two = "cluster:\n  islands: [{name: a, count: 2}, {name: b, count: 2}]\n";
  const std::string even = two + "train: {global_batch: 8}\n";
  EXPECT_TRUE(load(even + "strategy: {island_collectives: c10d}\n").isOk());
  // ZeRO's collectives and pipeline and tensor-parallel layouts through c10d too.
  EXPECT_TRUE(load("cluster:\n  islands: [{name: a, count: 2}]\ntrain: {zero: 3}\n"
                   "strategy: {island_collectives: c10d}\n").isOk());
  EXPECT_TRUE(load(two + "train: {global_batch: 8, zero: 2}\nstrategy: {island_collectives: c10d}\n").isOk());
  EXPECT_TRUE(load("cluster:\n  islands: [{name: a, count: 4}]\ntrain: {zero: 3}\n"
                   "strategy: {island_collectives: c10d, tensor_parallel: 2}\n").isOk());
  EXPECT_TRUE(load("cluster:\n  islands: [{name: a, count: 2}]\n"
                   "strategy: {island_collectives: c10d, pipeline_stages: 2}\n").isOk());
  const std::string moe = "cluster:\n  islands: [{name: a, count: 2}]\nmodel: {moe: {num_experts: 4, top_k: 2}}\n";
  EXPECT_TRUE(load(moe + "strategy: {island_collectives: c10d, expert_parallel: 2}\n").isOk());
  auto ep = load(moe + "strategy: {island_collectives: c10d, expert_parallel: 2, dispatch_codec: bf16}\n");
  ASSERT_FALSE(ep.isOk());
  EXPECT_THAT(ep.status().message(), HasSubstr("strategy.dispatch_codec: got bf16;"));
  // Per-island layouts: each island's groups lie inside it, whatever the counts.
  EXPECT_TRUE(load("cluster:\n  islands: [{name: a, count: 2, tensor_parallel: 2}, {name: b, count: 1}]\n"
                   "train: {global_batch: 8}\nstrategy: {island_collectives: c10d}\n").isOk());
  auto bad = load(std::string(kGood) + "strategy: {island_collectives: nccl}\n");
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("comm|c10d"));
}

TEST_F(ConfigTest, ReportsAllProblemsAtOnce) {
  auto j = load(R"(
cluster:
  islands: [{name: a, count: 0}]
train: {steps: 0, lr: -1}
)");
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("cluster.islands[0].count"));
  EXPECT_THAT(j.status().message(), HasSubstr("train.steps"));
  EXPECT_THAT(j.status().message(), HasSubstr("train.lr"));
}

TEST_F(ConfigTest, EnvThenFlagOverrideWithSources) {
  LoadOptions opts;
  opts.env["ARCHIPELAGO_TRAIN_LR"] = "0.5";
  opts.env["ARCHIPELAGO_TRAIN_STEPS"] = "7";
  opts.sets = {"train.steps=9", "cluster.islands[1].slowdown=3"};
  auto j = load(kGood, opts);
  ASSERT_TRUE(j.isOk()) << j.status().toString();
  EXPECT_DOUBLE_EQ(j->job.train.lr, 0.5);
  EXPECT_EQ(j->job.train.steps, 9);  // flag beats env beats file
  EXPECT_DOUBLE_EQ(j->job.cluster.islands[1].slowdown, 3.0);
  EXPECT_EQ(sourceOf(*j, "train.lr"), "env:0.5");
  EXPECT_EQ(sourceOf(*j, "train.steps"), "flag:9");
  EXPECT_EQ(sourceOf(*j, "cluster.islands[1].slowdown"), "flag:3");
}

TEST_F(ConfigTest, BadOverridesAreErrors) {
  LoadOptions opts;
  opts.sets = {"train.nosuch=1"};
  auto j = load(kGood, opts);
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("--set train.nosuch=1: no such field"));
  opts.sets = {};
  opts.env["ARCHIPELAGO_TRAIN_STEPS"] = "many";
  j = load(kGood, opts);
  ASSERT_FALSE(j.isOk());
  EXPECT_THAT(j.status().message(), HasSubstr("train.steps: got 'many' (env ARCHIPELAGO_TRAIN_STEPS)"));
}

TEST_F(ConfigTest, ClusterFromItsOwnFile) {
  write("c.yaml", R"(
name: two
islands: [{name: x, count: 2}, {name: y, count: 2}]
straits: [{a: x, b: y, bandwidth: 100Mbit/s, latency: 50ms}]
)");
  auto j = load("cluster: c.yaml\ntrain: {global_batch: 8}\n");
  ASSERT_TRUE(j.isOk()) << j.status().toString();
  EXPECT_EQ(j->job.cluster.name, "two");
  EXPECT_EQ(j->job.cluster.worldSize(), 4);
  EXPECT_DOUBLE_EQ(j->job.cluster.straits[0].bandwidth, 100e6 / 8);
  auto c = loadClusterSpec((dir_ / "c.yaml").string());
  ASSERT_TRUE(c.isOk()) << c.status().toString();
  EXPECT_EQ(c->islands.size(), 2u);

  auto missing = load("cluster: nope.yaml\n");
  ASSERT_FALSE(missing.isOk());
  EXPECT_THAT(missing.status().message(), HasSubstr("nope.yaml"));
}

TEST_F(ConfigTest, MissingFileAndBadYaml) {
  auto j = loadJob((dir_ / "absent.yaml").string());
  ASSERT_FALSE(j.isOk());
  EXPECT_EQ(j.status().code(), StatusCode::kNotFound);
  auto bad = load("train: [unclosed\n");
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("not valid YAML"));
}

// kGood's train section is on line 8, its steps on line 9.
TEST_F(ConfigTest, RepeatedKeysAndSectionsAreRefusedNamingBothLines) {
  auto steps = load(std::string(kGood) + "  steps: 20\n");
  ASSERT_FALSE(steps.isOk()) << "a repeated steps: must not be ignored";
  EXPECT_THAT(steps.status().message(), HasSubstr("job.yaml:11: key 'steps' repeats the one on line 9"));
  auto section = load(std::string(kGood) + "train:\n  steps: 99\n");
  ASSERT_FALSE(section.isOk());
  EXPECT_THAT(section.status().message(), HasSubstr("key 'train' repeats the one on line 8"));
  // Inside a list item too.
  auto island = load("cluster:\n  islands:\n    - {name: a, count: 1, count: 2}\n");
  ASSERT_FALSE(island.isOk());
  EXPECT_THAT(island.status().message(), HasSubstr("key 'count' repeats"));
  // A directory as the job file is named as such.
  std::filesystem::create_directories(dir_ / "jobs");
  auto d = loadJob((dir_ / "jobs").string());
  ASSERT_FALSE(d.isOk());
  EXPECT_THAT(d.status().message(), HasSubstr("is a directory"));
}

// A strait is shaped in userspace only when asked, or when every island
// runs on one host (then it cannot be a real link).
TEST_F(ConfigTest, StraitsAreEmulatedOnlyOnOneHostOrWhenAsked) {
  auto one = load(kGood);
  ASSERT_TRUE(one.isOk());
  EXPECT_TRUE(one->job.cluster.oneHost());
  EXPECT_TRUE(one->job.cluster.emulated(one->job.cluster.straits[0]));
  const std::string two_hosts = R"(
cluster:
  islands:
    - {name: a, count: 1, host: 10.77.0.2}
    - {name: b, count: 1, host: 10.77.0.3, listen: veth1}
  straits:
    - {a: a, b: b, bandwidth: 1Gbit/s}
)";
  auto real = load(two_hosts);
  ASSERT_TRUE(real.isOk()) << real.status().toString();
  EXPECT_FALSE(real->job.cluster.oneHost());
  EXPECT_FALSE(real->job.cluster.emulated(real->job.cluster.straits[0]));
  EXPECT_EQ(real->job.cluster.islands[1].listen, "veth1");
  auto asked = load(two_hosts.substr(0, two_hosts.size() - 2) + ", emulate: true}\n");
  ASSERT_TRUE(asked.isOk()) << asked.status().toString();
  EXPECT_TRUE(asked->job.cluster.emulated(asked->job.cluster.straits[0]));
  auto bad = load(two_hosts.substr(0, two_hosts.size() - 2) + ", emulate: maybe}\n");
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("emulate"));
}

// The frame checksum is a per-link setting: on islands (links between
// their workers) and straits; "auto" unless the job says otherwise, and a
// bad value names the field and the values it takes.
TEST_F(ConfigTest, ChecksumIsSetPerIslandAndStraitWithAClearError) {
  const std::string job = R"(
cluster:
  islands:
    - {name: a, count: 1, host: 10.77.0.2, checksum: off}
    - {name: b, count: 1, host: 10.77.0.3}
  straits:
    - {a: a, b: b, bandwidth: 1Gbit/s, checksum: on}
)";
  auto ok = load(job);
  ASSERT_TRUE(ok.isOk()) << ok.status().toString();
  EXPECT_EQ(ok->job.cluster.islands[0].checksum, "off");
  EXPECT_EQ(ok->job.cluster.islands[1].checksum, "auto");
  EXPECT_EQ(ok->job.cluster.straits[0].checksum, "on");
  std::string bad_text = job;
  bad_text.replace(bad_text.find("checksum: on"), 12, "checksum: sometimes");
  auto bad = load(bad_text);
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("checksum"));
  EXPECT_THAT(bad.status().message(), HasSubstr("sometimes"));
  EXPECT_THAT(bad.status().message(), HasSubstr("auto"));
  // Written back and read again, the settings survive.
  auto again = loadJob(write("checksum.yaml", dumpJobYaml(ok->job)));
  ASSERT_TRUE(again.isOk()) << again.status().toString();
  EXPECT_EQ(again->job.cluster.islands[0].checksum, "off");
  EXPECT_EQ(again->job.cluster.straits[0].checksum, "on");
}

TEST_F(ConfigTest, DumpYamlRoundTrips) {
  auto j = load(kGood);
  ASSERT_TRUE(j.isOk());
  std::string yaml = dumpJobYaml(j->job);
  auto again = loadJob(write("again.yaml", yaml));
  ASSERT_TRUE(again.isOk()) << again.status().toString() << "\n" << yaml;
  EXPECT_EQ(dumpJobYaml(again->job), yaml);
  EXPECT_DOUBLE_EQ(again->job.cluster.straits[0].bandwidth, 1e9 / 8);
}

TEST(EnvVarName, FromPath) {
  EXPECT_EQ(envVarForPath("train.lr"), "ARCHIPELAGO_TRAIN_LR");
  EXPECT_EQ(envVarForPath("model.moe.top_k"), "ARCHIPELAGO_MODEL_MOE_TOP_K");
}

}  // namespace
}  // namespace archipelago::core
