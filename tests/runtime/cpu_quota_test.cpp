// runtime/cpu_quota.h: parsing /proc/mounts and /proc/self/cgroup against
// the formats proc(5) and cgroups(7) publish, and, where this machine has
// a cgroup v1 `cpu` controller and we are root, the kernel's own account
// of a capped process (cpu.stat's throttling counters, the child's CPU
// time from wait4) and the cleanup. Skipped with the reason elsewhere.
#include "runtime/cpu_quota.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
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
  auto mounts = core::readFile("/proc/mounts");
  if (!mounts.isOk() || cpuMountIn(*mounts).empty()) return "no cgroup v1 `cpu` controller is mounted";
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

std::string cpuCgroupOfPid(pid_t pid) {
  auto text = core::readFile("/proc/" + std::to_string(pid) + "/cgroup");
  return text.isOk() ? cpuCgroupIn(*text) : "?";
}

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
  // cgroups(7): "hierarchy-ID:controller-list:cgroup-path".
  EXPECT_EQ(cpuCgroupIn("3:cpuset:/\n2:cpu,cpuacct:/user.slice/job\n0::/\n"), "/user.slice/job");
  EXPECT_EQ(cpuCgroupIn("2:cpuacct:/a\n1:cpu:/b\n"), "/b");
  EXPECT_EQ(cpuCgroupIn("0::/unified-only\n"), "/");
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
  std::ofstream(dir / "mounts") << "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
  std::vector<core::WorkerInfo> workers(2);
  workers[1].rank = 1;
  workers[1].island = "slow";
  workers[1].island_index = 1;
  workers[1].cpu_quota = 0.5;
  CgroupSources src;
  src.mounts = (dir / "mounts").string();
  const auto r = cpuQuotaForWorkers(workers, src);
  fs::remove_all(dir);
  ASSERT_FALSE(r.isOk());
  const std::string& msg = r.status().message();
  EXPECT_NE(msg.find("cluster.islands[1].cpu_quota 0.5 cannot be applied"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no cgroup v1 `cpu` controller"), std::string::npos) << msg;
  EXPECT_NE(msg.find("set cpu_quota: 0"), std::string::npos) << msg;
  // No quota anywhere: nothing is created and nothing is needed.
  workers[1].cpu_quota = 0;
  const auto none = cpuQuotaForWorkers(workers, src);
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
  const int64_t throttled_ns = statOf(*group, "burn", "throttled_time");
  std::printf("quota 0.25: %.3f s CPU in %.3f s wall (%.2f of a core); cpu.stat: nr_periods %lld, nr_throttled %lld, "
              "throttled_time %.3f s\n",
              cpu, wall, cpu / wall, static_cast<long long>(periods), static_cast<long long>(throttled),
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
    const std::string quota = core::readFile(parent + "/rank3/cpu.cfs_quota_us").value();
    const std::string period = core::readFile(parent + "/rank3/cpu.cfs_period_us").value();
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
  // The failed attempt left nothing behind.
  auto mounts = core::readFile("/proc/mounts");
  auto self = core::readFile("/proc/self/cgroup");
  const std::string dir = cpuMountIn(*mounts) + (cpuCgroupIn(*self) == "/" ? "" : cpuCgroupIn(*self)) +
                          "/archipelago-" + std::to_string(::getpid());
  EXPECT_FALSE(fs::exists(dir)) << dir;
}

}  // namespace
}  // namespace archipelago::runtime
