// The data layer's libFuzzer targets (tests/fuzz/fuzz_manifest.cpp,
// fuzz_shard.cpp) driven by the deterministic mutation loop of
// tests/fuzz/mutator.h from their seed corpora, so every CI run exercises
// them with GCC; plus the inputs those fuzzers found, as plain unit tests.
#include <gtest/gtest.h>

#define ARCHIPELAGO_FUZZ_SMOKE
#include "fuzz/fuzz_manifest.cpp"
#include "fuzz/fuzz_shard.cpp"
#include "fuzz/mutator.h"

namespace archipelago::fuzz {
namespace {

TEST(FuzzSmoke, ManifestTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/manifest");
  ASSERT_GE(seeds.size(), 4u);
  const LoopResult r = runMutationLoop(seeds, fuzzManifest, {.seed = 21, .iterations = 40000, .random_inputs = 5000});
  EXPECT_GE(r.runs, 1000u);
}

TEST(FuzzSmoke, ShardTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/shard");
  ASSERT_GE(seeds.size(), 4u);
  const LoopResult r = runMutationLoop(seeds, fuzzShard, {.seed = 22, .iterations = 40000, .random_inputs = 5000});
  EXPECT_GE(r.runs, 1000u);
}

// ---- inputs the fuzzers found --------------------------------------------------

std::string manifestSeed(const std::string& name) {
  auto text = core::readFile(std::string(ARCHIPELAGO_FUZZ_CORPUS_DIR "/manifest/") + name);
  EXPECT_TRUE(text.isOk()) << text.status().toString();
  return text.isOk() ? *text : std::string();
}

// A shard of 2^62 four-byte tokens: 64 + tokens * 4 wrapped around to 64, so
// the manifest agreed with a 64-byte file and TokenReader would have served
// 2^62 tokens read past the end of the mapping.
TEST(FuzzFinding, ManifestRefusesATokenCountWhoseByteSizeWrapsAround) {
  auto m = data::manifestFromJson(manifestSeed("wrapping_tokens.json"), "manifest.json");
  ASSERT_FALSE(m.isOk());
  EXPECT_NE(m.status().message().find("'train.shards[0].tokens'"), std::string::npos) << m.status().toString();
}

// version 2^32 + 1 was read as an int through a plain cast and became 1.
TEST(FuzzFinding, ManifestRefusesAnIntegerThatDoesNotFitItsField) {
  std::string text = manifestSeed("byte_tokenizer.json");
  const auto at = text.find("\"version\": 1");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 12, "\"version\": 4294967297");
  auto m = data::manifestFromJson(text, "manifest.json");
  ASSERT_FALSE(m.isOk());
  EXPECT_NE(m.status().message().find("field 'version' is 4294967297"), std::string::npos) << m.status().toString();
}

// A float where an integer belongs was cast to int64 (undefined for 1e300).
TEST(FuzzFinding, ManifestRefusesAFloatWhereACountBelongs) {
  std::string text = manifestSeed("byte_tokenizer.json");
  const auto at = text.find("\"documents_read\": 6");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 19, "\"documents_read\": 1e300");
  auto m = data::manifestFromJson(text, "manifest.json");
  ASSERT_FALSE(m.isOk());
  EXPECT_NE(m.status().message().find("'dedup.documents_read'"), std::string::npos) << m.status().toString();
}

}  // namespace
}  // namespace archipelago::fuzz
