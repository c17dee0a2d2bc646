#include "runtime/cpu_quota.h"

#include <fcntl.h>
#include <unistd.h>

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <thread>

#include "archipelago/core/clock.h"
#include "archipelago/core/files.h"
#include "archipelago/core/log.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;

namespace {

// The kernel's floor for a quota (kernel/sched/core.c: 1 ms; v1's
// cpu.cfs_quota_us and v2's cpu.max alike).
constexpr int64_t kMinQuotaUs = 1000;

// The period over which the kernel enforces a quota. Its default, 100 ms,
// is longer than a small model's whole step: a worker then runs at full
// speed for part of a period and stands still for the rest, and the stall
// lands in whichever phase it falls, compute or communication. Measured on
// the e2e job (tests/e2e/cpu_quota.sh, ~30 ms steps) the rebalancer, which
// times compute only, first moved shares the wrong way (8/8 -> 5/11).
// 10 ms spreads the cap over each phase; shorter ones cost more
// throttling events for little gain (the tick is 4 ms at HZ=250).
constexpr int64_t kQuotaPeriodUs = 10000;

// One value into a cgroup file. Cgroup files take one write(2) each: a
// buffered stream could split it, and its error would lose errno.
core::Status writeCgroupFile(const std::string& path, const std::string& value) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    const std::string why = std::strerror(e);
    if (e == EACCES || e == EPERM || e == EROFS) {
      return core::permissionDenied("cannot write " + path + ": " + why + " (run as root, or delegate the cgroup)");
    }
    return core::unavailable("cannot open " + path + ": " + why);
  }
  const ssize_t n = ::write(fd, value.data(), value.size());
  const int e = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(value.size())) {
    return core::unavailable("writing '" + value + "' to " + path + " failed: " + std::strerror(e));
  }
  return core::okStatus();
}

core::Result<int64_t> readCgroupNumber(const std::string& path) {
  ARCH_ASSIGN_OR_RETURN(const std::string text, core::readFile(path));
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str()) return core::dataLoss(path + " holds '" + text + "', not a number");
  return static_cast<int64_t>(v);
}

core::Status makeCgroupDir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) == 0 || errno == EEXIST) return core::okStatus();
  const int e = errno;
  const std::string why = std::strerror(e);
  if (e == EACCES || e == EPERM || e == EROFS) {
    return core::permissionDenied("cannot create cgroup " + path + ": " + why +
                                  " (run as root, or delegate that cgroup to this user; or set cpu_quota: 0)");
  }
  return core::unavailable("cannot create cgroup " + path + ": " + why);
}

// Moves every process in `from` to `to`, then removes `from`. A process
// that just exited may still be counted for a moment (EBUSY): retried for
// up to a second.
core::Status emptyAndRemove(const std::string& from, const std::string& to) {
  if (!fs::exists(from)) return core::okStatus();
  if (auto procs = core::readFile(from + "/cgroup.procs"); procs.isOk()) {
    std::stringstream in(*procs);
    std::string pid;
    while (in >> pid) {
      // A process that exits meanwhile (ESRCH) is gone from `from` anyway.
      (void)writeCgroupFile(to + "/cgroup.procs", pid);
    }
  }
  const auto t0 = core::Clock::now();
  while (::rmdir(from.c_str()) != 0) {
    if (errno == ENOENT) break;
    if (errno != EBUSY || core::secondsSince(t0) > 1.0) {
      return core::unavailable("cannot remove cgroup " + from + ": " + std::strerror(errno));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return core::okStatus();
}

std::string joinCgroup(const std::string& mount, const std::string& rel) {
  if (rel.empty() || rel == "/") return mount;
  return mount + (rel.front() == '/' ? "" : "/") + rel;
}

}  // namespace

std::string cpuMountIn(std::string_view mounts_text) {
  std::stringstream in{std::string(mounts_text)};
  std::string line;
  while (std::getline(in, line)) {
    std::stringstream f(line);
    std::string dev, dir, type, opts;
    if (!(f >> dev >> dir >> type >> opts) || type != "cgroup") continue;
    if (listsCpuController(opts)) return dir;
  }
  return "";
}

std::string cgroup2MountIn(std::string_view mounts_text) {
  std::stringstream in{std::string(mounts_text)};
  std::string line;
  while (std::getline(in, line)) {
    std::stringstream f(line);
    std::string dev, dir, type;
    if ((f >> dev >> dir >> type) && type == "cgroup2") return dir;
  }
  return "";
}

bool listsCpuController(std::string_view controllers) {
  std::string list(controllers);
  std::replace(list.begin(), list.end(), ',', ' ');
  std::stringstream in(list);
  std::string item;
  while (in >> item) {
    if (item == "cpu") return true;
  }
  return false;
}

std::string unifiedCgroupIn(std::string_view self_cgroup_text) {
  std::stringstream in{std::string(self_cgroup_text)};
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("0::", 0) == 0) return line.substr(3);
  }
  return "/";
}

