// libFuzzer target: a prepared dataset's manifest.json (manifestFromJson),
// the file every worker trusts for shard names, sizes and token counts.
// Corpus: tests/fuzz/corpus/manifest. CI runs it through
// tests/data/fuzz_smoke_test.cpp.
//
// An accepted manifest must be one TokenReader can rely on without further
// checks: a token width of 2 or 4 matching dtype, plain shard file names,
// every shard's byte size equal to its header plus its tokens, split totals
// equal to the sums of their shards, and writing it back gives a file that
// reads back to the same text.
#include <cstddef>
#include <cstdint>
#include <string>

#include "archipelago/data/manifest.h"

namespace archipelago::fuzz {

inline void checkAcceptedSplit(const data::SplitInfo& s, int token_bytes) {
  int64_t tokens = 0, docs = 0;
  for (const auto& sh : s.shards) {
    if (sh.tokens < 0 || sh.documents < 0) __builtin_trap();
    int64_t payload = 0;
    if (__builtin_mul_overflow(sh.tokens, static_cast<int64_t>(token_bytes), &payload)) __builtin_trap();
    if (sh.bytes != 64 + payload) __builtin_trap();
    if (sh.file.empty() || sh.file.find('/') != std::string::npos || sh.file.find("..") != std::string::npos) {
      __builtin_trap();
    }
    if (__builtin_add_overflow(tokens, sh.tokens, &tokens)) __builtin_trap();
    if (__builtin_add_overflow(docs, sh.documents, &docs)) __builtin_trap();
  }
  if (tokens != s.tokens || docs != s.documents) __builtin_trap();
}

inline int fuzzManifest(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto m = data::manifestFromJson(text, "manifest.json");
  if (!m.isOk()) return 0;
  if (m->version != data::kManifestVersion) __builtin_trap();
  if (m->token_bytes != 2 && m->token_bytes != 4) __builtin_trap();
  if (m->dtype != (m->token_bytes == 2 ? "uint16" : "uint32")) __builtin_trap();
  checkAcceptedSplit(m->train, m->token_bytes);
  checkAcceptedSplit(m->val, m->token_bytes);
  // What we write we must read back, unchanged.
  const std::string again = data::manifestToJson(*m);
  auto back = data::manifestFromJson(again, "manifest.json");
  if (!back.isOk() || data::manifestToJson(*back) != again) __builtin_trap();
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzManifest themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzManifest(data, size);
}
#endif
