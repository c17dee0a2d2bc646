// The libFuzzer target tests/fuzz/fuzz_frame.cpp, driven by the
// deterministic mutation loop of tests/fuzz/mutator.h from its seed corpus
// (tests/fuzz/corpus/frame) inside the ordinary test binary, so every CI run
// exercises it even with GCC (the real libFuzzer run needs clang and
// -DARCHIPELAGO_FUZZ=ON; see docs/fuzzing.md). The target traps
// (__builtin_trap) when an accepted header or handshake violates an
// invariant, which fails this test by crashing it.
#include <gtest/gtest.h>

#define ARCHIPELAGO_FUZZ_SMOKE
#include "fuzz/fuzz_frame.cpp"
#include "fuzz/mutator.h"

namespace archipelago::fuzz {
namespace {

TEST(Fuzz, FrameAndHandshakeTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/frame");
  ASSERT_GE(seeds.size(), 4u);
  const LoopResult r =
      runMutationLoop(seeds, fuzzFrame,
                      {.seed = 20240607, .iterations = 2000000, .random_inputs = 200000, .min_runs = 20001});
  EXPECT_GT(r.runs, 20000u);
}

}  // namespace
}  // namespace archipelago::fuzz
