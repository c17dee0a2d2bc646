// Trainer tests. The reference for every multi-worker run is the same job
// trained by one process (runTrainer with no communicator): N workers with
// uneven batch shares must produce the loss curve of that single big-batch
// run. Multi-worker runs go through the real binary: launcher, coordinator,
// worker processes and the comm layer over 127.0.0.1.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "archipelago/core/config.h"
#include "archipelago/data/prepare.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/launcher.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

using testutil::loadJobText;
using testutil::metricLines;
using testutil::outputOf;
using testutil::scratchRoot;
using testutil::tinyDataDir;

std::string jobYaml(const std::string& run_dir, const std::string& islands, int steps, int global_batch,
                    const std::string& extra = "") {
  std::ostringstream o;
  o << "cluster:\n  islands:\n" << islands << "\n"
    << "model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}\n"
    << "data: {dir: " << tinyDataDir().string() << ", seq_len: 32}\n"
    << "train: {steps: " << steps << ", global_batch: " << global_batch
    << ", lr: 0.003, warmup_steps: 3, eval_every: 0, rebalance: false}\n"
    << "checkpoint: {every: 0, keep_last: 3}\n"
    << "run_dir: " << run_dir << "\n"
    << extra;
  return o.str();
}

int runBinary(const std::string& yaml, const std::string& name, const std::vector<std::string>& args = {}) {
  return testutil::runTrain(yaml, name, args);
}
std::map<int64_t, double> stepLosses(const fs::path& run_dir) { return testutil::rank0Losses(run_dir); }

// The reference every multi-worker run is held to: the same job trained by
// one process with the whole global batch (no metrics written).
core::Result<TrainSummary> singleProcess(const std::string& name, int steps, int global_batch) {
  auto job = loadJobText(jobYaml((scratchRoot() / name).string(), "    - {name: a, count: 1}", steps, global_batch), name);
  TrainerOptions o;
  o.job = job;
  o.run_dir = job.run_dir;
  o.write_metrics = false;
  return runTrainer(o);
}

TEST(Trainer, SingleProcessLossFalls) {
  auto job = loadJobText(jobYaml((scratchRoot() / "single").string(), "    - {name: a, count: 1}", 30, 8), "single");
  TrainerOptions o;
  o.job = job;
  o.run_dir = job.run_dir;
  fs::create_directories(o.run_dir);
  auto s = runTrainer(o);
  ASSERT_TRUE(s.isOk()) << s.status().toString();
  ASSERT_EQ(s->losses.size(), 30u);
  EXPECT_LT(s->losses.back(), 0.75 * s->losses.front());
}

TEST(Trainer, UnevenSharesAcrossIslandsMatchSingleProcess) {
  const int steps = 20, batch = 12;
  // Reference: one process, the whole global batch.
  auto ref = singleProcess("ref", steps, batch);
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();

  // Three workers in two islands with shares 6/4/2, through the launcher.
  fs::path run = scratchRoot() / "multi";
  std::string islands =
      "    - {name: east, count: 2}\n    - {name: west, count: 1, slowdown: 1.5}\n"
      "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  std::string yaml = jobYaml(run.string(), islands, steps, batch);
  yaml.replace(yaml.find("rebalance: false"), 16, "rebalance: false, shares: [3, 2, 1]");
  ASSERT_EQ(runBinary(yaml, "multi"), 0) << outputOf("multi");
  auto losses = stepLosses(run);
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps)) << outputOf("multi");
  for (int s = 1; s <= steps; ++s) {
    EXPECT_NEAR(losses[s], ref->losses[static_cast<size_t>(s - 1)], 2e-4 * std::max(1.0, ref->losses[0]))
        << "step " << s;
  }
  // Shares were uneven as asked.
  std::ifstream f(run / "metrics.jsonl");
  std::string line;
  std::map<int, int64_t> samples;
  std::map<int, double> peak_rss;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || j.value("kind", "") != "step") continue;
    samples[j["rank"].get<int>()] = j["samples"].get<int64_t>();
    peak_rss[j["rank"].get<int>()] = j.value("peak_rss_bytes", 0.0);
  }
  EXPECT_EQ(samples[0], 6);
  EXPECT_EQ(samples[1], 4);
  EXPECT_EQ(samples[2], 2);
  // Each worker process's peak resident memory: at least what its
  // libraries keep resident (one measured 180-220 MB), at most this
  // machine's memory.
  for (int r = 0; r < 3; ++r) {
    EXPECT_GT(peak_rss[r], 50e6) << "rank " << r;
    EXPECT_LT(peak_rss[r], 64e9) << "rank " << r;
  }
  EXPECT_TRUE(fs::exists(run / "trace.json"));
}

