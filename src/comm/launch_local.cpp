#include "comm/launch_local.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "archipelago/comm/address.h"

namespace archipelago::comm {

namespace {

// In a child: enter network namespace `name` and find this host's address
// (the one routing to the coordinator). "" when all went well.
std::string enterNetns(const std::string& name, const std::string& coordinator, std::string* listen) {
  const std::string path = "/var/run/netns/" + name;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "network namespace '" + name + "': cannot open " + path + ": " + std::strerror(errno);
  const int rc = ::setns(fd, CLONE_NEWNET);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return "network namespace '" + name + "': setns failed: " + std::strerror(err) + " (needs root)";
  auto hp = splitHostPort(coordinator);
  if (!hp.isOk()) return hp.status().toString();
  auto addr = routeTo(hp->first);
  if (!addr.isOk()) return "network namespace '" + name + "': " + addr.status().toString();
  *listen = *addr;
  return "";
}

}  // namespace

std::string LocalCoordinator::address() const { return options_.host + ":" + std::to_string(options_.port); }

core::Status LocalCoordinator::start() {
  if (pid_ > 0) return core::failedPrecondition("the local coordinator is already running");
  int p[2];
  if (::pipe(p) != 0) return core::internalError("pipe failed");
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = ::fork();
  if (pid < 0) return core::internalError("fork failed");
  if (pid == 0) {
    ::close(p[0]);
    CoordinatorServer server(secret_, options_);
    const core::Status st = server.start();
    const std::string line = (st.isOk() ? std::to_string(server.port()) : std::string("0")) + "\n";
    [[maybe_unused]] auto w = ::write(p[1], line.data(), line.size());
    ::close(p[1]);
    while (st.isOk()) ::pause();  // serves until killed
    ::_exit(1);
  }
  ::close(p[1]);
  std::string port;
  char c;
  while (::read(p[0], &c, 1) == 1 && c != '\n') port.push_back(c);
  ::close(p[0]);
  pid_ = pid;
  ++starts_;
  if (port.empty() || port == "0") {
    kill();
    return core::unavailable("the local coordinator did not start (port " + std::to_string(options_.port) + ")");
  }
  options_.port = std::stoi(port);
  return core::okStatus();
}

void LocalCoordinator::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

namespace {

// A forked rank: reads the coordinator's address from `addr_fd`, enters its
// network namespace if it has one, runs `fn` and writes its one-line
// result to `result_fd`, then exits without the parent's destructors.
[[noreturn]] void runRank(const LocalLaunchOptions& options, const LocalRankFn& fn, int r, int addr_fd,
                          int result_fd, SharedBlock* shared) {
  std::string addr;
  char c;
  while (::read(addr_fd, &c, 1) == 1 && c != '\n') addr.push_back(c);
  LocalRank lr;
  lr.rank = r;
  lr.world = options.world;
  lr.coordinator = addr;
  lr.secret = options.secret;
  lr.shared = shared;
  std::string result;
  if (addr.empty()) {
    result = "no coordinator address from the parent";
  } else if (!options.netns.empty() && !options.netns[static_cast<size_t>(r)].empty()) {
    result = enterNetns(options.netns[static_cast<size_t>(r)], addr, &lr.listen);
  }
  if (result.empty() && !addr.empty()) result = fn(lr);
  result += "\n";
  [[maybe_unused]] auto w = ::write(result_fd, result.data(), result.size());
  std::fflush(stdout);
  std::fflush(stderr);
  ::_exit(0);
}

// The parent's view of its forked ranks: pids, the pipes their results
// arrive on, and what became of each.
struct Ranks {
  std::vector<pid_t> pids;
  std::vector<int> addr_pipe, result_pipe;
  std::vector<std::string> buf;
  std::vector<bool> exited;
  std::vector<RankOutcome> out;

  explicit Ranks(int n)
      : pids(static_cast<size_t>(n), -1), addr_pipe(static_cast<size_t>(n), -1),
        result_pipe(static_cast<size_t>(n), -1), buf(static_cast<size_t>(n)), exited(static_cast<size_t>(n)),
        out(static_cast<size_t>(n)) {}
  size_t size() const { return pids.size(); }

  // Reads what is there now; `all` reads to the end (after the rank exited).
  void drain(size_t r, bool all) {
    int& fd = result_pipe[r];
    if (fd < 0) return;
    pollfd p{fd, POLLIN, 0};
    while (all || ::poll(&p, 1, 0) > 0) {
      char tmp[4096];
      const ssize_t k = ::read(fd, tmp, sizeof(tmp));
      if (k <= 0) {
        ::close(fd);
        fd = -1;
        return;
      }
      buf[r].append(tmp, static_cast<size_t>(k));
    }
  }

