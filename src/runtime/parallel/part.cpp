#include "archipelago/runtime/parallel/part.h"

#include <algorithm>
#include <chrono>
#include <thread>

namespace archipelago::runtime::parallel {

core::Status Part::forwardBackward(const StepInput&, StepStats&) {
  return core::internalError("parallel part '" + name() + "' does not run forward/backward (not a schedule)");
}

core::Status Part::evaluate(const data::Batch&, int64_t, double&, double&) {
  return core::internalError("parallel part '" + name() + "' does not evaluate (not a schedule)");
}

core::Status guardStep(const std::string& what, const std::function<core::Status()>& body,
                       const std::vector<const core::Status*>& thrown) {
  try {
    core::Status st = body();
    return st.isOk() ? st : st.withContext(what);
  } catch (const std::exception& e) {
    for (const core::Status* t : thrown) {
      if (!t->isOk()) return t->withContext(what);
    }
    return core::internalError(what + ": " + e.what());
  }
}

double EmulatedSlowdown::sleep(double extra_s, TraceRecorder* trace, const std::string& what) {
  if (extra_s <= 0) return 0;
  ScopedSpan span(trace, TraceRecorder::kCompute, what.empty() ? "emulated slowdown" : "emulated slowdown " + what);
  std::this_thread::sleep_for(std::chrono::duration<double>(extra_s));
  return extra_s;
}

double EmulatedSlowdown::stretch(double compute_s, TraceRecorder* trace, const std::string& what) {
  if (factor_ <= 1.0) return 0;
  return sleep((factor_ - 1.0) * compute_s, trace, what);
}

double EmulatedSlowdown::stretchOp(double compute_s, TraceRecorder* trace, const std::string& op, int64_t rows) {
  if (factor_ <= 1.0) return 0;
  auto [it, fresh] = fastest_.try_emplace({op, rows}, compute_s);
  if (!fresh) it->second = std::min(it->second, compute_s);
  return sleep(std::max(0.0, factor_ * it->second - compute_s), trace, op);
}

}  // namespace archipelago::runtime::parallel
