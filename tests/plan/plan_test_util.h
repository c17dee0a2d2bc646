// Fixtures shared by the planner tests: the built-in device catalog and an
// island of `count` devices of one kind (8 per node).
#pragma once

#include <cstdint>
#include <string>

#include <gtest/gtest.h>

#include "archipelago/core/config.h"
#include "archipelago/plan/catalog.h"

namespace archipelago::plan::testing {

inline DeviceCatalog catalog() {
  auto c = DeviceCatalog::builtin();
  EXPECT_TRUE(c.isOk()) << c.status().toString();
  return *c;
}

inline core::IslandSpec island(const std::string& name, const std::string& dev, int64_t count) {
  core::IslandSpec is;
  is.name = name;
  is.device = dev;
  is.count = count;
  is.devices_per_node = 8;
  return is;
}

}  // namespace archipelago::plan::testing
