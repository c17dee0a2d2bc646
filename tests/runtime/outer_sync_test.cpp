// DiLoCo / streaming DiLoCo tests. References: the fragment schedule is
// checked by counting (every parameter once, every fragment once per H
// steps); DiLoCo with H = 1 and the identity outer optimizer (lr 1, no
// momentum) over an SGD inner optimizer must reproduce plain synchronous
// training, whose reference is one process training on the whole batch;
// bit-identical replicas are checked by comparing the digests that
// different processes wrote; multi-process runs go through the real binary.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "archipelago/core/config.h"
#include "archipelago/data/prepare.h"
#include "archipelago/runtime/outer_sync.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;

// ---- schedule (no processes) -------------------------------------------------------

void expectExactCoverPerRound(int64_t numel, int64_t F, int64_t H, std::vector<int64_t> boundaries = {}) {
  SCOPED_TRACE(testing::Message() << "numel " << numel << " fragments " << F << " H " << H);
  auto frags = fragmentSchedule(numel, F, H, boundaries);
  ASSERT_TRUE(frags.isOk()) << frags.status().toString();
  ASSERT_EQ(frags->size(), static_cast<size_t>(F));
  // Every H consecutive steps (any window, including ones that start mid-round)
  // sync every parameter exactly once.
  for (int64_t start = 1; start <= 3 * H; ++start) {
    std::vector<int> hits(static_cast<size_t>(numel), 0);
    std::vector<int> frag_hits(static_cast<size_t>(F), 0);
    for (int64_t s = start; s < start + H; ++s) {
      for (int f : fragmentsDue(*frags, s, H)) {
        ++frag_hits[static_cast<size_t>(f)];
        for (int64_t i = (*frags)[static_cast<size_t>(f)].begin; i < (*frags)[static_cast<size_t>(f)].end; ++i) {
          ++hits[static_cast<size_t>(i)];
        }
      }
    }
    for (int64_t i = 0; i < numel; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)], 1) << "parameter " << i << " window " << start;
    for (int64_t f = 0; f < F; ++f) ASSERT_EQ(frag_hits[static_cast<size_t>(f)], 1) << "fragment " << f;
  }
  // Contiguous, non-empty, in order, offsets in [0, H).
  int64_t next = 0;
  for (const auto& fr : *frags) {
    EXPECT_EQ(fr.begin, next);
    EXPECT_GT(fr.end, fr.begin);
    EXPECT_GE(fr.offset, 0);
    EXPECT_LT(fr.offset, H);
    next = fr.end;
  }
  EXPECT_EQ(next, numel);
}

TEST(FragmentSchedule, CoversEveryParameterOncePerRound) {
  expectExactCoverPerRound(1000, 1, 5);   // DiLoCo
  expectExactCoverPerRound(1000, 4, 8);
  expectExactCoverPerRound(1001, 3, 7);   // uneven everything
  expectExactCoverPerRound(10, 10, 3);    // more fragments than steps: several per step
  expectExactCoverPerRound(17, 5, 1);     // H = 1: every fragment every step
  expectExactCoverPerRound(1000, 4, 8, {0, 10, 240, 260, 499, 510, 760, 990});
}

TEST(FragmentSchedule, CutsAtTensorBoundariesAndStaggersOffsets) {
  auto frags = fragmentSchedule(1000, 4, 8, std::vector<int64_t>{0, 100, 240, 520, 700, 760});
  ASSERT_TRUE(frags.isOk());
  // Ideal cuts 250/500/750 move to the nearest tensor starts 240/520/760.
  EXPECT_EQ((*frags)[0].end, 240);
  EXPECT_EQ((*frags)[1].end, 520);
  EXPECT_EQ((*frags)[2].end, 760);
  EXPECT_EQ((*frags)[0].offset, 0);
  EXPECT_EQ((*frags)[1].offset, 2);
  EXPECT_EQ((*frags)[2].offset, 4);
  EXPECT_EQ((*frags)[3].offset, 6);
  // DiLoCo: one fragment synced after steps H, 2H, ...
  auto one = fragmentSchedule(50, 1, 4);
  ASSERT_TRUE(one.isOk());
  std::vector<int64_t> steps;
  for (int64_t s = 1; s <= 12; ++s) {
    if (!fragmentsDue(*one, s, 4).empty()) steps.push_back(s);
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{4, 8, 12}));
}