core::Result<V2Base> v2BaseFor(const std::string& origin, bool is_root, std::string_view subtree_control,
                               std::string_view controllers) {
  if (listsCpuController(subtree_control)) return V2Base{origin, false};
  if (!listsCpuController(controllers)) {
    return core::failedPrecondition(
        "cgroup v2: the cpu controller is not available to " + origin + " (its cgroup.controllers lists '" +
        std::string(controllers) + "'" +
        (is_root ? ": the controller is bound to a cgroup v1 hierarchy or disabled on the kernel command line"
                 : ": its parent does not enable it; write +cpu to the parent's cgroup.subtree_control, or run "
                   "under a systemd unit with CPUAccounting=yes") +
        "), or set cpu_quota: 0");
  }
  // The root may hold processes and still enable controllers for its
  // children; any other cgroup that holds processes (ours: this process)
  // may not, so the group goes beside it, in the parent that enabled cpu.
  if (is_root) return V2Base{origin, true};
  return V2Base{fs::path(origin).parent_path().string(), false};
}

std::string cpuCgroupIn(std::string_view self_cgroup_text) {
  std::stringstream in{std::string(self_cgroup_text)};
  std::string line;
  while (std::getline(in, line)) {
    const auto a = line.find(':');
    const auto b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    if (listsCpuController(std::string_view(line).substr(a + 1, b - a - 1))) return line.substr(b + 1);
  }
  return "/";
}

core::Result<int64_t> quotaMicros(double quota, int64_t period_us) {
  if (!(quota > 0) || !std::isfinite(quota)) {
    return core::invalidArgument("got " + std::to_string(quota) + "; expected a share of one core > 0, e.g. 0.5");
  }
  const auto us = static_cast<int64_t>(std::llround(quota * static_cast<double>(period_us)));
  if (us < kMinQuotaUs) {
    return core::invalidArgument("got " + std::to_string(quota) + ": " + std::to_string(us) + " us of every " +
                                 std::to_string(period_us) + " us period is under the kernel's 1 ms minimum; use at least " +
                                 std::to_string(static_cast<double>(kMinQuotaUs) / static_cast<double>(period_us)));
  }
  return us;
}

CpuHierarchy cpuHierarchyIn(std::string_view mounts_text, std::string_view proc_cgroup_text) {
  if (std::string v1 = cpuMountIn(mounts_text); !v1.empty()) return {1, std::move(v1), cpuCgroupIn(proc_cgroup_text)};
  if (std::string v2 = cgroup2MountIn(mounts_text); !v2.empty()) {
    return {2, std::move(v2), unifiedCgroupIn(proc_cgroup_text)};
  }
  return {};
}

std::string quotaField(const core::WorkerInfo& w) {
  return "cluster.islands[" + std::to_string(w.island_index) + "].cpu_quota";
}

std::string quotaChildName(int rank) { return "rank" + std::to_string(rank); }

