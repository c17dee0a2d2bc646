// Coordinator load benchmark (issue 18, "scale"): one coordinator process,
// N members registered over real TCP connections on 127.0.0.1, each
// heartbeating at the workers' interval (min(0.5 s, failure_timeout / 4),
// runtime/elastic.cpp). The members are lightweight: CoordinatorClient
// objects in this process, one connection each, their heartbeats sent by a
// few pump threads instead of a thread per member, so the machine's cores go
// to the coordinator under test rather than to N heartbeat threads.
//
// Per N it prints:
//   cpu %      the coordinator process's CPU time (utime + stime from
//              /proc/PID/stat) over a steady window, as % of one core;
//   detect s   10 members killed at once (heartbeats stopped, connections
//              closed): seconds until the coordinator's table shows the first
//              of them failed (a new epoch published), and until all 10 are;
//   correct    exactly the killed members failed, nobody else.
// Targets at N = 1000: cpu < 20 % of a core, all 10 detected and the epoch
// published in < 2 s (failure_timeout 1.5 s; detection cannot beat it). The
// baseline is the same measurement at a small N in the same run.
//
//   build/bench/bench_coordinator_load [--members 100,1000] [--failure-timeout 1.5]
//                                      [--window 10] [--kill 10] [--pumps 4]
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/clock.h"

