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

core::Result<std::vector<RankOutcome>> launchLocal(const LocalLaunchOptions& options, const LocalRankFn& fn,
                                                   SharedBlock** shared_out) {
  const int n = options.world;
  void* mem = ::mmap(nullptr, sizeof(SharedBlock), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return core::internalError("mmap of the shared block failed");
  auto* shared = new (mem) SharedBlock();
  for (auto& s : shared->slot) s.store(0);
  if (shared_out) *shared_out = shared;
  std::vector<int> addr_pipe(static_cast<size_t>(n)), result_pipe(static_cast<size_t>(n));
  std::vector<pid_t> pids(static_cast<size_t>(n), -1);
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
      std::string addr;
      char c;
      while (::read(a[0], &c, 1) == 1 && c != '\n') addr.push_back(c);
      LocalRank lr;
      lr.rank = r;
      lr.world = n;
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
      [[maybe_unused]] auto w = ::write(b[1], result.data(), result.size());
      std::fflush(stdout);
      std::fflush(stderr);
      ::_exit(0);
    }
    ::close(a[0]);
    ::close(b[1]);
    addr_pipe[static_cast<size_t>(r)] = a[1];
    result_pipe[static_cast<size_t>(r)] = b[0];
    pids[static_cast<size_t>(r)] = pid;
  }
  CoordinatorServer coord(options.secret, options.coordinator);
  LocalCoordinator child(options.secret, options.coordinator);
  core::Status st = options.coordinator_process ? child.start() : coord.start();
  const std::string addr = options.coordinator_process ? child.address() : coord.address();
  std::string line = st.isOk() ? addr + "\n" : std::string("\n");
  for (int r = 0; r < n; ++r) {
    [[maybe_unused]] auto w = ::write(addr_pipe[static_cast<size_t>(r)], line.data(), line.size());
    ::close(addr_pipe[static_cast<size_t>(r)]);
  }
  std::vector<RankOutcome> out(static_cast<size_t>(n));
  std::vector<bool> exited(static_cast<size_t>(n), false);
  std::vector<std::string> buf(static_cast<size_t>(n));
  auto deadline = core::Deadline::afterSeconds(options.timeout_s);
  while (true) {
    for (int r = 0; r < n; ++r) {  // drain result pipes
      int fd = result_pipe[static_cast<size_t>(r)];
      if (fd < 0) continue;
      pollfd p{fd, POLLIN, 0};
      while (::poll(&p, 1, 0) > 0) {
        char tmp[4096];
        ssize_t k = ::read(fd, tmp, sizeof(tmp));
        if (k <= 0) {
          ::close(fd);
          result_pipe[static_cast<size_t>(r)] = -1;
          break;
        }
        buf[static_cast<size_t>(r)].append(tmp, static_cast<size_t>(k));
      }
    }
    for (int r = 0; r < n; ++r) {
      if (exited[static_cast<size_t>(r)]) continue;
      int status = 0;
      pid_t w = ::waitpid(pids[static_cast<size_t>(r)], &status, WNOHANG);
      if (w == pids[static_cast<size_t>(r)]) {
        exited[static_cast<size_t>(r)] = true;
        auto& o = out[static_cast<size_t>(r)];
        if (WIFEXITED(status)) o.exit_code = WEXITSTATUS(status);
        if (WIFSIGNALED(status)) o.signal = WTERMSIG(status);
      }
    }
    bool others_done = true, all_done = true;
    for (int r = 0; r < n; ++r) {
      if (!exited[static_cast<size_t>(r)]) {
        all_done = false;
        if (!options.expendable.count(r)) others_done = false;
      }
    }
    if (all_done) break;
    if (options.coordinator_process && options.on_poll) options.on_poll(child, *shared);
    if (others_done || deadline.expired()) {
      for (int r = 0; r < n; ++r) {
        if (!exited[static_cast<size_t>(r)]) ::kill(pids[static_cast<size_t>(r)], SIGKILL);
      }
      for (int r = 0; r < n; ++r) {
        if (exited[static_cast<size_t>(r)]) continue;
        int status = 0;
        ::waitpid(pids[static_cast<size_t>(r)], &status, 0);
        exited[static_cast<size_t>(r)] = true;
        out[static_cast<size_t>(r)].signal = SIGKILL;
        if (!options.expendable.count(r)) out[static_cast<size_t>(r)].message = "timed out (killed by the launcher)";
      }
      break;
    }
    ::usleep(2000);
  }
  for (int r = 0; r < n; ++r) {
    int fd = result_pipe[static_cast<size_t>(r)];
    if (fd >= 0) {
      char tmp[4096];
      ssize_t k;
      while ((k = ::read(fd, tmp, sizeof(tmp))) > 0) buf[static_cast<size_t>(r)].append(tmp, static_cast<size_t>(k));
      ::close(fd);
    }
    auto& o = out[static_cast<size_t>(r)];
    if (!buf[static_cast<size_t>(r)].empty()) {
      o.reported = true;
      std::string m = buf[static_cast<size_t>(r)];
      if (!m.empty() && m.back() == '\n') m.pop_back();
      if (o.message.empty()) o.message = m;
    }
  }
  coord.stop();
  child.kill();
  return out;
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
