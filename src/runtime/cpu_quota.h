// A worker's CPU capped for real: the kernel's CPU bandwidth limit, so
// that islands on one machine differ in speed without an EMULATED sleep
// (docs/devices.md "Real heterogeneity on one machine"). The local launcher
// puts every worker it starts with a `cpu_quota` into a cgroup of its own;
// a standalone `archipelago worker` puts itself into one.
//
// Either hierarchy: cgroup v1's `cpu` controller (cpu.cfs_quota_us of
// every cpu.cfs_period_us), used where a v1 hierarchy carries it, else
// cgroup v2's (cpu.max = "quota period"), the default of current
// distributions (Debian 12, Ubuntu 22.04, RHEL 9).
//
// Layout: `<base>/archipelago-<pid>/rank<R>`, one parent per launcher (or
// standalone worker), one child per worker. v1: base = this process's
// cgroup in the cpu hierarchy. v2: base = this process's cgroup if the cpu
// controller is enabled for its children (cgroup.subtree_control) or it is
// the root (where it is then enabled); else its parent, which enables cpu
// for its children whenever this cgroup has it (cgroup.controllers) — v2
// lets no cgroup that holds processes, as ours does, hand controllers to
// children. The parent is owned by a CpuQuotaGroup, which removes it and
// its children when it goes, also when the job failed; a process still
// inside is moved back to the cgroup it came from first (a cgroup cannot be
// removed while it holds a task). Only a SIGKILLed owner leaves its (empty)
// cgroups.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/core/workers.h"

namespace archipelago::runtime {

// Where the cgroup files are found: the real ones, or a test's copies.
struct CgroupSources {
  std::string mounts = "/proc/mounts";
  std::string self_cgroup = "/proc/self/cgroup";
};

// The mount point of the cgroup v1 hierarchy whose options name the `cpu`
// controller (alone, or joined as in `cpu,cpuacct`), from the text of
// /proc/mounts (proc(5): device, mount point, type, options, ...); "" when
// none is mounted.
std::string cpuMountIn(std::string_view mounts_text);
// The mount point of the cgroup v2 (unified) hierarchy; "" when none.
std::string cgroup2MountIn(std::string_view mounts_text);

// This process's cgroup in the v1 hierarchy that carries `cpu`, from the
// text of /proc/self/cgroup (cgroups(7): "ID:controllers:path" per line);
// "/" when the file has no such line.
std::string cpuCgroupIn(std::string_view self_cgroup_text);
// The same in the v2 hierarchy (the "0::path" line); "/" when none.
std::string unifiedCgroupIn(std::string_view self_cgroup_text);

// Whether a controller list names `cpu`: comma-separated (v1's mount
// options and /proc/self/cgroup field) or space-separated (v2's
// cgroup.controllers and cgroup.subtree_control).
bool listsCpuController(std::string_view controllers);

// The hierarchy cpu_quota uses, from the text of /proc/mounts, and a
// process's cgroup in it, from the text of its /proc/<pid>/cgroup: v1
// where a v1 hierarchy carries `cpu` (a controller lives in one hierarchy
// only), else the unified one. version 0: neither is mounted.
struct CpuHierarchy {
  int version = 0;
  std::string mount;
  std::string cgroup = "/";
};
CpuHierarchy cpuHierarchyIn(std::string_view mounts_text, std::string_view proc_cgroup_text);

// Where a v2 group goes, decided from this process's cgroup `origin` (its
// directory), whether that is the hierarchy's root, and the text of its
// cgroup.subtree_control and cgroup.controllers (see the top of this file).
struct V2Base {
  std::string base;             // the directory archipelago-<pid> is made in
  bool enable_on_base = false;  // "+cpu" must be written to base's cgroup.subtree_control first (the root)
};
// kFailedPrecondition naming the cgroup, what it lists and the fix when
// the cpu controller is not available to it.
core::Result<V2Base> v2BaseFor(const std::string& origin, bool is_root, std::string_view subtree_control,
                               std::string_view controllers);

// cpu.cfs_quota_us for `quota` cores per `period_us`. kInvalidArgument when
// the kernel would refuse it: quota <= 0, or under its 1 ms minimum.
core::Result<int64_t> quotaMicros(double quota, int64_t period_us);

// The job field a worker's quota comes from, for errors and logs:
// "cluster.islands[1].cpu_quota".
std::string quotaField(const core::WorkerInfo& w);

// What one worker's cgroup was set to.
struct QuotaApplied {
  std::string path;  // the worker's cgroup directory
  int version = 1;   // cgroup v1 or v2
  double quota = 0;
  int64_t quota_us = 0, period_us = 0;
  // v1: "cgroup P: cpu.cfs_quota_us=Q of cpu.cfs_period_us=T (0.5 of a core)";
  // v2: "cgroup P: cpu.max=\"Q T\" (0.5 of a core)".
  std::string describe() const;
};

// The `archipelago-<pid>` cgroup of one owner and the workers' children in
// it. Not thread-safe: the launcher's supervising thread (or the worker's
// main thread) uses it alone.
class CpuQuotaGroup {
 public:
  // Creates the parent (see the top of this file). Errors name the cgroup
  // path and the fix: no `cpu` controller mounted or available to this
  // process's cgroup (kFailedPrecondition), no permission to create it
  // (kPermissionDenied: not root, or the hierarchy not delegated).
  static core::Result<std::unique_ptr<CpuQuotaGroup>> create(const CgroupSources& sources = {});
  ~CpuQuotaGroup();
  CpuQuotaGroup(const CpuQuotaGroup&) = delete;
  CpuQuotaGroup& operator=(const CpuQuotaGroup&) = delete;

