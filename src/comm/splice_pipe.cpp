#include "comm/splice_pipe.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

namespace archipelago::comm {
namespace {

core::Status sysError(const std::string& what, int err) { return core::unavailable(what + ": " + std::strerror(err)); }

// splice() has no MSG_NOSIGNAL: a peer that closed would raise SIGPIPE.
// Block it in the sending thread once; an EPIPE then comes back as an error
// and the pending signal is consumed, so it is never delivered.
void blockSigpipeInThisThread() {
  thread_local bool blocked = false;
  if (blocked) return;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  blocked = true;
}

void consumePendingSigpipe() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  timespec zero{0, 0};
  while (sigtimedwait(&set, nullptr, &zero) > 0) {
  }
}

}  // namespace

core::Result<std::unique_ptr<SplicePipe>> SplicePipe::create(size_t pipe_bytes) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return sysError("pipe2 for spliced sends", errno);
  // Best effort: an unprivileged process may not exceed pipe-max-size.
  ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(std::max<size_t>(pipe_bytes, 4096)));
  int cap = ::fcntl(fds[1], F_GETPIPE_SZ);
  if (cap <= 0) {
    int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    return sysError("F_GETPIPE_SZ", err);
  }
  return std::unique_ptr<SplicePipe>(new SplicePipe(fds[0], fds[1], static_cast<size_t>(cap)));
}

SplicePipe::~SplicePipe() {
  if (rd_ >= 0) ::close(rd_);
  if (wr_ >= 0) ::close(wr_);
}

core::Status SplicePipe::send(Socket& sock, const void* hdr, size_t nh, const void* payload, size_t np,
                              const core::AbortFlag* abort) {
  blockSigpipeInThisThread();
  // The header is small (< PIPE_BUF) and the pipe empty: one atomic write.
  if (nh > 0 && ::write(wr_, hdr, nh) != static_cast<ssize_t>(nh)) return sysError("write to splice pipe", errno);
  size_t in_pipe = nh;
  const auto* p = static_cast<const uint8_t*>(payload);
  size_t left = np;
  while (left > 0 || in_pipe > 0) {
    if (sock.isShutdown()) return core::unavailable("connection was shut down");
    if (left > 0) {
      iovec iov{const_cast<uint8_t*>(p), left};
      ssize_t v = ::vmsplice(wr_, &iov, 1, SPLICE_F_NONBLOCK);
      if (v > 0) {
        p += v;
        left -= static_cast<size_t>(v);
        in_pipe += static_cast<size_t>(v);
      } else if (v < 0 && errno != EAGAIN && errno != EINTR) {
        return sysError("vmsplice", errno);
      }
    }
    if (in_pipe == 0) continue;
    unsigned flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK | (left > 0 ? SPLICE_F_MORE : 0);
    ssize_t k = ::splice(rd_, nullptr, sock.fd(), nullptr, in_pipe, flags);
    if (k > 0) {
      in_pipe -= static_cast<size_t>(k);
    } else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      ARCH_RETURN_IF_ERROR(sock.waitFor(POLLOUT, core::Deadline::never(), abort));
    } else if (k < 0 && errno == EINTR) {
      continue;
    } else {
      int err = k == 0 ? EPIPE : errno;
      if (err == EPIPE) consumePendingSigpipe();
      return sysError("splice to socket", err);
    }
  }
  return core::okStatus();
}

}  // namespace archipelago::comm
