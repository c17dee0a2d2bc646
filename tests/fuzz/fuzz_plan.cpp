// libFuzzer target: a plan file (Plan::fromJson), the input of
// `archipelago simulate`, then the simulator on what was accepted.
// Corpus: tests/fuzz/corpus/plan. CI runs it through
// tests/plan/fuzz_smoke_test.cpp.
//
// Invariants of an accepted plan: at least one group, every group with a
// stage, at least one micro-batch and virtual stage, micro-batches a
// multiple of the stages when interleaved; every link number
// names one of Plan::links (the simulator indexes with them); writing it
// back reads back to the same text; formatting and simulating it (when
// small enough to be quick) neither crash nor throw.
#include <cstddef>
#include <cstdint>
#include <string>

#include "archipelago/plan/planner.h"
#include "archipelago/plan/simulator.h"

namespace archipelago::fuzz {

// Operations of one simulated step (0 when the plan is not simulable).
inline int64_t checkAcceptedPlan(const plan::Plan& p) {
  const int64_t links = static_cast<int64_t>(p.links.size());
  if (p.groups.empty()) __builtin_trap();
  int64_t ops = 0;
  for (const auto& g : p.groups) {
    if (g.stages.empty() || g.micro_batches < 1 || g.virtual_stages < 1) __builtin_trap();
    // The interleaved schedule deals micro-batches in rounds of one per stage.
    if (g.virtual_stages > 1 && g.micro_batches % static_cast<int64_t>(g.stages.size()) != 0) __builtin_trap();
    for (const auto& s : g.stages) {
      if (s.p2p_link < -1 || s.p2p_link >= links || s.dp_link < 0 || s.dp_link >= links) __builtin_trap();
    }
    int64_t n = 0;
    if (__builtin_mul_overflow(g.micro_batches, g.virtual_stages, &n) ||
        __builtin_mul_overflow(n, static_cast<int64_t>(g.stages.size()), &n) || __builtin_add_overflow(ops, n, &ops)) {
      ops = INT64_MAX;
    }
  }
  for (const auto& [link, bytes] : p.sync_flows) {
    if (link < 0 || link >= links) __builtin_trap();
  }
  return ops;
}

inline int fuzzPlan(const uint8_t* data, size_t size) {
  auto p = plan::Plan::fromJson(std::string(reinterpret_cast<const char*>(data), size));
  if (!p.isOk()) return 0;
  const int64_t ops = checkAcceptedPlan(*p);
  const std::string text = p->toJson();
  auto back = plan::Plan::fromJson(text);
  if (!back.isOk() || back->toJson() != text) __builtin_trap();
  (void)plan::formatPlan(*p);
  // The simulator refuses big steps itself; here only small ones run so
  // that one input stays fast.
  if (ops <= 4096) {
    plan::SimOptions so;
    so.trace = true;
    (void)plan::simulateStep(*p, so);
  }
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzPlan themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzPlan(data, size);
}
#endif
