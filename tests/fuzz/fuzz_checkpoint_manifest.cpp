// libFuzzer target: a checkpoint's manifest.json (parseCheckpointManifest),
// which decides which files verification hashes. Corpus:
// tests/fuzz/corpus/checkpoint_manifest. CI runs it through
// tests/runtime/checkpoint_fuzz_smoke_test.cpp.
//
// Invariants of an accepted manifest: format version 1, a step >= 0, at
// least one file, and every file a plain name inside the checkpoint
// directory (never "..", "/...", "a/b" or "") with a 64-digit lowercase
// hex sha256, listed once, sorted by name.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "archipelago/runtime/checkpoint_json.h"

namespace archipelago::fuzz {

inline int fuzzCheckpointManifest(const uint8_t* data, size_t size) {
  auto m = runtime::parseCheckpointManifest(std::string_view(reinterpret_cast<const char*>(data), size),
                                            "manifest.json");
  if (!m.isOk()) return 0;
  if (m->step < 0 || m->files.empty()) __builtin_trap();
  for (size_t i = 0; i < m->files.size(); ++i) {
    const auto& f = m->files[i];
    if (f.name.empty() || f.name == "." || f.name == ".." || f.name.find('/') != std::string::npos) __builtin_trap();
    if (f.name.find('\0') != std::string::npos) __builtin_trap();
    if (f.sha256.size() != 64 || f.sha256.find_first_not_of("0123456789abcdef") != std::string::npos) __builtin_trap();
    if (i > 0 && !(m->files[i - 1].name < f.name)) __builtin_trap();
  }
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzCheckpointManifest themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzCheckpointManifest(data, size);
}
#endif
