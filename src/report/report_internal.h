// Helpers shared by report.cpp (reading, statistics) and report_html.cpp
// (charts, HTML); not part of the public API.
#pragma once

#include <string>
#include <vector>

#include "archipelago/report/report.h"

namespace archipelago::report::detail {

// Indices into run.steps with one entry per (step, rank), ordered by (step,
// rank): the last line wins (a step replayed after a restart from a
// checkpoint supersedes the first try).
std::vector<size_t> dedupedSteps(const RunData& run);

std::string fmtFixed(double v, int decimals);  // "n/a" for non-finite
std::string fmtCount(double v);                // 1234567 -> "1,234,567"
std::string fmtWall(double seconds);           // "42.1 s", "1h 02m 03s (3723 s)"

}  // namespace archipelago::report::detail
