// libFuzzer target: the client side of the coordinator protocol, a reply as
// CoordinatorClient reads it (parseCoordinatorReply, membershipFromJson).
// Corpus: tests/fuzz/corpus/coordinator_reply. CI runs it through
// tests/comm/coordinator_fuzz_smoke_test.cpp.
//
// Invariants: neither function throws; an accepted membership holds one
// address, island and pid per rank, and alive and failed are ascending,
// disjoint ranks of the table (the runtime indexes with them and
// binary-searches them); an accepted reply's fields have the types the
// client reads them as.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "comm/coordinator_messages.h"

namespace archipelago::fuzz {

inline void checkAcceptedMembership(const comm::Membership& m) {
  const size_t world = m.addresses.size();
  if (m.islands.size() != world || m.pids.size() != world) __builtin_trap();
  for (const auto* list : {&m.alive, &m.failed}) {
    if (!std::is_sorted(list->begin(), list->end())) __builtin_trap();
    if (std::adjacent_find(list->begin(), list->end()) != list->end()) __builtin_trap();
    for (int r : *list) {
      if (r < 0 || static_cast<size_t>(r) >= world) __builtin_trap();
    }
  }
  for (int r : m.failed) {
    if (m.isAlive(r)) __builtin_trap();
  }
}

inline int fuzzCoordinatorReply(const uint8_t* data, size_t size) {
  auto j = comm::parseCoordinatorReply(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!j.isOk()) return 0;
  // What the client's calls read from an accepted reply, with the same calls.
  (void)j->value("epoch", 0u);
  (void)j->value("rank", -1);
  (void)j->value("value", "");
  auto m = comm::membershipFromJson(*j);
  if (m.isOk()) checkAcceptedMembership(*m);
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzCoordinatorReply themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzCoordinatorReply(data, size);
}
#endif