  void reap(size_t r, bool block) {
    if (exited[r]) return;
    int status = 0;
    if (::waitpid(pids[r], &status, block ? 0 : WNOHANG) != pids[r]) return;
    exited[r] = true;
    if (WIFEXITED(status)) out[r].exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) out[r].signal = WTERMSIG(status);
  }

  void killRemaining(const std::set<int>& expendable) {
    for (size_t r = 0; r < size(); ++r) {
      if (!exited[r]) ::kill(pids[r], SIGKILL);
    }
    for (size_t r = 0; r < size(); ++r) {
      if (exited[r]) continue;
      reap(r, true);
      out[r].signal = SIGKILL;
      if (!expendable.count(static_cast<int>(r))) out[r].message = "timed out (killed by the launcher)";
    }
  }

  void collect() {
    for (size_t r = 0; r < size(); ++r) {
      drain(r, true);
      if (buf[r].empty()) continue;
      out[r].reported = true;
      std::string m = buf[r];
      if (m.back() == '\n') m.pop_back();
      if (out[r].message.empty()) out[r].message = m;
    }
  }
};

SharedBlock* mapSharedBlock() {
  void* mem = ::mmap(nullptr, sizeof(SharedBlock), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  auto* shared = new (mem) SharedBlock();
  for (auto& s : shared->slot) s.store(0);
  return shared;
}

}  // namespace

core::Result<std::vector<RankOutcome>> launchLocal(const LocalLaunchOptions& options, const LocalRankFn& fn,
                                                   SharedBlock** shared_out) {
  const int n = options.world;
  SharedBlock* shared = mapSharedBlock();
  if (!shared) return core::internalError("mmap of the shared block failed");
  if (shared_out) *shared_out = shared;
  Ranks ranks(n);
  std::fflush(stdout);
  std::fflush(stderr);
  for (int r = 0; r < n; ++r) {
    int a[2], b[2];
    if (::pipe(a) != 0 || ::pipe(b) != 0) return core::internalError("pipe failed");
    pid_t pid = ::fork();
    if (pid < 0) return core::internalError("fork failed");
    if (pid == 0) {
      ::close(a[1]);
      ::close(b[0]);
      runRank(options, fn, r, a[0], b[1], shared);
    }
    ::close(a[0]);
    ::close(b[1]);
    ranks.addr_pipe[static_cast<size_t>(r)] = a[1];
    ranks.result_pipe[static_cast<size_t>(r)] = b[0];
    ranks.pids[static_cast<size_t>(r)] = pid;
  }
  CoordinatorServer coord(options.secret, options.coordinator);
  LocalCoordinator child(options.secret, options.coordinator);
  core::Status st = options.coordinator_process ? child.start() : coord.start();
  const std::string addr = options.coordinator_process ? child.address() : coord.address();
  const std::string line = st.isOk() ? addr + "\n" : std::string("\n");
  for (int fd : ranks.addr_pipe) {
    [[maybe_unused]] auto w = ::write(fd, line.data(), line.size());
    ::close(fd);
  }
  const auto deadline = core::Deadline::afterSeconds(options.timeout_s);
  while (true) {
    bool others_done = true, all_done = true;
    for (size_t r = 0; r < ranks.size(); ++r) {
      ranks.drain(r, false);
      ranks.reap(r, false);
      if (ranks.exited[r]) continue;
      all_done = false;
      if (!options.expendable.count(static_cast<int>(r))) others_done = false;
    }
    if (all_done) break;
    if (options.coordinator_process && options.on_poll) options.on_poll(child, *shared);
    if (others_done || deadline.expired()) {
      ranks.killRemaining(options.expendable);
      break;
    }
    ::usleep(2000);
  }
  ranks.collect();
  coord.stop();
  child.kill();
  return ranks.out;
}

core::Result<ConnectedRank> connectRank(const LocalRank& r, CommConfig config, const core::Deadline& deadline) {
  ConnectedRank cr;
  ARCH_ASSIGN_OR_RETURN(cr.client, CoordinatorClient::connect(r.coordinator, r.secret, r.rank, deadline));
  config.rank = r.rank;
  config.world = r.world;
  if (!r.listen.empty()) config.options.listen_host = r.listen;
  if (config.secret.empty()) config.secret = r.secret;
  ARCH_ASSIGN_OR_RETURN(cr.comm, Communicator::create(config));
  int island = config.island_of_rank.empty() ? 0 : config.island_of_rank[static_cast<size_t>(r.rank)];
  ARCH_RETURN_IF_ERROR(cr.client->registerRank(r.rank, island, cr.comm->address(), deadline).status());
  ARCH_ASSIGN_OR_RETURN(Membership m, cr.client->waitForMembers(r.world, deadline));
  ARCH_RETURN_IF_ERROR(cr.comm->connect(m.addresses, deadline));
  cr.world = cr.comm->world();
  return cr;
}

}  // namespace archipelago::comm
