// A parallel layout written by a user on the command line, for `plan` and
// `simulate` what-if questions without C++ (docs/planner.md "Fixed
// layouts"):
//
//   --layout tp=8,pp=16,dp=12,mb=1,recompute=full
//   --layout islands=east,tp=2,pp=2 --layout islands=west,pp=4
//   --layout islands=a+b,tp=8,pp=4+4,vpp=2,schedule=interleaved
//
// One --layout per group of islands. Without `islands=` the one layout is
// applied to every island as a group of its own. Keys: islands (names or
// indices joined by '+', pipeline order), tp and pp (one value, or one per
// island joined by '+'), dp (default: the most the smallest island fits),
// ep, mb, vpp, schedule (1f1b|interleaved|dualpipe), recompute
// (none|selective|full), zero (1|2|3), stages (layer items per stage,
// joined by '+'; default: balanced by the planner).
#pragma once

#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/plan/planner.h"

namespace archipelago::plan {

// Errors name the --layout, the key and what is expected.
core::Result<std::vector<FixedLayout>> parseLayouts(const std::vector<std::string>& specs,
                                                    const core::ClusterSpec& cluster);

// "tp=8,pp=16,dp=12,mb=1,recompute=full,..." of a layout (what parseLayouts reads).
std::string formatLayout(const FixedLayout& layout, const core::ClusterSpec& cluster);

}  // namespace archipelago::plan
