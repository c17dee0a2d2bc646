// Where a worker takes its rank, world size and local rank from
// (runtime/launch_env.h): the first variable set, launchers in a fixed
// order (OpenMPI's before Slurm's), and malformed values refused by name.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "archipelago/runtime/launch_env.h"

namespace archipelago::runtime {
namespace {

const char* const kAll[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                            "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                            "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"};

// Every launcher variable unset around each test (and restored after).
class LaunchEnv : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* n : kAll) {
      if (const char* v = std::getenv(n)) saved_.emplace_back(n, v);
      ::unsetenv(n);
    }
  }
  void TearDown() override {
    for (const char* n : kAll) ::unsetenv(n);
    for (const auto& [n, v] : saved_) ::setenv(n.c_str(), v.c_str(), 1);
  }
  std::vector<std::pair<std::string, std::string>> saved_;
};

TEST_F(LaunchEnv, NothingSetIsMinusOneFromNowhere) {
  auto r = rankFromEnv();
  ASSERT_TRUE(r.isOk());
  EXPECT_EQ(r->value, -1);
  EXPECT_EQ(r->from, "");
}

TEST_F(LaunchEnv, SlurmAlone) {
  ::setenv("SLURM_PROCID", "3", 1);
  ::setenv("SLURM_NTASKS", "4", 1);
  ::setenv("SLURM_LOCALID", "1", 1);
  EXPECT_EQ(rankFromEnv()->value, 3);
  EXPECT_EQ(rankFromEnv()->from, "SLURM_PROCID");
  EXPECT_EQ(worldFromEnv()->value, 4);
  EXPECT_EQ(localRankFromEnv()->value, 1);
  EXPECT_EQ(localRankFromEnv()->from, "SLURM_LOCALID");
}

TEST_F(LaunchEnv, MpirunInsideASlurmBatchScriptTakesOpenMpisValues) {
  ::setenv("SLURM_PROCID", "0", 1);
  ::setenv("SLURM_NTASKS", "1", 1);
  ::setenv("SLURM_LOCALID", "0", 1);
  ::setenv("OMPI_COMM_WORLD_RANK", "2", 1);
  ::setenv("OMPI_COMM_WORLD_SIZE", "4", 1);
  ::setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2", 1);
  EXPECT_EQ(rankFromEnv()->value, 2);
  EXPECT_EQ(rankFromEnv()->from, "OMPI_COMM_WORLD_RANK");
  EXPECT_EQ(worldFromEnv()->value, 4);
  EXPECT_EQ(localRankFromEnv()->value, 2);
}

TEST_F(LaunchEnv, RankAndWorldSizeComeFirst) {
  ::setenv("OMPI_COMM_WORLD_RANK", "2", 1);
  ::setenv("RANK", "1", 1);
  ::setenv("WORLD_SIZE", "8", 1);
  ::setenv("PMI_SIZE", "4", 1);
  EXPECT_EQ(rankFromEnv()->from, "RANK");
  EXPECT_EQ(rankFromEnv()->value, 1);
  EXPECT_EQ(worldFromEnv()->value, 8);
}

TEST_F(LaunchEnv, AMalformedValueIsAnErrorNamingIt) {
  for (const char* bad : {"two", "", "-1", "3x"}) {
    ::setenv("RANK", bad, 1);
    ::setenv("SLURM_PROCID", "1", 1);
    auto r = rankFromEnv();
    ASSERT_FALSE(r.isOk()) << "RANK='" << bad << "'";
    EXPECT_NE(r.status().message().find("RANK='" + std::string(bad) + "'"), std::string::npos)
        << r.status().message();
  }
}

}  // namespace
}  // namespace archipelago::runtime
