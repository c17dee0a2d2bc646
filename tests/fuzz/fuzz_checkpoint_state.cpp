// libFuzzer target: a checkpoint's state.json, as the writer's checkpoint
// (parseCheckpointState) and as a rank part (parseCheckpointPartState), the
// torch-free half of runtime::loadCheckpoint / loadCheckpointPart.
// Corpus: tests/fuzz/corpus/checkpoint_state. CI runs it through
// tests/runtime/checkpoint_fuzz_smoke_test.cpp.
//
// Invariants: steps and positions are >= 0; extra and membership are
// objects; and every read that verification and resume make afterwards
// (extra.parts[*].rank / island / island_state, extra.outer's fields, all
// through nlohmann's throwing value()) succeeds on what was accepted.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "archipelago/runtime/checkpoint_json.h"

namespace archipelago::fuzz {

// The reads of runtime/loop/resume.cpp and OuterSync::restore, in the same form.
inline void readLikeResume(const nlohmann::json& extra) {
  try {
    for (const auto& p : extra.value("parts", nlohmann::json::array())) {
      if (p.value("rank", -1) < 0) __builtin_trap();
      (void)p.value("island_state", false);
      (void)p.value("island", std::string());
    }
    const nlohmann::json st = extra.value("outer", nlohmann::json());
    if (st.is_object()) {
      (void)st.value("kind", "");
      (void)st.value("fragments", size_t{0});
      (void)st.value("numel", int64_t{0});
      (void)st.value("cum_tokens", int64_t{0});
      (void)st.value("last_tokens", std::vector<int64_t>{});
      (void)st.value("rounds", std::vector<int64_t>{});
      (void)st.value("outer_steps", int64_t{0});
    }
  } catch (...) {
    __builtin_trap();
  }
}

inline int fuzzCheckpointState(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto s = runtime::parseCheckpointState(text, "state.json");
  if (s.isOk()) {
    if (s->step < 0 || s->data_position < 0 || s->optimizer_step < 0) __builtin_trap();
    if (!s->extra.is_object() || !s->membership.is_object()) __builtin_trap();
    const auto parts = s->extra.value("parts", nlohmann::json::array());
    if (parts.size() != s->parts.size()) __builtin_trap();
    for (const auto& ref : s->parts) {
      if (ref.rank < 0) __builtin_trap();
    }
    readLikeResume(s->extra);
  }
  auto part = runtime::parseCheckpointPartState(text, "state.json");
  if (part.isOk()) {
    if (part->step < 0 || part->rank < 0 || part->optimizer_step < 0 || !part->extra.is_object()) __builtin_trap();
    readLikeResume(part->extra);
  }
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzCheckpointState themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzCheckpointState(data, size);
}
#endif