std::string fileBytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

TEST(Trainer, ResumeAfterKillIsBitExact) {
  const int k = 6;
  std::string islands = "    - {name: a, count: 2}";
  // Uninterrupted 2k steps.
  fs::path full = scratchRoot() / "full";
  std::string yaml_full = jobYaml(full.string(), islands, 2 * k, 6);
  ASSERT_EQ(runBinary(yaml_full, "full"), 0) << outputOf("full");
  // Killed right after step k (checkpoint every k), then resumed.
  fs::path cut = scratchRoot() / "cut";
  std::string yaml_cut = jobYaml(cut.string(), islands, 2 * k, 6);
  yaml_cut.replace(yaml_cut.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(runBinary(yaml_cut, "cut1", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(cut / "checkpoints" / checkpointDirName(k))) << outputOf("cut1");
  ASSERT_FALSE(fs::exists(cut / "checkpoints" / checkpointDirName(2 * k)));
  ASSERT_EQ(runBinary(yaml_cut, "cut2", {"--resume"}), 0) << outputOf("cut2");

  auto a = fileBytes(full / "checkpoints" / checkpointDirName(2 * k) / "model.safetensors");
  auto b = fileBytes(cut / "checkpoints" / checkpointDirName(2 * k) / "model.safetensors");
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "parameters after resume differ from the uninterrupted run";
  auto oa = fileBytes(full / "checkpoints" / checkpointDirName(2 * k) / "optimizer.safetensors");
  auto ob = fileBytes(cut / "checkpoints" / checkpointDirName(2 * k) / "optimizer.safetensors");
  EXPECT_TRUE(oa == ob);
}

// ZeRO-1 (train.shard_optimizer): each of 3 workers keeps a third of the
// AdamW moments. Its checkpoint assembles the whole state by tensor name:
// the same parameters and moments an unsharded run of the same job
// writes; resumed without sharding, the run goes on along the
// single-process curve.
TEST(Trainer, ShardedOptimizerCheckpointsTheWholeStateAndResumesUnsharded) {
  const int k = 5, steps = 10, batch = 9;
  const std::string islands = "    - {name: a, count: 3}";
  auto ref = singleProcess("zero_ref", steps, batch);
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();

  auto yamlFor = [&](const fs::path& run, bool shard) {
    std::string y = jobYaml(run.string(), islands, steps, batch);
    y.replace(y.find("{every: 0"), 9, "{every: " + std::to_string(k));
    if (shard) y.replace(y.find("rebalance: false"), 16, "rebalance: false, shard_optimizer: true");
    return y;
  };
  fs::path plain = scratchRoot() / "zero_plain", sharded = scratchRoot() / "zero_sharded";
  EXPECT_NE(runBinary(yamlFor(plain, false), "zero_plain", {"--exit-after-step", std::to_string(k)}), 0);
  EXPECT_NE(runBinary(yamlFor(sharded, true), "zero_sharded1", {"--exit-after-step", std::to_string(k)}), 0);
  EXPECT_THAT(fileBytes(sharded / "logs" / "rank0.log"), HasSubstr("optimizer shard (ZeRO-1): 1"));
  auto a = loadCheckpoint((plain / "checkpoints" / checkpointDirName(k)).string());
  auto b = loadCheckpoint((sharded / "checkpoints" / checkpointDirName(k)).string());
  ASSERT_TRUE(a.isOk() && b.isOk()) << outputOf("zero_sharded1");
  ASSERT_EQ(a->weights.size(), b->weights.size());
  for (size_t i = 0; i < a->weights.size(); ++i) {
    EXPECT_EQ(a->weights[i].first, b->weights[i].first);
    EXPECT_TRUE(torch::allclose(a->weights[i].second, b->weights[i].second, 1e-5, 1e-7)) << a->weights[i].first;
  }
  std::map<std::string, torch::Tensor> oa(a->optimizer.begin(), a->optimizer.end()), ob(b->optimizer.begin(), b->optimizer.end());
  for (const char* m : {"exp_avg", "exp_avg_sq"}) {
    ASSERT_TRUE(oa.count(m) && ob.count(m)) << m;
    EXPECT_TRUE(torch::allclose(oa[m], ob[m], 1e-4, 1e-9)) << m << " assembled from the shards differs";
    EXPECT_GT(ob[m].abs().min().item<float>() + ob[m].abs().max().item<float>(), 0.0f);
  }
  ASSERT_EQ(runBinary(yamlFor(sharded, false), "zero_sharded2", {"--resume"}), 0) << outputOf("zero_sharded2");
  auto losses = stepLosses(sharded);
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps)) << outputOf("zero_sharded2");
  for (int s = 1; s <= steps; ++s) {
    EXPECT_NEAR(losses[s], ref->losses[static_cast<size_t>(s - 1)], 2e-4 * std::max(1.0, ref->losses[0])) << "step " << s;
  }
}

