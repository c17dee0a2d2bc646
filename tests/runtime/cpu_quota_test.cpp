// runtime/cpu_quota.h: parsing /proc/mounts and /proc/self/cgroup against
// the formats proc(5) and cgroups(7) publish, where a v2 group goes, and,
// where this machine has a `cpu` controller (cgroup v1 or v2) and we are
// root, the kernel's own account of a capped process (cpu.stat's
// throttling counters, the child's CPU time from wait4) and the cleanup.
// Skipped with the reason elsewhere.
#include "runtime/cpu_quota.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/files.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;

// Why the real-cgroup tests cannot run here ("" when they can).
std::string cgroupsUnavailable() {
  if (::geteuid() != 0) return "not root: creating cgroups needs root (or a delegated hierarchy)";
  auto probe = CpuQuotaGroup::create();
  if (!probe.isOk()) return probe.status().message();
  return "";
}

#define SKIP_WITHOUT_CGROUPS()                                \
  do {                                                        \
    const std::string why = cgroupsUnavailable();             \
    if (!why.empty()) GTEST_SKIP() << "cgroups: " << why;     \
  } while (0)

int64_t statOf(const CpuQuotaGroup& g, const std::string& child, const std::string& key) {
  auto st = g.stat(child);
  if (!st.isOk()) return -1;
  for (const auto& [k, v] : *st) {
    if (k == key) return v;
  }
  return -1;
}

// The hierarchy CpuQuotaGroup uses here, and `pid`'s cgroup in it.
CpuHierarchy hierarchyOfPid(pid_t pid) {
  auto text = core::readFile("/proc/" + std::to_string(pid) + "/cgroup");
  auto mounts = core::readFile("/proc/mounts");
  return cpuHierarchyIn(mounts.isOk() ? *mounts : "", text.isOk() ? *text : "");
}

std::string cpuCgroupOfPid(pid_t pid) { return hierarchyOfPid(pid).cgroup; }

// A child that waits for one byte on `go`, then runs `body` and exits.
template <class F>
pid_t forkWaiting(int go_read, F body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    char c = 0;
    if (::read(go_read, &c, 1) != 1) std::_Exit(3);
    std::_Exit(body());
  }
  return pid;
}

TEST(CpuQuota, FindsTheCpuHierarchyInProcMounts) {
  // proc(5): device, mount point, type, options, dump, pass.
  EXPECT_EQ(cpuMountIn("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
                       "cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n"
                       "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"),
            "/sys/fs/cgroup/cpu");
  EXPECT_EQ(cpuMountIn("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"),
            "/sys/fs/cgroup/cpu,cpuacct");
  // cpuset and cpuacct are other controllers; cgroup2 has no v1 `cpu`.
  EXPECT_EQ(cpuMountIn("cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n"
                       "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n"),
            "");
  EXPECT_EQ(cpuMountIn(""), "");
}

TEST(CpuQuota, FindsItsOwnCgroupInProcSelfCgroup) {
  // cgroups(7): "hierarchy-ID:controller-list:cgroup-path"; v2's line is
  // "0::cgroup-path".
  EXPECT_EQ(cpuCgroupIn("3:cpuset:/\n2:cpu,cpuacct:/user.slice/job\n0::/\n"), "/user.slice/job");
  EXPECT_EQ(cpuCgroupIn("2:cpuacct:/a\n1:cpu:/b\n"), "/b");
  EXPECT_EQ(cpuCgroupIn("0::/unified-only\n"), "/");
  EXPECT_EQ(unifiedCgroupIn("0::/user.slice/user-0.slice/session-3.scope\n"), "/user.slice/user-0.slice/session-3.scope");
  EXPECT_EQ(unifiedCgroupIn("4:memory:/m\n0::/\n"), "/");
  EXPECT_EQ(unifiedCgroupIn("1:cpu:/b\n"), "/");
}

TEST(CpuQuota, FindsTheUnifiedHierarchyInProcMounts) {
  EXPECT_EQ(cgroup2MountIn("tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"),
            "/sys/fs/cgroup/unified");
  EXPECT_EQ(cgroup2MountIn("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nsdelegate 0 0\n"), "/sys/fs/cgroup");
  EXPECT_EQ(cgroup2MountIn("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"), "");
  // cgroup.controllers / cgroup.subtree_control: space-separated names;
  // v1 mount options and /proc/self/cgroup: comma-separated.
  EXPECT_TRUE(listsCpuController("cpuset cpu io memory pids\n"));
  EXPECT_FALSE(listsCpuController("cpuset io memory hugetlb\n"));
  EXPECT_TRUE(listsCpuController("rw,relatime,cpu,cpuacct"));
  EXPECT_FALSE(listsCpuController("rw,cpuacct"));
  EXPECT_FALSE(listsCpuController(""));
}