std::string QuotaApplied::describe() const {
  if (version == 2) return fmt::format("cgroup {}: cpu.max=\"{} {}\" ({} of a core)", path, quota_us, period_us, quota);
  return fmt::format("cgroup {}: cpu.cfs_quota_us={} of cpu.cfs_period_us={} ({} of a core)", path, quota_us,
                     period_us, quota);
}

core::Result<std::unique_ptr<CpuQuotaGroup>> CpuQuotaGroup::create(const CgroupSources& sources) {
  auto mounts = core::readFile(sources.mounts);
  auto self = core::readFile(sources.self_cgroup);
  const CpuHierarchy h = cpuHierarchyIn(mounts.isOk() ? *mounts : "", self.isOk() ? *self : "");
  const std::string pid_dir = "archipelago-" + std::to_string(::getpid());
  const std::string origin = joinCgroup(h.mount, h.cgroup);
  if (h.version == 1) {
    const std::string path = origin + "/" + pid_dir;
    ARCH_RETURN_IF_ERROR(makeCgroupDir(path));
    return std::unique_ptr<CpuQuotaGroup>(new CpuQuotaGroup(1, origin, path));
  }
  if (h.version == 0) {
    return core::failedPrecondition("no cgroup `cpu` controller is mounted (" + sources.mounts +
                                    " lists no cgroup v1 hierarchy with cpu and no cgroup2): mount one, e.g. `mount -t "
                                    "cgroup2 none /sys/fs/cgroup`, or set cpu_quota: 0");
  }
  const bool is_root = h.cgroup.empty() || h.cgroup == "/";
  auto subtree = core::readFile(origin + "/cgroup.subtree_control");
  auto controllers = core::readFile(origin + "/cgroup.controllers");
  if (!subtree.isOk() || !controllers.isOk()) {
    return core::failedPrecondition("cgroup v2 at " + h.mount + ": cannot read the cgroup.subtree_control and "
                                    "cgroup.controllers of this process's cgroup " + origin +
                                    " (is it a cgroup2 mount?), or set cpu_quota: 0");
  }
  ARCH_ASSIGN_OR_RETURN(const V2Base b, v2BaseFor(origin, is_root, *subtree, *controllers));
  // Left enabled afterwards: other cgroups may have come to rely on it.
  if (b.enable_on_base) ARCH_RETURN_IF_ERROR(writeCgroupFile(b.base + "/cgroup.subtree_control", "+cpu"));
  const std::string path = b.base + "/" + pid_dir;
  ARCH_RETURN_IF_ERROR(makeCgroupDir(path));
  auto group = std::unique_ptr<CpuQuotaGroup>(new CpuQuotaGroup(2, origin, path));
  // Its children get the controller; it holds no process itself.
  ARCH_RETURN_IF_ERROR(writeCgroupFile(path + "/cgroup.subtree_control", "+cpu"));
  return group;
}

CpuQuotaGroup::~CpuQuotaGroup() {
  if (const core::Status st = remove(); !st.isOk()) ARCH_LOG_WARN("cpu_quota: {}", st.message());
}

core::Result<QuotaApplied> CpuQuotaGroup::limit(const std::string& name, double quota) {
  QuotaApplied a;
  a.path = path_ + "/" + name;
  a.quota = quota;
  a.version = version_;
  ARCH_RETURN_IF_ERROR(makeCgroupDir(a.path));
  children_[name] = a;  // from here on remove() owns it, whatever fails below
  a.period_us = kQuotaPeriodUs;
  ARCH_ASSIGN_OR_RETURN(a.quota_us, quotaMicros(quota, a.period_us));
  // Read back: a parent's own limit can make the kernel refuse or clamp it.
  const std::string file = a.path + (version_ == 2 ? "/cpu.max" : "/cpu.cfs_quota_us");
  if (version_ == 2) {
    ARCH_RETURN_IF_ERROR(writeCgroupFile(file, std::to_string(a.quota_us) + " " + std::to_string(a.period_us)));
  } else {
    ARCH_RETURN_IF_ERROR(writeCgroupFile(a.path + "/cpu.cfs_period_us", std::to_string(a.period_us)));
    ARCH_RETURN_IF_ERROR(writeCgroupFile(file, std::to_string(a.quota_us)));
  }
  ARCH_ASSIGN_OR_RETURN(const int64_t got, readCgroupNumber(file));  // v2: "quota period", quota first
  if (got != a.quota_us) {
    return core::unavailable(file + " reads " + std::to_string(got) + " after writing " + std::to_string(a.quota_us));
  }
  children_[name] = a;
  return a;
}