// ZeRO-2 (train.zero: 2): 3 workers in two islands with uneven shares
// 4/3/2 reduce-scatter their gradients to the slice owners and follow the
// single-process curve; killed after step k, the checkpoint (assembled by
// tensor name) resumes at ZeRO-1 along the same curve.
TEST(Trainer, ZeroTwoWithUnevenSharesMatchesSingleProcessAndResumesAtZeroOne) {
  const int k = 5, steps = 10, batch = 9;
  auto ref = singleProcess("zero2_ref", steps, batch);
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  const std::string islands =
      "    - {name: east, count: 2}\n    - {name: west, count: 1, slowdown: 1.5}\n"
      "  straits: [{a: east, b: west, bandwidth: 1Gbit/s, latency: 1ms}]";
  fs::path run = scratchRoot() / "zero2";
  auto yamlFor = [&](int zero) {
    std::string y = jobYaml(run.string(), islands, steps, batch);
    y.replace(y.find("{every: 0"), 9, "{every: " + std::to_string(k));
    y.replace(y.find("rebalance: false"), 16, "rebalance: false, shares: [4, 3, 2], zero: " + std::to_string(zero));
    return y;
  };
  EXPECT_NE(runBinary(yamlFor(2), "zero2_a", {"--exit-after-step", std::to_string(k)}), 0);
  EXPECT_THAT(fileBytes(run / "logs" / "rank0.log"), HasSubstr("optimizer shard (ZeRO-2): "));
  ASSERT_TRUE(fs::exists(run / "checkpoints" / checkpointDirName(k))) << outputOf("zero2_a");
  ASSERT_EQ(runBinary(yamlFor(1), "zero2_b", {"--resume"}), 0) << outputOf("zero2_b");
  EXPECT_THAT(fileBytes(run / "logs" / "rank0.log"), HasSubstr("optimizer shard (ZeRO-1): "));
  auto losses = stepLosses(run);
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps)) << outputOf("zero2_b");
  for (int s = 1; s <= steps; ++s) {
    EXPECT_NEAR(losses[s], ref->losses[static_cast<size_t>(s - 1)], 2e-4 * std::max(1.0, ref->losses[0])) << "step " << s;
  }
}