TEST(FragmentSchedule, RejectsBadSettings) {
  auto a = fragmentSchedule(10, 11, 4);
  ASSERT_FALSE(a.isOk());
  EXPECT_NE(a.status().message().find("strategy.fragments"), std::string::npos);
  auto b = fragmentSchedule(10, 2, 0);
  ASSERT_FALSE(b.isOk());
  EXPECT_NE(b.status().message().find("strategy.inner_steps"), std::string::npos);
}

TEST(ReplicaCheck, MismatchIsDataLossNamingRanks) {
  EXPECT_TRUE(compareReplicaDigests({"aa", "aa", "aa"}, "x").isOk());
  auto st = compareReplicaDigests({"aaaa", "bbbb", "aaaa"}, "the outer step of fragment 0");
  ASSERT_FALSE(st.isOk());
  EXPECT_EQ(st.code(), core::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("ranks [0,2]"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("ranks [1]"), std::string::npos) << st.message();
}

// ---- training runs -----------------------------------------------------------------

using testutil::scratchRoot;
using testutil::tinyDataDir;

std::string dilocoJob(const std::string& name, const std::string& islands, int steps, const std::string& train_extra,
                    const std::string& strategy) {
  // The defaults, each unless train_extra sets it (a repeated key is refused).
  std::string defaults;
  for (const char* kv : {" lr: 0.003,", " warmup_steps: 3,"}) {
    const std::string key = std::string(kv).substr(0, std::string(kv).find(':') + 1);
    if (train_extra.find(key) == std::string::npos) defaults += kv;
  }
  std::ostringstream o;
  o << "cluster:\n  islands:\n" << islands << "\n"
    << "model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}\n"
    << "data: {dir: " << tinyDataDir().string() << ", seq_len: 32}\n"
    << "train: {steps: " << steps << ", global_batch: 12," << defaults << " eval_every: 0, "
    << "rebalance: false" << train_extra << "}\n"
    << "strategy: " << strategy << "\n"
    << "checkpoint: {every: 0, keep_last: 2}\n"
    << "run_dir: " << (scratchRoot() / name).string() << "\n";
  return o.str();
}

core::JobConfig loadYaml(const std::string& yaml, const std::string& name) { return testutil::loadJobText(yaml, name); }

core::Result<TrainSummary> trainInProcess(const std::string& yaml, const std::string& name) {
  auto job = loadYaml(yaml, name);
  TrainerOptions o;
  o.job = job;
  o.run_dir = job.run_dir;
  o.write_metrics = false;
  fs::create_directories(o.run_dir);
  return runTrainer(o);
}

int runBinary(const std::string& yaml, const std::string& name) { return testutil::runTrain(yaml, name); }
using testutil::outputOf;
std::vector<nlohmann::json> runMetrics(const std::string& name, const std::string& kind) {
  return testutil::metricLines(scratchRoot() / name, kind);
}
std::map<int64_t, double> stepLosses(const std::string& name) { return testutil::rank0Losses(scratchRoot() / name); }

// Two islands, uneven: east has two workers, west one (so islands carry
// different token counts and the cross-island shard count K is 1).
const char* kEastWest =
    "    - {name: east, count: 2}\n    - {name: west, count: 1}\n"
    "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";

const char* kSgd = ", optimizer: sgd, lr: 0.5, grad_clip: 0, warmup_steps: 0";
const char* kIdentityDiloco = "{kind: diloco, inner_steps: 1, outer_lr: 1.0, outer_momentum: 0.0, nesterov: false}";

TEST(DiLoCo, IdentityOuterStepEqualsSyncSingleProcess) {
  const int steps = 12;
  auto ref = trainInProcess(dilocoJob("sp_sync", "    - {name: a, count: 1}", steps, kSgd, "{kind: sync}"), "sp_sync");
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  auto got = trainInProcess(dilocoJob("sp_diloco", "    - {name: a, count: 1}", steps, kSgd, kIdentityDiloco), "sp_diloco");
  ASSERT_TRUE(got.isOk()) << got.status().toString();
  ASSERT_EQ(got->losses.size(), ref->losses.size());
  for (size_t i = 0; i < ref->losses.size(); ++i) {
    EXPECT_NEAR(got->losses[i], ref->losses[i], 1e-4 * std::max(1.0, ref->losses[0])) << "step " << i + 1;
  }
}

TEST(DiLoCo, IdentityOuterStepOnTwoIslandsEqualsSync) {
  const int steps = 10;
  // Reference: one process, whole batch, plain SGD.
  auto ref = trainInProcess(dilocoJob("ref_sync", "    - {name: a, count: 1}", steps, kSgd, "{kind: sync}"), "ref_sync");
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  ASSERT_EQ(runBinary(dilocoJob("id2", kEastWest, steps, kSgd, kIdentityDiloco), "id2"), 0) << outputOf("id2");
  auto losses = stepLosses("id2");
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps)) << outputOf("id2");
  for (int s = 1; s <= steps; ++s) {
    EXPECT_NEAR(losses[s], ref->losses[static_cast<size_t>(s - 1)], 2e-4 * std::max(1.0, ref->losses[0])) << "step " << s;
  }
  EXPECT_EQ(runMetrics("id2", "outer").size(), static_cast<size_t>(3 * steps));
}

