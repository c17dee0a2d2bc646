#include "runtime/coordinator_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "archipelago/comm/address.h"
#include "archipelago/comm/coordinator.h"
#include "archipelago/core/clock.h"
#include "archipelago/core/files.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;

comm::CoordinatorOptions coordinatorServerOptions(const std::string& host, int port, double failure_timeout_s,
                                                  const comm::TlsFiles& tls) {
  comm::CoordinatorOptions co;
  co.tls = tls;
  co.host = host;
  co.port = port;
  co.heartbeat_timeout_s = failure_timeout_s;
  co.adopt_worker_timeout = failure_timeout_s <= 0;
  return co;
}

std::string CoordinatorProcess::address() const { return comm::joinHostPort(o_.host, o_.port); }

namespace {
// In the forked child: serves until SIGTERM / SIGINT; returns the exit code.
// Forked without exec (the supervisor is single-threaded here), so a
// restart costs milliseconds, not the seconds of loading this binary again.
int serveInChild(const CoordinatorProcess::Options& o) {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  ::sigprocmask(SIG_BLOCK, &stop_signals, nullptr);  // before the server's threads exist: they inherit it
  comm::CoordinatorServer server(o.secret, coordinatorServerOptions(o.host, o.port, o.failure_timeout, o.tls));
  core::Status st = server.start();
  if (st.isOk()) st = core::writeFileAtomic(o.port_file, std::to_string(server.port()));
  if (!st.isOk()) {
    std::fprintf(stderr, "coordinator: %s\n", st.toString().c_str());
    return 1;
  }
  std::printf("coordinator listening on %s\n", server.address().c_str());
  std::fflush(stdout);
  int sig = 0;
  ::sigwait(&stop_signals, &sig);
  server.stop();
  return 0;
}
}  // namespace

core::Status CoordinatorProcess::start() {
  if (o_.secret.empty()) return core::invalidArgument("coordinator process: the job secret is empty");
  std::error_code ec;
  fs::remove(o_.port_file, ec);
  std::fflush(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return core::unavailable(std::string("fork of the coordinator failed: ") + std::strerror(errno));
  if (pid == 0) {
    // Ends with its supervisor (nobody would restart or stop it); the workers train on without it.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) std::_Exit(1);
    ::setpgid(0, 0);  // the terminal's Ctrl-C goes to the supervisor, which decides
    const int fd = o_.log.empty() ? -1 : ::open(o_.log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
    }
    const int code = serveInChild(o_);
    std::fflush(nullptr);
    std::_Exit(code);
  }
  pid_ = pid;
  // The child writes its port once it listens (atomically: the file is whole when it exists).
  const auto deadline = core::Deadline::afterSeconds(30);
  while (!deadline.expired()) {
    std::ifstream in(o_.port_file);
    int port = 0;
    if (in >> port && port > 0) {
      o_.port = port;
      return core::okStatus();
    }
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return core::unavailable("the coordinator exited at start (see " + (o_.log.empty() ? std::string("its output") : o_.log) + "); port " + std::to_string(o_.port));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  stop();
  return core::deadlineExceeded("the coordinator did not listen within 30 s");
}

core::Result<std::optional<CoordinatorProcess::Restart>> CoordinatorProcess::poll() {
  if (pid_ <= 0) return std::optional<Restart>{};
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) != pid_) return std::optional<Restart>{};
  Restart r;
  r.old_pid = pid_;
  r.why = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                              : "exit " + std::to_string(WEXITSTATUS(status));
  pid_ = -1;
  const auto t0 = core::Clock::now();
  ARCH_RETURN_IF_ERROR(start().withContext("restarting the coordinator (it was " + r.why + ")"));
  ++restarts_;
  r.new_pid = pid_;
  r.seconds = core::secondsSince(t0);
  return std::optional<Restart>(r);
}

void CoordinatorProcess::stop() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  int status = 0;
  const auto deadline = core::Deadline::afterSeconds(2);
  while (::waitpid(pid_, &status, WNOHANG) != pid_) {
    if (deadline.expired()) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  pid_ = -1;
}

}  // namespace archipelago::runtime