// DiLoCo between outer steps: each island holds its own weights and AdamW
// moments and each rank its int8 error-feedback residual. Killed mid-round
// (step 6 of rounds of 4) and resumed, the run must reach step 12 with the
// same state as an uninterrupted run, the other island's part included.
TEST(Trainer, DilocoResumeMidRoundIsBitExact) {
  const int k = 6;
  const std::string islands = "    - {name: a, count: 1}\n    - {name: b, count: 1, slowdown: 1.5}";
  const std::string strategy = "strategy: {kind: diloco, inner_steps: 4, codec: int8}\n";
  fs::path full = scratchRoot() / "diloco_full";
  std::string yaml_full = jobYaml(full.string(), islands, 2 * k, 6, strategy);
  yaml_full.replace(yaml_full.find("{every: 0"), 9, "{every: " + std::to_string(k));
  ASSERT_EQ(runBinary(yaml_full, "diloco_full"), 0) << outputOf("diloco_full");
  fs::path cut = scratchRoot() / "diloco_cut";
  std::string yaml_cut = jobYaml(cut.string(), islands, 2 * k, 6, strategy);
  yaml_cut.replace(yaml_cut.find("{every: 0"), 9, "{every: " + std::to_string(k));
  EXPECT_NE(runBinary(yaml_cut, "diloco_cut1", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(verifyCheckpoint((cut / "checkpoints" / checkpointDirName(k)).string()).isOk()) << outputOf("diloco_cut1");
  // The mid-round checkpoint holds island b's own state, which differs from a's.
  auto main_k = loadCheckpoint((cut / "checkpoints" / checkpointDirName(k)).string());
  auto part_k = loadCheckpointPart((cut / "checkpoints" / checkpointDirName(k)).string(), 1);
  ASSERT_TRUE(main_k.isOk() && part_k.isOk());
  ASSERT_EQ(main_k->extra["parts"].size(), 1u);
  EXPECT_TRUE(main_k->extra["parts"][0].value("island_state", false));
  bool differs = false;
  for (const auto& [name, t] : part_k->optimizer) {
    if (name == "model." + main_k->weights[0].first) differs = !torch::equal(t, main_k->weights[0].second);
  }
  EXPECT_TRUE(differs) << "island b's weights mid-round should differ from island a's";
  ASSERT_EQ(runBinary(yaml_cut, "diloco_cut2", {"--resume"}), 0) << outputOf("diloco_cut2");

  for (const std::string f : {"model.safetensors", "optimizer.safetensors"}) {
    auto a = fileBytes(full / "checkpoints" / checkpointDirName(2 * k) / f);
    auto b = fileBytes(cut / "checkpoints" / checkpointDirName(2 * k) / f);
    ASSERT_FALSE(a.empty());
    EXPECT_TRUE(a == b) << f << " after resume differs from the uninterrupted run";
  }
  auto pa = fileBytes(full / "checkpoints" / checkpointPartDirName(2 * k, 1) / "part.safetensors");
  auto pb = fileBytes(cut / "checkpoints" / checkpointPartDirName(2 * k, 1) / "part.safetensors");
  ASSERT_FALSE(pa.empty());
  EXPECT_TRUE(pa == pb) << "island b's part after resume differs from the uninterrupted run";
  // A checkpoint whose rank part is lost is refused; resume takes the previous one.
  fs::remove_all(cut / "checkpoints" / checkpointPartDirName(2 * k, 1));
  auto st = verifyCheckpoint((cut / "checkpoints" / checkpointDirName(2 * k)).string());
  EXPECT_FALSE(st.isOk());
  EXPECT_THAT(st.message(), HasSubstr("rank part"));
  auto latest = latestValidCheckpoint(cut.string());
  ASSERT_TRUE(latest.isOk());
  EXPECT_EQ(fs::path(*latest).filename().string(), checkpointDirName(k));
}

// A checkpoint as Hugging Face reads it: config.json with every size
// resolved (the job leaves n_kv_heads and ffn_hidden to defaults) and
// model.safetensors with format "pt" whose tensor names and shapes are
// exactly those LlamaForCausalLM builds from that config (HF's published
// rules, written out here, not our model code).
TEST(Trainer, CheckpointIsWhatHuggingFaceLlamaBuildsFromItsConfig) {
  fs::path run = scratchRoot() / "hf_ckpt";
  std::string yaml = jobYaml(run.string(), "    - {name: a, count: 1}", 2, 4);
  yaml.replace(yaml.find("{every: 0"), 9, "{every: 2");
  yaml.replace(yaml.find("n_heads: 2"), 10, "n_heads: 4, n_kv_heads: 2, tie_embeddings: false");
  auto job = loadJobText(yaml, "hf_ckpt");
  TrainerOptions o;
  o.job = job;
  o.run_dir = job.run_dir;
  fs::create_directories(o.run_dir);
  ASSERT_TRUE(runTrainer(o).isOk());
  const fs::path dir = run / "checkpoints" / checkpointDirName(2);
  auto cfg = nlohmann::json::parse(fileBytes(dir / "config.json"), nullptr, false);
  ASSERT_TRUE(cfg.is_object());
  const int64_t hidden = cfg.value("hidden_size", 0), heads = cfg.value("num_attention_heads", 0),
                kv = cfg.value("num_key_value_heads", 0), inter = cfg.value("intermediate_size", 0),
                vocab = cfg.value("vocab_size", 0), layers = cfg.value("num_hidden_layers", 0);
  EXPECT_EQ(hidden, 32);
  EXPECT_EQ(heads, 4);
  EXPECT_EQ(kv, 2);
  EXPECT_GT(inter, 0);
  EXPECT_GT(vocab, 0);
  EXPECT_EQ(layers, 2);
  EXPECT_EQ(cfg.value("model_type", ""), "llama");
  EXPECT_GT(cfg.value("max_position_embeddings", 0), 0);
  EXPECT_GT(cfg.value("rms_norm_eps", 0.0), 0.0);
  const int64_t head_dim = cfg.value("head_dim", hidden / heads);
  std::map<std::string, std::vector<int64_t>> want = {{"model.embed_tokens.weight", {vocab, hidden}},
                                                      {"model.norm.weight", {hidden}},
                                                      {"lm_head.weight", {vocab, hidden}}};
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    want[p + "self_attn.q_proj.weight"] = {heads * head_dim, hidden};
    want[p + "self_attn.k_proj.weight"] = {kv * head_dim, hidden};
    want[p + "self_attn.v_proj.weight"] = {kv * head_dim, hidden};
    want[p + "self_attn.o_proj.weight"] = {hidden, heads * head_dim};
    want[p + "mlp.gate_proj.weight"] = {inter, hidden};
    want[p + "mlp.up_proj.weight"] = {inter, hidden};
    want[p + "mlp.down_proj.weight"] = {hidden, inter};
    want[p + "input_layernorm.weight"] = {hidden};
    want[p + "post_attention_layernorm.weight"] = {hidden};
  }
  auto file = model::readSafetensors(dir / "model.safetensors");
  ASSERT_TRUE(file.isOk()) << file.status().toString();
  EXPECT_EQ(file->metadata["format"], "pt");
  std::map<std::string, std::vector<int64_t>> got;
  for (const auto& [name, t] : file->tensors) got[name] = t.sizes().vec();
  EXPECT_EQ(got, want);
}

TEST(Trainer, CorruptCheckpointIsRefusedAndPreviousUsed) {
  fs::path run = scratchRoot() / "corrupt";
  std::string yaml = jobYaml(run.string(), "    - {name: a, count: 1}", 6, 4);
  yaml.replace(yaml.find("{every: 0"), 9, "{every: 2");
  ASSERT_EQ(runBinary(yaml, "corrupt"), 0) << outputOf("corrupt");
  auto newest = run / "checkpoints" / checkpointDirName(6);
  ASSERT_TRUE(fs::exists(newest));
  {
    std::fstream f(newest / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x55');
  }
  EXPECT_FALSE(verifyCheckpoint(newest.string()).isOk());
  std::vector<std::pair<std::string, std::string>> refused;
  auto latest = latestValidCheckpoint(run.string(), &refused);
  ASSERT_TRUE(latest.isOk());
  EXPECT_THAT(*latest, HasSubstr(checkpointDirName(4)));
  ASSERT_EQ(refused.size(), 1u);
  EXPECT_THAT(refused[0].second, HasSubstr("sha256"));
}

TEST(Trainer, MoeTrainsAndWritesRoutingStats) {
  fs::path run = scratchRoot() / "moe";
  std::string yaml = jobYaml(run.string(), "    - {name: a, count: 2}", 25, 8);
  yaml.replace(yaml.find("max_seq_len: 32}"), 16, "max_seq_len: 32, moe: {num_experts: 4, top_k: 2}}");
  ASSERT_EQ(runBinary(yaml, "moe"), 0) << outputOf("moe");
  auto losses = stepLosses(run);
  ASSERT_EQ(losses.size(), 25u);
  EXPECT_LT(losses[25], 0.8 * losses[1]);
  std::ifstream f(run / "metrics.jsonl");
  std::string line;
  int moe_lines = 0;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || j.value("kind", "") != "moe") continue;
    ++moe_lines;
    int64_t sum = 0;
    for (auto c : j["tokens_per_expert"]) sum += c.get<int64_t>();
    EXPECT_GT(sum, 0);
    EXPECT_EQ(j["tokens_per_expert"].size(), 4u);
  }
  EXPECT_GT(moe_lines, 0);
}

