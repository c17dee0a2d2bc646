// Hugging Face directories out and in (runtime/hf_checkpoint.h). The
// reference for an export is tests/runtime/hf_reference.py: Hugging Face's
// published LLaMA / Mixtral semantics written in plain PyTorch (Debian's
// python3-torch, installed by scripts/setup.sh), which must compute the
// logits of the trained model from the exported files alone, and read the
// tokenizer files as HF does.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/data/prepare.h"
#include "archipelago/data/tokenizer.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testutil::loadJobText;
using testutil::scratchRoot;

const char* kPython = "/usr/bin/python3";

std::string hfJob(const fs::path& run, const fs::path& data, const std::string& model, int steps = 3) {
  std::ostringstream o;
  o << "cluster:\n  islands:\n    - {name: a, count: 1}\n"
    << "model: {dim: 32, n_layers: 2, max_seq_len: 32, init_std: 0.3, " << model << "}\n"
    << "data: {dir: " << data.string() << ", seq_len: 32}\n"
    << "train: {steps: " << steps << ", global_batch: 4, lr: 0.003, warmup_steps: 1, eval_every: 0}\n"
    << "checkpoint: {every: " << steps << ", keep_last: 2}\n"
    << "run_dir: " << run.string() << "\n";
  return o.str();
}

void train(const std::string& yaml, const std::string& name) {
  auto job = loadJobText(yaml, name);
  TrainerOptions o;
  o.job = job;
  o.run_dir = job.run_dir;
  fs::create_directories(o.run_dir);
  auto s = runTrainer(o);
  ASSERT_TRUE(s.isOk()) << s.status().toString();
}

// `archipelago ARGS`, its output in NAME.out; the exit code.
int cliExit(const std::string& args, const std::string& name) {
  const std::string cmd = std::string(ARCHIPELAGO_BINARY) + " " + args + " > " + (scratchRoot() / (name + ".out")).string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

void writeInts(const fs::path& p, const std::vector<int64_t>& v) {
  std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * 8));
}

// Runs hf_reference.py on `out` against the logits the trained model (the
// run's newest checkpoint, built by our model code) gives `text`.
void expectHfReads(const fs::path& run, const fs::path& out, const data::Tokenizer& tok, const std::string& name) {
  ASSERT_EQ(std::system((std::string(kPython) + " -c 'import torch' 2>/dev/null").c_str()), 0)
      << kPython << " with torch is needed: scripts/setup.sh installs python3-torch";
  auto dir = latestValidCheckpoint(run.string());
  ASSERT_TRUE(dir.isOk());
  auto ck = loadCheckpoint(*dir);
  ASSERT_TRUE(ck.isOk());
  auto job = checkpointJob(*ck);
  ASSERT_TRUE(job.isOk()) << job.status().toString();
  auto net = model::buildModel(job->model, 0);
  ASSERT_TRUE(net.isOk()) << net.status().toString();
  model::SafetensorsFile f;
  f.tensors = ck->weights;
  ASSERT_TRUE(model::loadIntoModel(*net, f).isOk());
  (*net)->eval();
  const std::string text = "the union is strong.";  // fits max_seq_len 32 as bytes
  auto ids32 = tok.encode(text);
  std::vector<int64_t> ids(ids32.begin(), ids32.end());
  torch::NoGradGuard ng;
  torch::Tensor logits = (*net)->forward(torch::tensor(ids, torch::kLong).view({1, -1})).squeeze(0).contiguous().to(torch::kFloat);
  const fs::path base = scratchRoot() / name;
  writeInts(base.string() + ".tokens", ids);
  std::ofstream(base.string() + ".logits", std::ios::binary)
      .write(reinterpret_cast<const char*>(logits.data_ptr<float>()), static_cast<std::streamsize>(logits.numel() * 4));
  std::ofstream(base.string() + ".txt") << text;
  const std::string cmd = std::string(kPython) + " " + ARCHIPELAGO_SOURCE_DIR + "/tests/runtime/hf_reference.py " +
                          out.string() + " " + base.string() + ".tokens " + base.string() + ".logits " + base.string() +
                          ".txt " + base.string() + ".tokens > " + base.string() + ".py.out 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream r(base.string() + ".py.out");
  const std::string report((std::istreambuf_iterator<char>(r)), std::istreambuf_iterator<char>());
  EXPECT_EQ(rc, 0) << report;
  EXPECT_THAT(report, HasSubstr("\"problems\": []")) << report;
  std::printf("hf_reference: %s", report.c_str());
}

