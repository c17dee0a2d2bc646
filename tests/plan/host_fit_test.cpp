// Whether a job can run on a host (plan/host_fit.h), against bounds worked
// out by hand from the model's parameter count.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/plan/host_fit.h"
#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {
namespace {

using ::testing::HasSubstr;

core::JobConfig jobOf(int64_t dim, int workers) {
  core::JobConfig j;
  j.model.dim = dim;
  j.model.n_layers = 2;
  j.model.n_heads = 2;
  j.model.vocab_size = 259;
  core::IslandSpec a;
  a.name = "a";
  a.count = workers;
  j.cluster.islands.push_back(a);
  return j;
}

HostResources host(double gib) {
  HostResources h;
  h.memory_bytes = gib * 1024 * 1024 * 1024;
  h.memory_source = "test";
  return h;
}

TEST(HostFit, LowerBoundIsSixteenBytesPerReplicatedParameterPlusProcesses) {
  auto job = jobOf(64, 4);
  auto fit = checkFitsHost(job, 4, host(24));
  ASSERT_TRUE(fit.isOk()) << fit.status().toString();
  auto spec = fromModelConfig(job.model);
  ASSERT_TRUE(spec.isOk());
  const double p = spec->totalParams();
  EXPECT_DOUBLE_EQ(fit->parameters, p);
  EXPECT_DOUBLE_EQ(fit->memory_lower_bytes, 4 * 16 * p + 4 * kWorkerProcessBytes);
  // ZeRO-1 keeps one copy of the moments over the 4 replicas.
  job.train.shard_optimizer = true;
  EXPECT_DOUBLE_EQ(checkFitsHost(job, 4, host(24))->memory_lower_bytes, 4 * 8 * p + 8 * p + 4 * kWorkerProcessBytes);
  // Two pipeline stages: each worker holds half the model.
  job.train.shard_optimizer = false;
  job.strategy.pipeline_stages = 2;
  EXPECT_DOUBLE_EQ(checkFitsHost(job, 4, host(24))->memory_lower_bytes, 4 * 16 * (p / 2) + 4 * kWorkerProcessBytes);
}

TEST(HostFit, AModelThatCannotFitIsRefusedWithTheNumbers) {
  auto fit = checkFitsHost(jobOf(1000000, 1), 1, host(22));
  ASSERT_FALSE(fit.isOk());
  EXPECT_EQ(fit.status().code(), core::StatusCode::kResourceExhausted);
  EXPECT_THAT(fit.status().message(), HasSubstr("22.0 GiB are available (test)"));
  EXPECT_THAT(fit.status().message(), HasSubstr("model.dim"));
  // Too many processes for the memory, too.
  EXPECT_FALSE(checkFitsHost(jobOf(64, 400), 400, host(22)).isOk());
}

TEST(HostFit, ProcessAndOpenFileLimitsAreNamed) {
  HostResources h = host(1000);
  h.max_processes = 20;
  auto fit = checkFitsHost(jobOf(64, 4), 4, h);
  ASSERT_FALSE(fit.isOk());
  EXPECT_THAT(fit.status().message(), HasSubstr("ulimit -u"));
  h.max_processes = 0;
  h.max_open_files = 50;
  fit = checkFitsHost(jobOf(64, 100), 100, h);
  ASSERT_FALSE(fit.isOk());
  EXPECT_THAT(fit.status().message(), HasSubstr("ulimit -n"));
}

TEST(HostFit, ThisHostReportsMemory) {
  const HostResources h = thisHost();
  EXPECT_GT(h.memory_bytes, 0);
  EXPECT_FALSE(h.memory_source.empty());
}

}  // namespace
}  // namespace archipelago::plan