TEST(CpuQuota, UsesV1WhereItCarriesCpuElseTheUnifiedHierarchy) {
  const std::string self = "2:cpu,cpuacct:/job\n0::/user.slice/s.scope\n";
  const CpuHierarchy both = cpuHierarchyIn(
      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\ncgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n",
      self);
  EXPECT_EQ(both.version, 1);
  EXPECT_EQ(both.mount, "/sys/fs/cgroup/cpu,cpuacct");
  EXPECT_EQ(both.cgroup, "/job");
  const CpuHierarchy v2 = cpuHierarchyIn("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n", self);
  EXPECT_EQ(v2.version, 2);
  EXPECT_EQ(v2.mount, "/sys/fs/cgroup");
  EXPECT_EQ(v2.cgroup, "/user.slice/s.scope");
  EXPECT_EQ(cpuHierarchyIn("tmpfs /run tmpfs rw 0 0\n", self).version, 0);
}

// cgroup v2 lets no non-root cgroup that holds processes give controllers
// to its children (cgroups(7), "no internal processes" rule).
TEST(CpuQuota, AV2GroupGoesWhereTheCpuControllerReachesItsChildren) {
  // Already enabled for this cgroup's children (a delegated subtree).
  auto here = v2BaseFor("/sys/fs/cgroup/job", false, "cpu memory\n", "cpu memory\n");
  ASSERT_TRUE(here.isOk());
  EXPECT_EQ(here->base, "/sys/fs/cgroup/job");
  EXPECT_FALSE(here->enable_on_base);
  // The usual systemd case: this process's scope has cpu, given by its
  // parent slice, and enables nothing itself: the group goes in the slice.
  auto beside = v2BaseFor("/sys/fs/cgroup/user.slice/session-3.scope", false, "\n", "cpuset cpu io memory pids\n");
  ASSERT_TRUE(beside.isOk());
  EXPECT_EQ(beside->base, "/sys/fs/cgroup/user.slice");
  EXPECT_FALSE(beside->enable_on_base);
  // The root (a container's or the host's): enabled there first.
  auto root = v2BaseFor("/sys/fs/cgroup", true, "memory\n", "cpu memory hugetlb\n");
  ASSERT_TRUE(root.isOk());
  EXPECT_EQ(root->base, "/sys/fs/cgroup");
  EXPECT_TRUE(root->enable_on_base);
  // Not available at all (bound to v1, as on this project's VMs).
  auto none = v2BaseFor("/sys/fs/cgroup/unified", true, "\n", "hugetlb\n");
  ASSERT_FALSE(none.isOk());
  EXPECT_NE(none.status().message().find("cpu controller is not available to /sys/fs/cgroup/unified"),
            std::string::npos) << none.status().message();
  EXPECT_NE(none.status().message().find("set cpu_quota: 0"), std::string::npos);
  auto parent_lacks = v2BaseFor("/sys/fs/cgroup/a/b", false, "", "memory\n");
  ASSERT_FALSE(parent_lacks.isOk());
  EXPECT_NE(parent_lacks.status().message().find("+cpu"), std::string::npos) << parent_lacks.status().message();
}

TEST(CpuQuota, QuotaInMicrosecondsOfThePeriod) {
  EXPECT_EQ(*quotaMicros(0.25, 100000), 25000);
  EXPECT_EQ(*quotaMicros(0.5, 100000), 50000);
  EXPECT_EQ(*quotaMicros(2.0, 100000), 200000);  // two cores' worth for a multi-threaded worker
  const auto tiny = quotaMicros(0.005, 100000);  // 500 us: under the kernel's 1 ms floor
  ASSERT_FALSE(tiny.isOk());
  EXPECT_NE(tiny.status().message().find("1 ms minimum"), std::string::npos) << tiny.status().message();
  EXPECT_FALSE(quotaMicros(0, 100000).isOk());
}

