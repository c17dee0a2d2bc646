// The safetensors libFuzzer target (tests/fuzz/fuzz_safetensors.cpp) driven
// by the deterministic mutation loop of tests/fuzz/mutator.h from its seed
// corpus, so every CI run exercises parseSafetensors with GCC; plus the
// inputs found while writing it, as plain unit tests.
#include <gtest/gtest.h>

#define ARCHIPELAGO_FUZZ_SMOKE
#include "archipelago/core/files.h"
#include "fuzz/fuzz_safetensors.cpp"
#include "fuzz/mutator.h"

namespace archipelago::fuzz {
namespace {

TEST(FuzzSmoke, SafetensorsTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/safetensors");
  ASSERT_GE(seeds.size(), 4u);
  const LoopResult r =
      runMutationLoop(seeds, fuzzSafetensors,
                      {.seed = 51, .iterations = 300000, .random_inputs = 20000, .min_runs = 2000});
  EXPECT_GE(r.runs, 2000u);
}

// ---- inputs the fuzzers found --------------------------------------------------

std::string seed(const std::string& name) {
  auto text = core::readFile(std::string(ARCHIPELAGO_FUZZ_CORPUS_DIR "/safetensors/") + name);
  EXPECT_TRUE(text.isOk()) << text.status().toString();
  return text.isOk() ? *text : std::string();
}

// shape [2^62] of F32 at data_offsets [0, 0]: numel * 4 wrapped around to
// 0, the size check passed, and torch::empty threw c10::Error ("Storage
// size calculation overflowed") out of parseSafetensors.
TEST(FuzzFinding, SafetensorsRefusesAShapeWhoseByteSizeWrapsAround) {
  auto f = model::parseSafetensors(seed("huge_shape"));
  ASSERT_FALSE(f.isOk());
  EXPECT_NE(f.status().message().find("entry 'a': 0 bytes for shape of 4611686018427387904 elements"),
            std::string::npos)
      << f.status().toString();
}

// shape [0, 2^63]: zero elements, so the overflow check never looked at
// the second dimension, which became a negative int64 size: torch::empty
// threw c10::Error out of parseSafetensors.
TEST(FuzzFinding, SafetensorsRefusesADimensionPastInt64EvenInAnEmptyTensor) {
  const std::string header = R"({"a":{"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  file += header;
  auto f = model::parseSafetensors(file);
  ASSERT_FALSE(f.isOk());
  EXPECT_NE(f.status().message().find("entry 'a': shape overflows"), std::string::npos) << f.status().toString();
}

}  // namespace
}  // namespace archipelago::fuzz