TEST(HuggingFace, ExportedLlamaIsWhatHfComputesAndImportsBack) {
  const fs::path run = scratchRoot() / "hf_llama", out = scratchRoot() / "hf_llama_export";
  train(hfJob(run, testutil::tinyDataDir(), "n_heads: 4, n_kv_heads: 2, tie_embeddings: false"), "hf_llama");
  ASSERT_EQ(cliExit("export hf " + run.string() + " " + out.string(), "hf_export"), 0) << testutil::outputOf("hf_export");
  for (const char* f : {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json"}) {
    EXPECT_TRUE(fs::exists(out / f)) << f;
  }
  expectHfReads(run, out, data::ByteTokenizer(), "hf_llama_check");

  // An existing directory is replaced only when asked, and only an export.
  EXPECT_NE(cliExit("export hf " + run.string() + " " + out.string(), "hf_export2"), 0);
  EXPECT_THAT(testutil::outputOf("hf_export2"), HasSubstr("--force"));
  EXPECT_EQ(cliExit("export hf " + run.string() + " " + out.string() + " --force", "hf_export3"), 0);
  EXPECT_NE(cliExit("export hf " + run.string() + " " + testutil::tinyDataDir().string() + " --force", "hf_export4"), 0);
  EXPECT_TRUE(fs::exists(testutil::tinyDataDir() / "manifest.json"));

  // Back in: step 0 of a new run holds the exported weights bit for bit, and trains on.
  const fs::path run2 = scratchRoot() / "hf_imported";
  const std::string job2 = (scratchRoot() / "hf_imported.yaml").string();
  std::ofstream(job2) << hfJob(run2, testutil::tinyDataDir(), "n_heads: 4, n_kv_heads: 2, tie_embeddings: false", 2);
  ASSERT_EQ(cliExit("import hf " + out.string() + " " + job2, "hf_import"), 0) << testutil::outputOf("hf_import");
  auto exported = model::readSafetensors(out / "model.safetensors");
  auto imported = loadCheckpoint((run2 / "checkpoints" / checkpointDirName(0)).string());
  ASSERT_TRUE(exported.isOk() && imported.isOk());
  std::map<std::string, torch::Tensor> got(imported->weights.begin(), imported->weights.end());
  for (const auto& [name, t] : exported->tensors) {
    ASSERT_TRUE(got.count(name)) << name;
    EXPECT_TRUE(torch::equal(got[name], t)) << name;
  }
  ASSERT_EQ(cliExit("train " + job2 + " --resume", "hf_imported_train"), 0) << testutil::outputOf("hf_imported_train");
  EXPECT_TRUE(fs::exists(run2 / "checkpoints" / checkpointDirName(2)));

  // A job describing another model is refused, naming the field.
  const std::string job3 = (scratchRoot() / "hf_wrong.yaml").string();
  std::ofstream(job3) << hfJob(scratchRoot() / "hf_wrong", testutil::tinyDataDir(), "n_heads: 4, n_kv_heads: 4, tie_embeddings: false");
  EXPECT_NE(cliExit("import hf " + out.string() + " " + job3, "hf_import_wrong"), 0);
  EXPECT_THAT(testutil::outputOf("hf_import_wrong"),
              HasSubstr("model.n_kv_heads: the job has 4, config.json has 2 (num_key_value_heads)"));
}

TEST(HuggingFace, ExportedMixtralIsWhatHfComputesAndWhatItCannotExpressIsRefused) {
  const fs::path run = scratchRoot() / "hf_mixtral", out = scratchRoot() / "hf_mixtral_export";
  train(hfJob(run, testutil::tinyDataDir(), "n_heads: 2, tie_embeddings: true, moe: {num_experts: 4, top_k: 2}"), "hf_mixtral");
  ASSERT_EQ(cliExit("export hf " + run.string() + " " + out.string(), "hf_mx_export"), 0) << testutil::outputOf("hf_mx_export");
  EXPECT_THAT(testutil::outputOf("hf_mx_export"), HasSubstr("MixtralForCausalLM"));
  expectHfReads(run, out, data::ByteTokenizer(), "hf_mixtral_check");

  const fs::path shared = scratchRoot() / "hf_shared";
  train(hfJob(shared, testutil::tinyDataDir(), "n_heads: 2, moe: {num_experts: 4, top_k: 2, shared_expert: true}"), "hf_shared");
  EXPECT_NE(cliExit("export hf " + shared.string() + " " + (scratchRoot() / "hf_shared_export").string(), "hf_shared_export"), 0);
  EXPECT_THAT(testutil::outputOf("hf_shared_export"), HasSubstr("model.moe.shared_expert"));
  EXPECT_FALSE(fs::exists(scratchRoot() / "hf_shared_export"));
}

TEST(HuggingFace, SentencePieceTokenizerTravelsWithTheExport) {
  const fs::path data = scratchRoot() / "hf_spm_data";
  data::PrepareOptions po;
  po.inputs = {(scratchRoot() / "corpus").string()};
  po.out = data.string();
  po.tokenizer = "spm";
  po.vocab = 300;  // the most this tiny corpus supports
  po.val_fraction = 0.1;
  auto rep = data::prepareDataset(po);
  ASSERT_TRUE(rep.isOk()) << rep.status().toString();
  const fs::path run = scratchRoot() / "hf_spm", out = scratchRoot() / "hf_spm_export";
  train(hfJob(run, data, "n_heads: 2", 1), "hf_spm");
  ASSERT_EQ(cliExit("export hf " + run.string() + " " + out.string(), "hf_spm_export"), 0) << testutil::outputOf("hf_spm_export");
  EXPECT_TRUE(fs::exists(out / "tokenizer.model"));
  auto m = data::loadManifest(data);
  ASSERT_TRUE(m.isOk());
  auto tok = data::loadTokenizer(*m);
  ASSERT_TRUE(tok.isOk());
  expectHfReads(run, out, **tok, "hf_spm_check");
}

}  // namespace
}  // namespace archipelago::runtime