TEST(CpuQuota, NoControllerIsAnErrorNamingTheFieldAndTheFix) {
  const fs::path dir = fs::temp_directory_path() / ("cpu_quota_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "mounts") << "cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n";
  std::vector<core::WorkerInfo> workers(2);
  workers[1].rank = 1;
  workers[1].island = "slow";
  workers[1].island_index = 1;
  workers[1].cpu_quota = 0.5;
  CgroupSources src;
  src.mounts = (dir / "mounts").string();
  const auto r = cpuQuotaForWorkers(workers, src);
  ASSERT_FALSE(r.isOk());
  const std::string& msg = r.status().message();
  EXPECT_NE(msg.find("cluster.islands[1].cpu_quota 0.5 cannot be applied"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no cgroup `cpu` controller is mounted"), std::string::npos) << msg;
  EXPECT_NE(msg.find("set cpu_quota: 0"), std::string::npos) << msg;
  // A unified hierarchy whose root lacks cpu (here a copy of its files).
  fs::create_directories(dir / "unified");
  std::ofstream(dir / "mounts") << "cgroup2 " << (dir / "unified").string() << " cgroup2 rw 0 0\n";
  std::ofstream(dir / "unified" / "cgroup.controllers") << "hugetlb\n";
  std::ofstream(dir / "unified" / "cgroup.subtree_control") << "\n";
  std::ofstream(dir / "self") << "0::/\n";
  src.self_cgroup = (dir / "self").string();
  const auto v2 = cpuQuotaForWorkers(workers, src);
  ASSERT_FALSE(v2.isOk());
  EXPECT_NE(v2.status().message().find("cluster.islands[1].cpu_quota 0.5 cannot be applied: cgroup v2: the cpu "
                                       "controller is not available"),
            std::string::npos) << v2.status().message();
  EXPECT_FALSE(fs::exists(dir / "unified" / ("archipelago-" + std::to_string(::getpid()))));
  // No quota anywhere: nothing is created and nothing is needed.
  workers[1].cpu_quota = 0;
  const auto none = cpuQuotaForWorkers(workers, src);
  fs::remove_all(dir);
  ASSERT_TRUE(none.isOk());
  EXPECT_EQ(none->get(), nullptr);
}

TEST(CpuQuota, AQuarterCoreQuotaThrottlesABurningProcessToAQuarter) {
  SKIP_WITHOUT_CGROUPS();
  auto group = std::move(CpuQuotaGroup::create()).value();
  const auto applied = group->limit("burn", 0.25);
  ASSERT_TRUE(applied.isOk()) << applied.status().toString();
  EXPECT_EQ(applied->quota_us * 4, applied->period_us);
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  // A bounded amount of work: 0.4 s of the child's own CPU time (20 s of
  // wall time at most, should the machine be starved).
  const pid_t pid = forkWaiting(go[0], [] {
    volatile double x = 1;
    const auto t0 = core::Clock::now();
    timespec ts{};
    do {
      for (int i = 0; i < 100000; ++i) x = x * 1.0000001 + 1e-9;
      ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    } while (ts.tv_sec + ts.tv_nsec * 1e-9 < 0.4 && core::secondsSince(t0) < 20);
    return 0;
  });
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(group->add("burn", pid).isOk());
  EXPECT_EQ(cpuCgroupOfPid(pid).substr(cpuCgroupOfPid(pid).rfind('/') + 1), "burn");
  const auto t0 = core::Clock::now();
  ASSERT_EQ(::write(go[1], "x", 1), 1);
  int status = 0;
  rusage ru{};
  ASSERT_EQ(::wait4(pid, &status, 0, &ru), pid);
  const double wall = core::secondsSince(t0);
  const double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
  ::close(go[0]);
  ::close(go[1]);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const int64_t periods = statOf(*group, "burn", "nr_periods");
  const int64_t throttled = statOf(*group, "burn", "nr_throttled");
  const int64_t throttled_ns = group->version() == 2 ? statOf(*group, "burn", "throttled_usec") * 1000
                                                     : statOf(*group, "burn", "throttled_time");
  std::printf("quota 0.25 (cgroup v%d): %.3f s CPU in %.3f s wall (%.2f of a core); cpu.stat: nr_periods %lld, "
              "nr_throttled %lld, throttled %.3f s\n",
              group->version(), cpu, wall, cpu / wall, static_cast<long long>(periods), static_cast<long long>(throttled),
              static_cast<double>(throttled_ns) * 1e-9);
  // The kernel's account: 0.4 s of CPU at a quarter of each period needs
  // at least 16 periods (100 ms ones; more of shorter), nearly all throttled.
  EXPECT_GE(periods, 12);
  EXPECT_GE(throttled, 10);
  EXPECT_GT(throttled_ns, 0);
  // CPU / wall: never above the quota (plus one period's worth at either
  // end); below it only if the host is starved, so the floor is generous.
  EXPECT_LE(cpu, 0.25 * wall + 0.06) << "cpu " << cpu << " wall " << wall;
  EXPECT_GE(cpu / wall, 0.10) << "cpu " << cpu << " wall " << wall;
}

TEST(CpuQuota, RemovesItsCgroupsEvenWithAProcessStillInside) {
  SKIP_WITHOUT_CGROUPS();
  auto group = std::move(CpuQuotaGroup::create()).value();
  const std::string parent = group->path();
  const std::string origin = cpuCgroupOfPid(::getpid());
  ASSERT_TRUE(group->limit(quotaChildName(1), 0.5).isOk());
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = forkWaiting(go[0], [] {
    ::pause();
    return 0;
  });
  ASSERT_TRUE(group->add(quotaChildName(1), pid).isOk());
  EXPECT_NE(cpuCgroupOfPid(pid), origin);
  // A job that failed while its worker still ran: the owner goes first.
  group.reset();
  EXPECT_FALSE(fs::exists(parent)) << parent;
  EXPECT_EQ(cpuCgroupOfPid(pid), origin);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  ::close(go[0]);
  ::close(go[1]);
}

TEST(CpuQuota, AStandaloneWorkerCapsItselfUnlessTheLauncherDid) {
  SKIP_WITHOUT_CGROUPS();
  core::WorkerInfo me;
  me.rank = 3;
  me.island_index = 1;
  me.cpu_quota = 0.5;
  const std::string origin = cpuCgroupOfPid(::getpid());
  std::string parent;
  {
    auto own = applyOwnCpuQuota(me);
    ASSERT_TRUE(own.isOk()) << own.status().toString();
    ASSERT_NE(own->get(), nullptr);
    parent = (*own)->path();
    const std::string mine = cpuCgroupOfPid(::getpid());
    EXPECT_EQ(mine.substr(mine.size() - std::string("/rank3").size()), "/rank3") << mine;
    std::string quota, period;
    if ((*own)->version() == 2) {  // cpu.max: "quota period"
      std::stringstream(core::readFile(parent + "/rank3/cpu.max").value()) >> quota >> period;
    } else {
      quota = core::readFile(parent + "/rank3/cpu.cfs_quota_us").value();
      period = core::readFile(parent + "/rank3/cpu.cfs_period_us").value();
    }
    EXPECT_EQ(2 * std::stoll(quota), std::stoll(period)) << quota << " of " << period;
  }
  EXPECT_FALSE(fs::exists(parent));
  EXPECT_EQ(cpuCgroupOfPid(::getpid()), origin);
  // Started by the launcher: it already holds the worker in its cgroup.
  ::setenv(kCpuCgroupEnv, "/sys/fs/cgroup/cpu/archipelago-1/rank3", 1);
  const auto by_launcher = applyOwnCpuQuota(me);
  ::unsetenv(kCpuCgroupEnv);
  ASSERT_TRUE(by_launcher.isOk());
  EXPECT_EQ(by_launcher->get(), nullptr);
  EXPECT_EQ(cpuCgroupOfPid(::getpid()), origin);
}

TEST(CpuQuota, AQuotaUnderTheKernelsFloorNamesTheField) {
  SKIP_WITHOUT_CGROUPS();
  std::vector<core::WorkerInfo> workers(1);
  workers[0].island_index = 0;
  workers[0].island = "tiny";
  workers[0].cpu_quota = 0.001;
  std::string parent;
  {
    const auto r = cpuQuotaForWorkers(workers);
    ASSERT_FALSE(r.isOk());
    const std::string& msg = r.status().message();
    EXPECT_NE(msg.find("cluster.islands[0].cpu_quota 0.001 (rank 0, island tiny) cannot be applied"),
              std::string::npos) << msg;
    EXPECT_NE(msg.find("1 ms minimum"), std::string::npos) << msg;
  }
  // The failed attempt left nothing behind, wherever the version puts it
  // (v2: this process's cgroup or its parent).
  const CpuHierarchy h = hierarchyOfPid(::getpid());
  const std::string pid_dir = "/archipelago-" + std::to_string(::getpid());
  std::vector<fs::path> places{fs::path(h.mount + h.cgroup)};
  if (h.version == 2) places.push_back(places.back().parent_path());
  for (const auto& p : places) EXPECT_FALSE(fs::exists(p.string() + pid_dir)) << p.string() + pid_dir;
}

}  // namespace
}  // namespace archipelago::runtime