core::Status CpuQuotaGroup::add(const std::string& name, pid_t pid) {
  return writeCgroupFile(path_ + "/" + name + "/cgroup.procs", std::to_string(pid));
}

core::Status CpuQuotaGroup::remove() {
  if (removed_) return core::okStatus();
  removed_ = true;
  core::Status first;
  for (const auto& [name, a] : children_) {
    core::Status st = emptyAndRemove(a.path, origin_);
    if (first.isOk() && !st.isOk()) first = std::move(st);
  }
  core::Status st = emptyAndRemove(path_, origin_);
  if (first.isOk() && !st.isOk()) first = std::move(st);
  return first;
}

core::Result<std::vector<std::pair<std::string, int64_t>>> CpuQuotaGroup::stat(const std::string& name) const {
  ARCH_ASSIGN_OR_RETURN(const std::string text, core::readFile(path_ + "/" + name + "/cpu.stat"));
  std::vector<std::pair<std::string, int64_t>> out;
  std::stringstream in(text);
  std::string key;
  int64_t v = 0;
  while (in >> key >> v) out.emplace_back(key, v);
  return out;
}

core::Result<std::unique_ptr<CpuQuotaGroup>> cpuQuotaForWorkers(const std::vector<core::WorkerInfo>& workers,
                                                                const CgroupSources& sources) {
  const core::WorkerInfo* first = nullptr;
  for (const auto& w : workers) {
    if (w.cpu_quota > 0 && !first) first = &w;
  }
  if (!first) return std::unique_ptr<CpuQuotaGroup>();
  auto made = CpuQuotaGroup::create(sources);
  if (!made.isOk()) {
    return made.status().withContext(quotaField(*first) + " " + fmt::format("{}", first->cpu_quota) +
                                     " cannot be applied");
  }
  std::unique_ptr<CpuQuotaGroup> group = std::move(made).value();
  for (const auto& w : workers) {
    if (w.cpu_quota <= 0) continue;
    auto a = group->limit(quotaChildName(w.rank), w.cpu_quota);
    if (!a.isOk()) {
      return a.status().withContext(fmt::format("{} {} (rank {}, island {}) cannot be applied", quotaField(w),
                                                w.cpu_quota, w.rank, w.island));
    }
  }
  return group;
}

core::Result<std::unique_ptr<CpuQuotaGroup>> applyOwnCpuQuota(const core::WorkerInfo& me,
                                                              const CgroupSources& sources) {
  if (me.cpu_quota <= 0) return std::unique_ptr<CpuQuotaGroup>();
  if (const char* set = std::getenv(kCpuCgroupEnv); set && *set) {
    ARCH_LOG_INFO("cpu_quota {} ({}): applied by the launcher, cgroup {}", me.cpu_quota, quotaField(me), set);
    return std::unique_ptr<CpuQuotaGroup>();
  }
  ARCH_ASSIGN_OR_RETURN(auto group, cpuQuotaForWorkers({me}, sources));
  const std::string name = quotaChildName(me.rank);
  if (const core::Status st = group->add(name, ::getpid()); !st.isOk()) {
    return st.withContext(fmt::format("{} {} cannot be applied", quotaField(me), me.cpu_quota));
  }
  ARCH_LOG_INFO("cpu_quota {} ({}) on rank {}: {}", me.cpu_quota, quotaField(me), me.rank,
                group->applied(name)->describe());
  return group;
}

}  // namespace archipelago::runtime