// Every outer step: the three ranks' digests of (anchor, momentum) agree,
// every rank took every outer step, and the run ended without a DataLoss.
void expectIdenticalReplicas(const std::string& name, size_t expected_outer_per_rank) {
  auto outer = runMetrics(name, "outer");
  std::map<std::pair<int64_t, int>, std::map<int, std::string>> digests;  // (sent_step, fragment) -> rank -> digest
  for (const auto& j : outer) {
    digests[{j["sent_step"].get<int64_t>(), j["fragment"].get<int>()}][j["rank"].get<int>()] = j["digest"].get<std::string>();
  }
  EXPECT_EQ(outer.size(), 3 * expected_outer_per_rank) << outputOf(name);
  for (const auto& [key, by_rank] : digests) {
    ASSERT_EQ(by_rank.size(), 3u) << "sent_step " << key.first << " fragment " << key.second;
    EXPECT_EQ(by_rank.at(0), by_rank.at(1)) << "sent_step " << key.first;
    EXPECT_EQ(by_rank.at(0), by_rank.at(2)) << "sent_step " << key.first;
    EXPECT_EQ(by_rank.at(0).size(), 16u);
  }
}

class DiLoCoCodec : public ::testing::TestWithParam<std::string> {};

TEST_P(DiLoCoCodec, ReplicasBitIdenticalAfterEveryOuterStep) {
  const std::string codec = GetParam();
  const std::string name = "codec_" + codec;
  const std::string strategy = "{kind: diloco, inner_steps: 3, outer_lr: 0.7, outer_momentum: 0.9, codec: " + codec +
                               ", error_feedback: true}";
  ASSERT_EQ(runBinary(dilocoJob(name, kEastWest, 9, "", strategy), name), 0) << outputOf(name);
  expectIdenticalReplicas(name, 3);
  // The compressed payload is what crosses the strait (fp32 is 4 bytes per
  // parameter). Islands list members in descending rank order, so east's
  // shard holder is rank 1 and rank 0 only receives (K = 1).
  auto outer = runMetrics(name, "outer");
  ASSERT_FALSE(outer.empty());
  // Bytes per parameter of the codec's payload (fp32 4, 16-bit 2, 8-bit 1, int4 0.5; + block scales).
  const double expected = codec == "none" ? 4 : codec == "bf16" || codec == "fp16" ? 2 : codec == "int4" ? 0.5 : 1;
  for (const auto& j : outer) {
    const int rank = j["rank"].get<int>();
    const double per_param = j["bytes_strait"].get<double>() / j["params"].get<double>();
    if (rank == 0) {
      EXPECT_EQ(j["bytes_strait"].get<uint64_t>(), 0u);
    } else {
      EXPECT_NEAR(per_param, expected, 0.1 * expected) << "rank " << rank;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Codecs, DiLoCoCodec,
                         ::testing::Values("none", "bf16", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"));

TEST(DiLoCo, LossFallsOnTinyCorpus) {
  const std::string strategy = "{kind: diloco, inner_steps: 5, outer_lr: 0.7, outer_momentum: 0.9, codec: int8}";
  ASSERT_EQ(runBinary(dilocoJob("falls", kEastWest, 30, ", lr: 0.01", strategy), "falls"), 0) << outputOf("falls");
  auto losses = stepLosses("falls");
  ASSERT_EQ(losses.size(), 30u);
  EXPECT_LT(losses[30], 0.75 * losses[1]) << "first " << losses[1] << " last " << losses[30];
}

TEST(Streaming, FragmentsSyncOnScheduleReplicasAgreeAndLossFalls) {
  const int steps = 24, H = 6, F = 3;
  const std::string strategy = "{kind: streaming, inner_steps: 6, fragments: 3, overlap_steps: 2, outer_lr: 0.7, "
                               "outer_momentum: 0.9, codec: int8}";
  ASSERT_EQ(runBinary(dilocoJob("stream", kEastWest, steps, ", lr: 0.01", strategy), "stream"), 0) << outputOf("stream");
  // Offsets 0, 2, 4: fragment 0 syncs after 6, 12, 18, 24; 1 after 2, 8, 14, 20; 2 after 4, 10, 16, 22;
  // then the final sync at step 24 for fragments 1 and 2.
  auto outer = runMetrics("stream", "outer");
  std::map<int, std::set<int64_t>> sent;
  for (const auto& j : outer) {
    if (j["rank"].get<int>() == 0) sent[j["fragment"].get<int>()].insert(j["sent_step"].get<int64_t>());
  }
  EXPECT_EQ(sent[0], (std::set<int64_t>{6, 12, 18, 24}));
  EXPECT_EQ(sent[1], (std::set<int64_t>{2, 8, 14, 20, 24}));
  EXPECT_EQ(sent[2], (std::set<int64_t>{4, 10, 16, 22, 24}));
  expectIdenticalReplicas("stream", 14);
  // Results are applied overlap_steps later (except the final sync, which
  // is one exchange for all three fragments). Only fragment 0's exchanges
  // (due at the boundaries) may carry the trainer's control values (they do
  // in non-elastic runs; `archipelago train` runs are elastic and keep the
  // world allreduce).
  for (const auto& j : outer) {
    const int64_t sent = j["sent_step"].get<int64_t>();
    if (sent < steps) {
      EXPECT_EQ(j["step"].get<int64_t>(), sent + 2);
      EXPECT_EQ(j["shared"].get<int>(), 1);
      EXPECT_TRUE(!j["control"].get<bool>() || j["fragment"].get<int>() == 0) << j.dump();
    } else {
      EXPECT_EQ(j["shared"].get<int>(), F) << j.dump();
    }
  }
  auto losses = stepLosses("stream");
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps));
  EXPECT_LT(losses[steps], 0.8 * losses[1]);
  (void)H;
  (void)F;
}

}  // namespace
}  // namespace archipelago::runtime
