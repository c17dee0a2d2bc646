#include "archipelago/plan/host_fit.h"

#include <sys/resource.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {

namespace {

std::string gib(double bytes) { return fmt::format("{:.1f} GiB", bytes / (1024.0 * 1024 * 1024)); }

// The first number in `path`, or -1 (absent, or "max": no limit).
double readNumber(const std::string& path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word)) return -1;
  try {
    return std::stod(word);
  } catch (const std::exception&) {
    return -1;
  }
}

int64_t softLimit(int resource) {
  struct rlimit r {};
  if (::getrlimit(resource, &r) != 0 || r.rlim_cur == RLIM_INFINITY) return 0;
  return static_cast<int64_t>(r.rlim_cur);
}

}  // namespace

HostResources thisHost() {
  HostResources h;
  std::ifstream info("/proc/meminfo");
  std::string line;
  while (std::getline(info, line)) {
    std::istringstream in(line);
    std::string key;
    double kb = 0;
    if (in >> key >> kb && key == "MemAvailable:") {
      h.memory_bytes = kb * 1024;
      h.memory_source = "MemAvailable";
    }
  }
  // A container's limit is lower than the machine's free memory.
  for (const char* path : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    const double limit = readNumber(path);
    if (limit > 0 && limit < 1e18 && (h.memory_bytes <= 0 || limit < h.memory_bytes)) {
      h.memory_bytes = limit;
      h.memory_source = std::string("cgroup ") + path;
    }
  }
  h.max_processes = softLimit(RLIMIT_NPROC);
  h.max_open_files = softLimit(RLIMIT_NOFILE);
  return h;
}

core::Result<HostFit> checkFitsHost(const core::JobConfig& job, int64_t local_workers, const HostResources& host) {
  HostFit fit;
  fit.local_workers = local_workers;
  ARCH_ASSIGN_OR_RETURN(ModelSpec m, fromModelConfig(job.model));
  fit.parameters = m.totalParams();
  const int64_t world = std::max<int64_t>(1, job.cluster.worldSize());
  // Pipeline stages, expert groups and tensor-parallel groups divide the
  // model (TP: all but the small replicated norms); data-parallel replicas
  // (and ZeRO-1's moment shards) multiply and divide its copies.
  const int64_t split = std::max<int64_t>(1, job.strategy.pipeline_stages) *
                        std::max<int64_t>(1, job.strategy.expert_parallel) *
                        std::max<int64_t>(1, job.strategy.tensor_parallel);
  const double per_worker = fit.parameters / static_cast<double>(split);
  const double local = per_worker * static_cast<double>(local_workers);
  const double moment_share = core::zeroStage(job.train) >= 1 ? 1.0 / std::max<double>(1.0, static_cast<double>(world / split)) : 1.0;
  fit.memory_lower_bytes = 8.0 * local + 8.0 * local * moment_share + static_cast<double>(local_workers) * kWorkerProcessBytes;
  if (host.memory_bytes > 0 && fit.memory_lower_bytes > host.memory_bytes) {
    return core::resourceExhausted(fmt::format(
        "the job needs at least {} of memory on this host ({} worker(s) holding {:.3g} parameters each: 8 bytes of "
        "fp32 weights and gradient per parameter, 8 of AdamW moments{}, and {} per worker process) but {} are "
        "available ({}): make the model smaller (model.dim, model.n_layers), use fewer workers here, or spread it "
        "over more hosts",
        gib(fit.memory_lower_bytes), local_workers, per_worker, core::zeroStage(job.train) >= 1 ? " (sharded, ZeRO-1)" : "",
        fmt::format("{:.0f} MB", kWorkerProcessBytes / 1e6), gib(host.memory_bytes), host.memory_source));
  }
  const int64_t threads = local_workers * kWorkerThreads;
  if (host.max_processes > 0 && threads > host.max_processes) {
    return core::resourceExhausted(fmt::format(
        "{} workers need at least {} threads on this host ({} each) but the process limit (ulimit -u) is {}: "
        "use fewer workers here or raise the limit",
        local_workers, threads, kWorkerThreads, host.max_processes));
  }
  if (host.max_open_files > 0 && world + 64 > host.max_open_files) {
    return core::resourceExhausted(fmt::format(
        "each of {} workers opens a stream to every peer, more than the open-file limit (ulimit -n) of {} allows: "
        "raise the limit (ulimit -n {}) or use fewer workers",
        world, host.max_open_files, 2 * world + 64));
  }
  return fit;
}

}  // namespace archipelago::plan
