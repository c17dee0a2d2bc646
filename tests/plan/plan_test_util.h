// Fixtures shared by the planner tests: the built-in device catalog, an
// island of `count` devices of one kind (8 per node), and the 3-island
// cluster of 10,240 devices (H100, MI300X, Ascend 910B) joined by 3.2, 1.6
// and 0.8 Tbit/s straits.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

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

inline core::ClusterSpec triDc(double latency_s) {
  core::ClusterSpec c;
  c.name = "tri";
  c.islands = {island("east", "h100", 4096), island("west", "mi300x", 4096), island("north", "ascend910b", 2048)};
  for (auto [a, b, bw] : {std::tuple{"east", "west", 3.2e12}, {"east", "north", 1.6e12}, {"west", "north", 0.8e12}}) {
    core::StraitSpec s;
    s.a = a;
    s.b = b;
    s.bandwidth = bw / 8;
    s.latency = latency_s;
    c.straits.push_back(s);
  }
  return c;
}

}  // namespace archipelago::plan::testing
