// bench_plan: planning time for the headline cases (a 1T-A32B MoE and a
// dense 175B on 10,240 devices in 3 islands of 3 device kinds), plus the
// simulator on the best plan (its step next to the planner's). Prints a table
// and one JSON line per case.
#include <chrono>
#include <cstdio>

#include "archipelago/plan/planner.h"
#include "archipelago/plan/simulator.h"

using namespace archipelago;

namespace {
core::ClusterSpec triDc() {
  core::ClusterSpec c;
  c.name = "tri-dc-10k";
  auto add = [&](const char* n, const char* d, int64_t count) {
    core::IslandSpec is;
    is.name = n;
    is.device = d;
    is.count = count;
    is.devices_per_node = 8;
    c.islands.push_back(is);
  };
  add("dc-east", "h100", 4096);
  add("dc-west", "mi300x", 4096);
  add("dc-north", "ascend910b", 2048);
  auto strait = [&](const char* a, const char* b, double gbit, double ms) {
    core::StraitSpec s;
    s.a = a;
    s.b = b;
    s.bandwidth = gbit * 1e9 / 8;
    s.latency = ms / 1e3;
    c.straits.push_back(s);
  };
  strait("dc-east", "dc-west", 3200, 30);
  strait("dc-east", "dc-north", 1600, 20);
  strait("dc-west", "dc-north", 800, 45);
  return c;
}
}  // namespace

int main() {
  auto catalog = plan::DeviceCatalog::builtin();
  if (!catalog.isOk()) {
    std::fprintf(stderr, "%s\n", catalog.status().toString().c_str());
    return 1;
  }
  const core::ClusterSpec cluster = triDc();
  std::printf("%-12s %8s %10s %12s %8s %10s %10s %7s  %s\n", "model", "devices", "search s", "tokens/s", "MFU", "plan step",
              "sim step", "diff", "best plan");
  for (const char* name : {"kimi-k2", "gpt3-175b", "deepseek-v3", "llama3-405b"}) {
    auto model = plan::preset(name);
    plan::PlanOptions o;
    o.setup.seq_len = 4096;
    o.setup.global_batch_tokens = 16 << 20;
    const auto t0 = std::chrono::steady_clock::now();
    auto r = plan::searchPlans(cluster, *model, *catalog, o);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!r.isOk()) {
      std::fprintf(stderr, "%s: %s\n", name, r.status().toString().c_str());
      return 1;
    }
    const auto& best = r->plans.front();
    const auto t1 = std::chrono::steady_clock::now();
    auto sim = plan::simulateStep(best);
    const double sim_wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    const double sim_step = sim.isOk() ? sim->step_s : -1.0;
    std::printf("%-12s %8lld %10.3f %12.4g %7.1f%% %9.3fs %9.3fs %+6.1f%%  %s: %s\n", name,
                static_cast<long long>(best.devices), wall, best.tokens_per_s, 100 * best.mfu, best.step_s, sim_step,
                100 * (sim_step / best.step_s - 1), best.strategy.c_str(), best.summary.c_str());
    std::printf("{\"bench\": \"plan\", \"model\": \"%s\", \"cluster_devices\": 10240, \"islands\": 3, \"device_kinds\": 3, "
                "\"search_s\": %.4f, \"evaluated\": %lld, \"plan_devices\": %lld, \"step_s\": %.4f, \"tokens_per_s\": %.6g, "
                "\"mfu\": %.4f, \"sim_step_s\": %.4f, \"sim_s\": %.4f, \"strategy\": \"%s\", \"limit_s\": 10, \"pass\": %s}\n",
                name, wall, static_cast<long long>(r->evaluated), static_cast<long long>(best.devices), best.step_s,
                best.tokens_per_s, best.mfu, sim.isOk() ? sim->step_s : -1.0, sim_wall, best.strategy.c_str(),
                wall < 10 ? "true" : "false");
  }
  return 0;
}
