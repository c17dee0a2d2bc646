// The checkpoint JSON libFuzzer targets (tests/fuzz/fuzz_checkpoint_state.cpp,
// fuzz_checkpoint_manifest.cpp) driven by the deterministic mutation loop of
// tests/fuzz/mutator.h from their seed corpora, so every CI run exercises
// what loadCheckpoint parses; plus the inputs found while writing them, as
// plain unit tests (some through verifyCheckpoint on a real directory).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#define ARCHIPELAGO_FUZZ_SMOKE
#include "archipelago/core/files.h"
#include "archipelago/runtime/checkpoint.h"
#include "fuzz/fuzz_checkpoint_manifest.cpp"
#include "fuzz/fuzz_checkpoint_state.cpp"
#include "fuzz/mutator.h"

namespace archipelago::fuzz {
namespace {

#define CORPUS ARCHIPELAGO_FUZZ_CORPUS_DIR "/"

TEST(FuzzSmoke, CheckpointStateTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(CORPUS "checkpoint_state");
  ASSERT_GE(seeds.size(), 4u);
  const LoopResult r =

      runMutationLoop(seeds, fuzzCheckpointState,
                      {.seed = 71, .iterations = 40000, .random_inputs = 5000, .min_runs = 4000});
  EXPECT_GE(r.runs, 4000u);
}

TEST(FuzzSmoke, CheckpointManifestTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(CORPUS "checkpoint_manifest");
  ASSERT_GE(seeds.size(), 4u);
  const LoopResult r =

      runMutationLoop(seeds, fuzzCheckpointManifest,
                      {.seed = 72, .iterations = 60000, .random_inputs = 5000, .min_runs = 4000});
  EXPECT_GE(r.runs, 4000u);
}

// ---- inputs the fuzzers found --------------------------------------------------

std::string seed(const std::string& name) {
  auto text = core::readFile(std::string(CORPUS) + name);
  EXPECT_TRUE(text.isOk()) << text.status().toString();
  return text.isOk() ? *text : std::string();
}

// A checkpoint directory holding the given manifest.json and state.json.
class CheckpointDir {
 public:
  CheckpointDir(const std::string& manifest, const std::string& state) {
    path_ = std::filesystem::temp_directory_path() / ("arch-ckpt-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(path_);
    EXPECT_TRUE(core::writeFile(path_ / "manifest.json", manifest).isOk());
    EXPECT_TRUE(core::writeFile(path_ / "state.json", state).isOk());
  }
  ~CheckpointDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

std::string messageOf(const core::Status& st) { return st.isOk() ? "ok" : st.message(); }

// "format_version": "1" and a file entry that is a list: manifest.value()
// threw json::type_error out of verifyCheckpoint (and loadCheckpoint).
TEST(FuzzFinding, CheckpointManifestOfWrongTypesIsDataLossNotAnException) {
  CheckpointDir dir(seed("checkpoint_manifest/bad_types.json"), seed("checkpoint_state/sync.json"));
  const core::Status st = runtime::verifyCheckpoint(dir.path());
  EXPECT_EQ(st.code(), core::StatusCode::kDataLoss) << st.toString();
  EXPECT_NE(messageOf(st).find("format_version \"1\""), std::string::npos) << st.toString();
}

// "../../../etc/passwd" was joined to the directory and hashed; "" named
// the directory itself (file_size threw) and "/dev/zero" replaced the
// directory and would have been hashed forever.
TEST(FuzzFinding, CheckpointManifestNamesOnlyFilesInItsDirectory) {
  for (const char* name : {"checkpoint_manifest/path_traversal.json", "checkpoint_manifest/device_file.json"}) {
    CheckpointDir dir(seed(name), seed("checkpoint_state/sync.json"));
    const core::Status st = runtime::verifyCheckpoint(dir.path());
    EXPECT_EQ(st.code(), core::StatusCode::kDataLoss) << name << ": " << st.toString();
    EXPECT_NE(messageOf(st).find("not a plain file name"), std::string::npos) << st.toString();
  }
}

// extra.parts[0].rank "1" and extra.parts[1] = 7: part.value("rank", -1)
// threw json::type_error out of verifyCheckpoint; extra.outer.kind 3 would
// have thrown in resume.
TEST(FuzzFinding, CheckpointStateWithWronglyTypedPartsIsDataLoss) {
  auto s = runtime::parseCheckpointState(seed("checkpoint_state/bad_parts.json"), "state.json");
  ASSERT_FALSE(s.isOk());
  EXPECT_NE(s.status().message().find("field 'extra.parts[0].rank' is \"1\""), std::string::npos)
      << s.status().toString();
}

// "extra": null became a null json, and resume's extra.value("outer")
// throws on null (a DiLoCo job resuming from such a file).
TEST(FuzzFinding, CheckpointStateWithoutExtraGivesAnEmptyObject) {
  auto s = runtime::parseCheckpointState(seed("checkpoint_state/sync.json"), "state.json");
  ASSERT_TRUE(s.isOk()) << s.status().toString();
  EXPECT_TRUE(s->extra.is_object());
  EXPECT_NO_THROW((void)s->extra.value("outer", nlohmann::json()));
}

// A step of -5, a data position of 1e300 (cast to int64 with undefined
// behaviour) and an optimizer step of 2^64 - 1 (wrapped to -1) were taken.
TEST(FuzzFinding, CheckpointStateRefusesNegativeAndNonIntegerCounts) {
  auto s = runtime::parseCheckpointState(seed("checkpoint_state/negative_and_float.json"), "state.json");
  ASSERT_FALSE(s.isOk());
  EXPECT_NE(s.status().message().find("field 'step' is -5"), std::string::npos) << s.status().toString();
}

}  // namespace
}  // namespace archipelago::fuzz