namespace {

using archipelago::comm::CoordinatorClient;
using archipelago::comm::CoordinatorOptions;
using archipelago::comm::CoordinatorServer;
using archipelago::core::Deadline;

const char* kSecret = "bench-coordinator-load-secret";

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// CPU seconds (user + system) of process `pid` so far.
double cpuSeconds(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(f, line);
  // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
  std::istringstream in(line.substr(line.rfind(')') + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i >= 14) ticks += std::stod(field);
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// The coordinator in a child process of its own, so its CPU time is its own.
// Forked before this process starts any thread. Returns the pid; the port
// comes back through a pipe.
pid_t startCoordinator(double failure_timeout, int& port) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    ::close(fds[0]);
    CoordinatorOptions o;
    o.heartbeat_timeout_s = failure_timeout;
    CoordinatorServer server(kSecret, o);
    if (!server.start().isOk()) _exit(3);
    const int p = server.port();
    if (write(fds[1], &p, sizeof p) != static_cast<ssize_t>(sizeof p)) _exit(4);
    while (true) pause();  // until SIGKILL
  }
  ::close(fds[1]);
  const bool got = read(fds[0], &port, sizeof port) == static_cast<ssize_t>(sizeof port);
  ::close(fds[0]);
  return got ? pid : -1;
}

struct Member {
  std::mutex mu;  // held by the pump through a heartbeat, and by the kill
  std::unique_ptr<CoordinatorClient> client;
};

// Heartbeats of members [begin, end) every `interval`, against the clock.
void pump(std::vector<Member>& m, size_t begin, size_t end, double interval, const std::atomic<bool>& stop,
          std::atomic<int64_t>& errors) {
  double next = now();
  while (!stop) {
    next += interval;
    for (size_t i = begin; i < end && !stop; ++i) {
      std::lock_guard<std::mutex> lock(m[i].mu);
      if (m[i].client && !m[i].client->heartbeat(Deadline::afterSeconds(2)).isOk()) ++errors;
    }
    while (!stop && now() < next) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

struct Row {
  int members = 0;
  double cpu_pct = 0, detect_first_s = 0, detect_all_s = 0, register_s = 0;
  int64_t heartbeat_errors = 0;
  bool correct = false;
};

struct Args {
  std::vector<int> members = {100, 1000};
  double failure_timeout = 1.5;
  double window = 10;
  int kill = 10;
  int pumps = 4;
};

// Polls the table until all `killed` are failed (or 5 x the timeout);
// fills the detection times and the correctness check.
void awaitDetection(CoordinatorClient& observer, const std::set<int>& killed, double t0, double timeout, Row& row) {
  const uint32_t epoch0 = observer.membership(Deadline::afterSeconds(5)).value().epoch;
  row.detect_first_s = row.detect_all_s = -1;
  while (now() - t0 < 5 * timeout) {
    auto m = observer.membership(Deadline::afterSeconds(5));
    if (m.isOk()) {
      const std::set<int> failed(m->failed.begin(), m->failed.end());
      if (row.detect_first_s < 0 && m->epoch > epoch0) row.detect_first_s = now() - t0;
      if (std::includes(failed.begin(), failed.end(), killed.begin(), killed.end())) {
        row.detect_all_s = now() - t0;
        row.correct = failed == killed;
        return;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

Row measure(int n, const Args& a, pid_t pid, const std::string& address) {
  Row row;
  row.members = n;
  const double interval = std::min(0.5, a.failure_timeout / 4);
  std::vector<Member> m(static_cast<size_t>(n));
  const double t_reg = now();
  for (int r = 0; r < n; ++r) {
    auto c = CoordinatorClient::connect(address, kSecret, r, Deadline::afterSeconds(30));
    if (!c.isOk()) throw std::runtime_error("member " + std::to_string(r) + ": " + c.status().message());
    m[static_cast<size_t>(r)].client = std::move(c).value();
    auto reg = m[static_cast<size_t>(r)].client->registerRank(r, 0, "127.0.0.1:" + std::to_string(20000 + r),
                                                              Deadline::afterSeconds(30));
    if (!reg.isOk()) throw std::runtime_error("register " + std::to_string(r) + ": " + reg.status().message());
  }
  row.register_s = now() - t_reg;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> errors{0};
  std::vector<std::thread> pumps;
  const size_t per = (m.size() + static_cast<size_t>(a.pumps) - 1) / static_cast<size_t>(a.pumps);
  for (size_t b = 0; b < m.size(); b += per) {
    pumps.emplace_back(pump, std::ref(m), b, std::min(m.size(), b + per), interval, std::cref(stop), std::ref(errors));
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(2 * interval));  // every member heard once
  const double c0 = cpuSeconds(pid), w0 = now();
  std::this_thread::sleep_for(std::chrono::duration<double>(a.window));
  row.cpu_pct = 100 * (cpuSeconds(pid) - c0) / (now() - w0);

  auto observer = CoordinatorClient::connect(address, kSecret, -1, Deadline::afterSeconds(10)).value();
  std::vector<int> ranks(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) ranks[static_cast<size_t>(r)] = r;
  std::shuffle(ranks.begin(), ranks.end(), std::mt19937(7));
  const std::set<int> killed(ranks.begin(), ranks.begin() + std::min(a.kill, n));
  const double t0 = now();
  for (int r : killed) {  // its heartbeats stop and its connection closes, as a killed process's do
    std::lock_guard<std::mutex> lock(m[static_cast<size_t>(r)].mu);
    m[static_cast<size_t>(r)].client.reset();
  }
  awaitDetection(*observer, killed, t0, a.failure_timeout, row);
  stop = true;
  for (auto& t : pumps) t.join();
  row.heartbeat_errors = errors;
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_coordinator_load: coordinator CPU and failure detection with many members"};
  Args a;
  app.add_option("--members", a.members, "member counts, one row each (the first is the baseline)")->delimiter(',');
  app.add_option("--failure-timeout", a.failure_timeout, "heartbeat timeout in seconds (strategy.failure_timeout)");
  app.add_option("--window", a.window, "seconds of steady state the CPU is measured over");
  app.add_option("--kill", a.kill, "members killed at once");
  app.add_option("--pumps", a.pumps, "threads sending the members' heartbeats");
  CLI11_PARSE(app, argc, argv);

  // Two sockets per member on this machine (ours and the coordinator's end).
  rlimit lim{};
  getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = lim.rlim_max;
  setrlimit(RLIMIT_NOFILE, &lim);

  std::printf("%8s %10s %8s %12s %12s %8s %8s\n", "members", "register s", "cpu %", "detect 1st s", "detect all s",
              "hb errs", "correct");
  bool ok = true;
  for (int n : a.members) {
    int port = 0;
    const pid_t pid = startCoordinator(a.failure_timeout, port);
    if (pid < 0) {
      std::fprintf(stderr, "bench_coordinator_load: the coordinator did not start\n");
      return 1;
    }
    Row row;
    try {
      row = measure(n, a, pid, "127.0.0.1:" + std::to_string(port));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_coordinator_load: %s\n", e.what());
      ok = false;
    }
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    std::printf("%8d %10.2f %8.1f %12.3f %12.3f %8lld %8s\n", row.members, row.register_s, row.cpu_pct,
                row.detect_first_s, row.detect_all_s, static_cast<long long>(row.heartbeat_errors),
                row.correct ? "yes" : "NO");
    std::printf("%s\n", nlohmann::json{{"bench", "coordinator_load"}, {"members", row.members},
                                       {"failure_timeout_s", a.failure_timeout}, {"cpu_pct_of_core", row.cpu_pct},
                                       {"detect_first_s", row.detect_first_s}, {"detect_all_s", row.detect_all_s},
                                       {"register_s", row.register_s}, {"heartbeat_errors", row.heartbeat_errors},
                                       {"killed", a.kill}, {"correct", row.correct}}
                            .dump()
                            .c_str());
    ok = ok && row.correct;
  }
  std::printf("targets at 1000 members: cpu < 20 %% of a core; all %d detected, epoch published, < 2 s\n", a.kill);
  return ok ? 0 : 1;
}
