// Arithmetic the planner's files share: counts enter the cost formulas as
// doubles, and a plan that cannot run costs infinity.
#pragma once

#include <cstdint>
#include <limits>

namespace archipelago::plan {

inline double d(int64_t v) { return static_cast<double>(v); }
inline constexpr double kInf = std::numeric_limits<double>::infinity();

}  // namespace archipelago::plan