  // The child `name` (created, or kept from an earlier call) with its
  // quota set to `quota` cores of its period.
  core::Result<QuotaApplied> limit(const std::string& name, double quota);
  // Moves the process `pid` (all its threads) into the child `name`.
  core::Status add(const std::string& name, pid_t pid);
  // Moves every process still in a child back to the cgroup this one was
  // created in and removes the children and the parent. Idempotent; the
  // destructor calls it (and logs what it could not remove).
  core::Status remove();

  const std::string& path() const { return path_; }
  int version() const { return version_; }
  // What limit() set on the child `name`; nullptr if it was not limited.
  const QuotaApplied* applied(const std::string& name) const {
    const auto it = children_.find(name);
    return it == children_.end() ? nullptr : &it->second;
  }
  // cpu.stat of the child `name` by key: nr_periods and nr_throttled in
  // both versions, throttled_time (ns) in v1, throttled_usec in v2; a key
  // the kernel does not write is absent.
  core::Result<std::vector<std::pair<std::string, int64_t>>> stat(const std::string& name) const;

 private:
  CpuQuotaGroup(int version, std::string origin, std::string path)
      : version_(version), origin_(std::move(origin)), path_(std::move(path)) {}
  int version_;         // 1 or 2
  std::string origin_;  // the cgroup the owner was in: processes go back there
  std::string path_;
  std::map<std::string, QuotaApplied> children_;  // by child name
  bool removed_ = false;
};

// A launcher's cgroups for `workers`: one child `rank<R>` per worker with
// cpu_quota > 0, each limited before any worker starts. nullptr when no
// worker has a quota. Errors name the worker's field
// (cluster.islands[i].cpu_quota) and the cgroup path.
core::Result<std::unique_ptr<CpuQuotaGroup>> cpuQuotaForWorkers(const std::vector<core::WorkerInfo>& workers,
                                                                const CgroupSources& sources = {});

// The child cgroup name of a rank: "rank3".
std::string quotaChildName(int rank);

// Set by the launcher in each capped worker's environment: the cgroup it
// was put into, so the worker does not apply its quota a second time.
inline constexpr const char* kCpuCgroupEnv = "ARCHIPELAGO_CPU_CGROUP";

// A standalone worker (no launcher's cgroup in kCpuCgroupEnv) with
// cpu_quota > 0 puts itself into `archipelago-<pid>/rank<R>`; the returned
// group is to be kept until the worker exits (nullptr: nothing to apply,
// or the launcher applied it). Logs what it applied.
core::Result<std::unique_ptr<CpuQuotaGroup>> applyOwnCpuQuota(const core::WorkerInfo& me,
                                                              const CgroupSources& sources = {});

}  // namespace archipelago::runtime
