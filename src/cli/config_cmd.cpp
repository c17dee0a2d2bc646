// archipelago config check|dump JOB.yaml [--set PATH=VALUE ...]
#include <cstdio>

#include "archipelago/core/config.h"
#include "archipelago/core/island_layout.h"
#include "archipelago/core/units.h"
#include "archipelago/plan/host_fit.h"
#include "cli/commands.h"

namespace archipelago::cli {
namespace {

struct ConfigArgs {
  std::string path;
  std::vector<std::string> sets;
  bool yaml = false;
};

void addJobArgs(CLI::App* sub, ConfigArgs& a) {
  sub->add_option("job", a.path, "job file (YAML)")->required();
  sub->add_option("--set", a.sets, "override a field: PATH=VALUE (e.g. train.lr=1e-3); repeatable");
}

}  // namespace

void addConfigCommands(CLI::App& app) {
  auto* config = app.add_subcommand("config", "check or show a job file");
  config->require_subcommand(1);
  static ConfigArgs args;

  auto* check = config->add_subcommand("check", "validate a job file; exits non-zero naming every bad field");
  addJobArgs(check, args);
  setAction(check, [] {
    core::LoadOptions opts;
    opts.sets = args.sets;
    ARCH_ASSIGN_OR_RETURN(auto loaded, core::loadJob(args.path, opts));
    const auto& c = loaded.job.cluster;
    // All workers on this machine, as `archipelago train` runs them.
    ARCH_ASSIGN_OR_RETURN(auto fit, plan::checkFitsHost(loaded.job, c.worldSize(), plan::thisHost()));
    std::printf("%s: OK (%zu islands, %lld workers, %zu straits, strategy %s, %lld steps)\n", args.path.c_str(),
                c.islands.size(), static_cast<long long>(c.worldSize()), c.straits.size(),
                loaded.job.strategy.kind.c_str(), static_cast<long long>(loaded.job.train.steps));
    std::printf("  this host: needs at least %.2f GiB for %lld workers of a %.3g-parameter model\n",
                fit.memory_lower_bytes / (1024.0 * 1024 * 1024), static_cast<long long>(fit.local_workers), fit.parameters);
    for (const auto& s : c.straits) {
      std::printf("  strait %s<->%s: %s, %s latency%s%s\n", s.a.c_str(), s.b.c_str(),
                  core::formatBandwidth(s.bandwidth).c_str(), core::formatDuration(s.latency).c_str(),
                  c.emulated(s) ? " (EMULATED in userspace)" : " (a real link: not shaped)", s.tls ? ", TLS" : "");
    }
    if (core::perIslandLayouts(loaded.job)) {
      std::printf("  per-island layouts (%s): data parallelism across islands by tensor name\n",
                  core::describeIslandLayouts(loaded.job).c_str());
    }
    const auto& sec = loaded.job.security;
    if (sec.tls) {
      std::printf("  TLS on every link (mutual, the job's CA): credentials %s\n",
                  sec.credentials.empty() ? "written into the run directory by `archipelago train`"
                                          : sec.credentials.c_str());
    }
    return core::okStatus();
  });

  auto* dump = config->add_subcommand("dump", "print every effective value and where it came from");
  addJobArgs(dump, args);
  dump->add_flag("--yaml", args.yaml, "print the effective job as YAML instead");
  setAction(dump, [] {
    core::LoadOptions opts;
    opts.sets = args.sets;
    ARCH_ASSIGN_OR_RETURN(auto loaded, core::loadJob(args.path, opts));
    if (args.yaml) {
      std::fputs(core::dumpJobYaml(loaded.job).c_str(), stdout);
      return core::okStatus();
    }
    size_t width = 0;
    for (const auto& v : loaded.values) width = std::max(width, v.first.size() + 3 + v.second.first.size());
    for (const auto& [path, vs] : loaded.values) {
      const auto& [value, src] = vs;
      std::string lhs = path + " = " + value;
      std::printf("%-*s  # %s%s%s\n", static_cast<int>(width), lhs.c_str(), src.kind.c_str(),
                  src.detail.empty() ? "" : " ", src.detail.c_str());
    }
    return core::okStatus();
  });
}

}  // namespace archipelago::cli
