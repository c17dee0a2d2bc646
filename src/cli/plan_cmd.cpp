// archipelago plan CLUSTER MODEL ...  and  archipelago simulate PLAN.json ...
#include <cstdio>
#include <memory>

#include <fmt/format.h>

#include "archipelago/core/config.h"
#include "archipelago/core/files.h"
#include "archipelago/plan/calibration.h"
#include "archipelago/plan/catalog.h"
#include "archipelago/plan/layout_spec.h"
#include "archipelago/plan/model_spec.h"
#include "archipelago/plan/planner.h"
#include "archipelago/plan/simulator.h"
#include "cli/commands.h"

namespace archipelago::cli {
namespace {

struct PlanArgs {
  std::string cluster;
  std::string model;
  int64_t global_batch_tokens = 16 << 20;
  int64_t seq_len = 4096;
  int top = 5;
  bool json = false;
  bool explain = false;
  std::string out;
  std::vector<std::string> catalogs;
  std::string calibration;
  std::string strategy = "auto";
  int64_t diloco_h = 100;
  std::string dtype = "bf16";
  std::vector<std::string> layouts;  // --layout: price these instead of searching
};

struct SimArgs {
  std::string plan;
  PlanArgs fixed;  // --cluster, --model, --layout: simulate a user-given layout instead of a plan file
  std::string trace;
  double mtbf_hours = 0;
  double horizon_hours = 24 * 7;
  double checkpoint_write_s = 30;
  double restart_s = 600;
  bool json = false;
};

// What a search or a fixed layout is priced against.
struct Inputs {
  core::ClusterSpec cluster;
  plan::DeviceCatalog catalog;
  plan::ModelSpec model;
  std::unique_ptr<plan::CalibrationProfile> profile;
  plan::PlanOptions options;
};

core::Result<Inputs> loadInputs(const PlanArgs& a) {
  Inputs in;
  ARCH_ASSIGN_OR_RETURN(in.cluster, core::loadClusterSpec(a.cluster));
  ARCH_ASSIGN_OR_RETURN(in.catalog, plan::DeviceCatalog::builtin());
  for (const auto& c : a.catalogs) ARCH_RETURN_IF_ERROR(in.catalog.mergeFile(c));
  ARCH_ASSIGN_OR_RETURN(in.model, plan::resolveModel(a.model));
  if (!a.calibration.empty()) {
    ARCH_ASSIGN_OR_RETURN(plan::CalibrationProfile p, plan::CalibrationProfile::load(a.calibration));
    in.profile = std::make_unique<plan::CalibrationProfile>(std::move(p));
  }
  plan::PlanOptions& o = in.options;
  o.setup.global_batch_tokens = a.global_batch_tokens;
  o.setup.seq_len = a.seq_len;
  ARCH_ASSIGN_OR_RETURN(o.setup.compute_dtype, plan::parseDtype(a.dtype));
  o.top_k = a.top;
  o.strategy = a.strategy;
  o.diloco_h = a.diloco_h;
  return in;
}

// The plan of the user's --layout (docs/planner.md "Fixed layouts").
core::Result<plan::Plan> fixedPlan(const PlanArgs& a) {
  ARCH_ASSIGN_OR_RETURN(Inputs in, loadInputs(a));
  ARCH_ASSIGN_OR_RETURN(auto layouts, plan::parseLayouts(a.layouts, in.cluster));
  auto p = plan::evaluateLayout(in.cluster, in.model, in.catalog, in.options, layouts, in.profile.get());
  if (!p.isOk()) return p.status().withContext("the layout does not fit");
  return p;
}

core::Status runFixed(const PlanArgs& a) {
  ARCH_ASSIGN_OR_RETURN(plan::Plan p, fixedPlan(a));
  if (!a.out.empty()) ARCH_RETURN_IF_ERROR(core::writeFile(a.out, p.toJson() + "\n"));
  if (a.json) {
    std::fputs((p.toJson() + "\n").c_str(), stdout);
    return core::okStatus();
  }
  std::fputs(plan::formatPlan(p).c_str(), stdout);
  if (!a.out.empty()) std::printf("wrote the plan to %s (run: archipelago simulate %s)\n", a.out.c_str(), a.out.c_str());
  return core::okStatus();
}

core::Status runPlan(const PlanArgs& a) {
  if (!a.layouts.empty()) return runFixed(a);
  ARCH_ASSIGN_OR_RETURN(Inputs in, loadInputs(a));
  ARCH_ASSIGN_OR_RETURN(plan::PlanResult r, plan::searchPlans(in.cluster, in.model, in.catalog, in.options, in.profile.get()));
  if (!a.out.empty()) ARCH_RETURN_IF_ERROR(core::writeFile(a.out, r.plans.front().toJson() + "\n"));
  if (a.json) {
    std::string s = "{\"search_s\": " + fmt::format("{:.4f}", r.search_s) + ", \"evaluated\": " +
                    std::to_string(r.evaluated) + ", \"rejected\": {";
    bool first = true;
    for (const auto& [k, c] : r.rejected.counts) {
      s += fmt::format("{}\"{}\": {}", first ? "" : ", ", k, c);
      first = false;
    }
    s += "}, \"plans\": [";
    for (size_t i = 0; i < r.plans.size(); ++i) s += (i ? ",\n" : "\n") + r.plans[i].toJson();
    s += "]}\n";
    std::fputs(s.c_str(), stdout);
  } else {
    std::fputs(plan::formatPlans(r, a.explain).c_str(), stdout);
    if (!a.out.empty()) std::printf("wrote the best plan to %s (run: archipelago simulate %s)\n", a.out.c_str(), a.out.c_str());
  }
  return core::okStatus();
}

// The plan file, or the user's --layout on --cluster and --model.
core::Result<plan::Plan> planToSimulate(const SimArgs& a) {
  const bool fixed = !a.fixed.layouts.empty() || !a.fixed.cluster.empty() || !a.fixed.model.empty();
  if (fixed == !a.plan.empty()) {
    return core::invalidArgument("simulate: give a plan file, or --cluster, --model and --layout (not both)");
  }
  if (fixed) {
    if (a.fixed.layouts.empty() || a.fixed.cluster.empty() || a.fixed.model.empty()) {
      return core::invalidArgument("simulate: --layout needs --cluster and --model too");
    }
    return fixedPlan(a.fixed);
  }
  auto text = core::readFile(a.plan);
  if (!text.isOk()) return text.status().withContext("plan file (write one with `archipelago plan ... --out FILE`)");
  auto pr = plan::Plan::fromJson(*text);
  if (!pr.isOk()) return pr.status().withContext(a.plan);
  return pr;
}

core::Status runSimulate(const SimArgs& a) {
  ARCH_ASSIGN_OR_RETURN(const plan::Plan p, planToSimulate(a));
  plan::SimOptions so;
  so.trace = !a.trace.empty();
  ARCH_ASSIGN_OR_RETURN(plan::SimResult sr, plan::simulateStep(p, so));
  if (!a.trace.empty()) ARCH_RETURN_IF_ERROR(core::writeFile(a.trace, sr.trace_json));
  plan::GoodputResult gr;
  const bool failures = a.mtbf_hours > 0;
  if (failures) {
    plan::FailureOptions fo;
    fo.mtbf_hours = a.mtbf_hours;
    fo.horizon_hours = a.horizon_hours;
    fo.checkpoint_write_s = a.checkpoint_write_s;
    fo.restart_s = a.restart_s;
    gr = plan::simulateFailures(p, sr.step_s, fo);
  }
  if (a.json) {
    std::string s = fmt::format(
        "{{\"step_s\": {:.6g}, \"tokens_per_s\": {:.6g}, \"bubble_fraction\": {:.4f}, \"sync_exposed_s\": {:.6g}, "
        "\"planner_step_s\": {:.6g}, \"events\": {}",
        sr.step_s, sr.tokens_per_s, sr.bubble_fraction, sr.sync_exposed_s, p.step_s, sr.events);
    if (failures) {
      s += fmt::format(", \"failures\": {}, \"checkpoint_interval_s\": {:.1f}, \"checkpoint_goodput\": {:.4f}, "
                       "\"elastic_goodput\": {:.4f}",
                       gr.failures, gr.checkpoint_interval_s, gr.checkpoint_goodput, gr.elastic_goodput);
    }
    s += "}\n";
    std::fputs(s.c_str(), stdout);
    return core::okStatus();
  }
  std::printf("plan: %s on %s (%s)\n", p.model.c_str(), p.cluster.c_str(), p.summary.c_str());
  std::printf("simulated step %.3f s (planner %.3f s), %.4g tokens/s, bubble %.1f%%, cross-island sync exposed %.3f s, %lld events\n",
              sr.step_s, p.step_s, sr.tokens_per_s, 100 * sr.bubble_fraction, sr.sync_exposed_s,
              static_cast<long long>(sr.events));
  for (size_t g = 0; g < sr.group_step_s.size(); ++g) std::printf("  group %zu step %.3f s\n", g, sr.group_step_s[g]);
  if (!a.trace.empty()) std::printf("trace: %s (open in ui.perfetto.dev or chrome://tracing)\n", a.trace.c_str());
  if (failures) {
    std::printf("failures over %.0f h at MTBF %.0f h/device: %.0f drawn; goodput checkpoint-restart %.1f%% (interval %.0f s), elastic %.1f%%\n",
                a.horizon_hours, a.mtbf_hours, gr.failures, 100 * gr.checkpoint_goodput, gr.checkpoint_interval_s,
                100 * gr.elastic_goodput);
  }
  return core::okStatus();
}

}  // namespace

void addPlanCommands(CLI::App& app) {
  auto pa = std::make_shared<PlanArgs>();
  CLI::App* plan = app.add_subcommand("plan", "rank parallel layouts of a model on a cluster spec (no devices needed)");
  plan->add_option("cluster", pa->cluster, "cluster spec YAML (islands, straits)")->required();
  plan->add_option("model", pa->model, "model preset (llama3-405b, deepseek-v3, kimi-k2, ...) or job YAML")->required();
  plan->add_option("--global-batch-tokens", pa->global_batch_tokens, "tokens per optimizer step");
  plan->add_option("--seq-len", pa->seq_len, "sequence length");
  plan->add_option("--top", pa->top, "how many plans to show");
  plan->add_flag("--json", pa->json, "print JSON instead of a table");
  plan->add_flag("--explain", pa->explain, "show examples of rejected layouts per reason");
  plan->add_option("--out", pa->out, "write the best plan as JSON (input of `simulate`)");
  plan->add_option("--catalog", pa->catalogs, "extra device catalog YAML (overrides entries)");
  plan->add_option("--calibration", pa->calibration, "calibration profile JSON (measured FLOP/s)");
  plan->add_option("--strategy", pa->strategy, "cross-island strategy: auto|sync|diloco");
  plan->add_option("--diloco-h", pa->diloco_h, "DiLoCo inner steps H");
  plan->add_option("--dtype", pa->dtype, "matmul dtype: bf16|fp8|fp32");
  plan->add_option("--layout", pa->layouts,
                   "price this layout instead of searching, e.g. tp=8,pp=16,dp=12,mb=1,recompute=full; one per group "
                   "of islands (islands=A+B,...); keys in docs/planner.md");
  setAction(plan, [pa] { return runPlan(*pa); });

  auto sa = std::make_shared<SimArgs>();
  CLI::App* sim = app.add_subcommand("simulate", "discrete-event simulation of one step of a plan file");
  sim->add_option("plan", sa->plan, "plan JSON written by `archipelago plan --out` (or --cluster/--model/--layout)");
  sim->add_option("--cluster", sa->fixed.cluster, "with --layout: cluster spec YAML");
  sim->add_option("--model", sa->fixed.model, "with --layout: model preset or job YAML");
  sim->add_option("--layout", sa->fixed.layouts, "simulate this layout (the syntax of `plan --layout`)");
  sim->add_option("--global-batch-tokens", sa->fixed.global_batch_tokens, "with --layout: tokens per optimizer step");
  sim->add_option("--seq-len", sa->fixed.seq_len, "with --layout: sequence length");
  sim->add_option("--dtype", sa->fixed.dtype, "with --layout: matmul dtype bf16|fp8|fp32");
  sim->add_option("--strategy", sa->fixed.strategy, "with --layout: cross-island strategy sync|diloco");
  sim->add_option("--trace", sa->trace, "write a Chrome/Perfetto trace JSON");
  sim->add_option("--mtbf-hours", sa->mtbf_hours, "per-device MTBF; enables the failure/goodput simulation");
  sim->add_option("--horizon-hours", sa->horizon_hours, "failure simulation horizon");
  sim->add_option("--checkpoint-write-s", sa->checkpoint_write_s, "blocking checkpoint time");
  sim->add_option("--restart-s", sa->restart_s, "restart time after a failure (checkpoint-restart)");
  sim->add_flag("--json", sa->json, "print JSON");
  setAction(sim, [sa] { return runSimulate(*sa); });
}

}  // namespace archipelago::cli