TEST(Launcher, BadJobFailsBeforeAnythingIsWritten) {
  fs::path run = scratchRoot() / "bad";
  std::string yaml = jobYaml(run.string(), "    - {name: a, count: 2}", 5, 1);  // batch 1 < 2 workers
  EXPECT_EQ(runBinary(yaml, "bad"), 2);
  EXPECT_THAT(outputOf("bad"), HasSubstr("train.global_batch"));
  EXPECT_FALSE(fs::exists(run));
}

TEST(Launcher, MissingDataIsAClearError) {
  fs::path run = scratchRoot() / "nodata";
  std::string yaml = jobYaml(run.string(), "    - {name: a, count: 1}", 5, 2);
  yaml.replace(yaml.find(tinyDataDir().string()), tinyDataDir().string().size(),
               (scratchRoot() / "no-such-data").string());
  EXPECT_NE(runBinary(yaml, "nodata"), 0);
  EXPECT_THAT(outputOf("nodata"), HasSubstr("no-such-data"));
  EXPECT_THAT(outputOf("nodata"), HasSubstr("data prepare"));
  EXPECT_FALSE(fs::exists(run / "checkpoints"));
}

TEST(Launcher, WorkerThatCannotStartIsReported) {
  fs::path run = scratchRoot() / "nostart";
  std::string yaml = jobYaml(run.string(), "    - {name: a, count: 2}", 5, 4);
  fs::path p = scratchRoot() / "nostart.yaml";
  std::ofstream(p) << yaml;
  LaunchOptions lo;
  lo.job_path = p.string();
  lo.self_exe = (scratchRoot() / "no-such-binary").string();
  lo.progress = false;
  auto st = launchTraining(lo);
  ASSERT_FALSE(st.isOk());
  EXPECT_THAT(st.message(), HasSubstr("worker"));
  EXPECT_THAT(st.message(), HasSubstr("cannot exec"));
  EXPECT_FALSE(fs::exists(run / "checkpoints"));
}

}  // namespace
}  // namespace archipelago::runtime
