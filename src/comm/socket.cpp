#include "comm/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "archipelago/core/hash.h"
#include "archipelago/core/log.h"
#include "comm/tls_context.h"

namespace archipelago::comm {
namespace {

core::Status errnoStatus(const std::string& what, int err) {
  if (err == EPIPE || err == ECONNRESET || err == ECONNREFUSED || err == ENOTCONN || err == ECONNABORTED) {
    return core::unavailable(what + ": " + std::strerror(err));
  }
  return core::unavailable(what + ": " + std::strerror(err));
}

void setCommonOptions(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  int fl = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

}  // namespace

Socket::Socket(int fd) : fd_(fd) {}

Socket::~Socket() {
  if (ssl_) SSL_free(ssl_);
  if (fd_ >= 0) ::close(fd_);
}

void Socket::shutdown() {
  if (!shut_.exchange(true)) ::shutdown(fd_, SHUT_RDWR);
}

void Socket::shutdownWrite() {
  if (ssl_) {
    std::lock_guard<std::mutex> lock(ssl_mu_);
    SSL_shutdown(ssl_);
  }
  ::shutdown(fd_, SHUT_WR);
}

void Socket::drainUntilPeerCloses(const core::Deadline& deadline) {
  ::shutdown(fd_, SHUT_WR);
  char buf[4096];
  while (waitFor(POLLIN, deadline, nullptr).isOk()) {
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return;
  }
}

namespace {
// poll() on fd until it is ready, the deadline passes or `abort` is set:
// > 0 when fd is ready, 0 when not (yet), < 0 on error (errno). The abort
// flag's eventfd wakes the poll at once, and shutdown() of the socket (from
// any thread) does too, so an idle connection sleeps in slices of seconds;
// only without an eventfd is the flag polled every 50 ms.
int pollWaking(int fd, short events, const core::Deadline& deadline, const core::AbortFlag* abort) {
  const int wake = abort ? abort->wakeFd() : -1;
  pollfd p[2] = {{fd, events, 0}, {wake, POLLIN, 0}};
  const int ms = deadline.remainingMillisForPoll(abort && wake < 0 ? 50 : 5000);
  const int r = ::poll(p, wake >= 0 ? 2 : 1, std::max(ms, 1));
  if (r <= 0) return r;
  return p[0].revents != 0 ? 1 : 0;
}
}  // namespace

core::Status Socket::waitFor(short events, const core::Deadline& deadline, const core::AbortFlag* abort) {
  while (true) {
    if (shut_.load()) return core::unavailable("connection was shut down");
    if (abort && abort->aborted()) return core::aborted("abort flag set");
    if (deadline.expired()) return core::deadlineExceeded("socket wait ran past its deadline");
    int r = pollWaking(fd_, events, deadline, abort);
    if (r < 0) {
      if (errno == EINTR) continue;
      return errnoStatus("poll", errno);
    }
    if (r > 0) return core::okStatus();  // readable/writable or error: the syscall will tell
  }
}

core::Status Socket::readFull(void* buf, size_t n, const core::Deadline& deadline, const core::AbortFlag* abort) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    if (shut_.load()) return core::unavailable("connection was shut down");
    ssize_t r;
    if (ssl_) {
      int want = 0;
      {
        std::lock_guard<std::mutex> lock(ssl_mu_);
        int k = SSL_read(ssl_, p, static_cast<int>(std::min<size_t>(n, 1 << 30)));
        if (k > 0) {
          r = k;
        } else {
          int err = SSL_get_error(ssl_, k);
          if (err == SSL_ERROR_WANT_READ) want = POLLIN;
          else if (err == SSL_ERROR_WANT_WRITE) want = POLLOUT;
          else if (err == SSL_ERROR_ZERO_RETURN) return core::unavailable("peer closed the TLS connection");
          else return tlsError("TLS read", ssl_);
          r = -1;
        }
      }
      if (r < 0) {
        ARCH_RETURN_IF_ERROR(waitFor(static_cast<short>(want), deadline, abort));
        continue;
      }
    } else {
      r = ::recv(fd_, p, n, 0);
      if (r == 0) return core::unavailable("peer closed the connection");
      if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          ARCH_RETURN_IF_ERROR(waitFor(POLLIN, deadline, abort));
          continue;
        }
        if (errno == EINTR) continue;
        return errnoStatus("recv", errno);
      }
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return core::okStatus();
}

core::Status Socket::writeTwo(const void* a, size_t na, const void* b, size_t nb, const core::Deadline& deadline,
                              const core::AbortFlag* abort) {
  if (ssl_) {
    ARCH_RETURN_IF_ERROR(writeFull(a, na, deadline, abort));
    return writeFull(b, nb, deadline, abort);
  }
  iovec iov[2] = {{const_cast<void*>(a), na}, {const_cast<void*>(b), nb}};
  int idx = 0;
  while (idx < 2) {
    if (iov[idx].iov_len == 0) {
      ++idx;
      continue;
    }
    if (shut_.load()) return core::unavailable("connection was shut down");
    msghdr msg{};
    msg.msg_iov = iov + idx;
    msg.msg_iovlen = static_cast<size_t>(2 - idx);
    ssize_t r = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        ARCH_RETURN_IF_ERROR(waitFor(POLLOUT, deadline, abort));
        continue;
      }
      if (errno == EINTR) continue;
      return errnoStatus("send", errno);
    }
    size_t left = static_cast<size_t>(r);
    while (idx < 2 && left >= iov[idx].iov_len) {
      left -= iov[idx].iov_len;
      ++idx;
    }
    if (idx < 2) {
      iov[idx].iov_base = static_cast<uint8_t*>(iov[idx].iov_base) + left;
      iov[idx].iov_len -= left;
    }
  }
  return core::okStatus();
}

core::Status Socket::writeFull(const void* buf, size_t n, const core::Deadline& deadline,
                               const core::AbortFlag* abort) {
  if (!ssl_) return writeTwo(buf, n, nullptr, 0, deadline, abort);
  const auto* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    if (shut_.load()) return core::unavailable("connection was shut down");
    int want = 0;
    int k;
    {
      std::lock_guard<std::mutex> lock(ssl_mu_);
      k = SSL_write(ssl_, p, static_cast<int>(std::min<size_t>(n, 1 << 30)));
      if (k <= 0) {
        int err = SSL_get_error(ssl_, k);
        if (err == SSL_ERROR_WANT_READ) want = POLLIN;
        else if (err == SSL_ERROR_WANT_WRITE) want = POLLOUT;
        else return tlsError("TLS write", ssl_);
      }
    }
    if (k <= 0) {
      ARCH_RETURN_IF_ERROR(waitFor(static_cast<short>(want), deadline, abort));
      continue;
    }
    p += k;
    n -= static_cast<size_t>(k);
  }
  return core::okStatus();
}

core::Status Socket::writeFrame(FrameHeader h, std::span<const uint8_t> payload, const core::Deadline& deadline,
                                const core::AbortFlag* abort) {
  h.length = static_cast<uint32_t>(payload.size());
  if (h.type != FrameType::kData) {
    h.offset = 0;
    h.total = payload.size();
  }
  h.crc = core::crc32c(payload.data(), payload.size());
  uint8_t hdr[kFrameHeaderSize];
  encodeHeader(h, hdr);
  return writeTwo(hdr, sizeof(hdr), payload.data(), payload.size(), deadline, abort);
}

core::Status Socket::readFrame(FrameHeader* h, std::vector<uint8_t>* payload, const core::Deadline& deadline,
                               const core::AbortFlag* abort, uint32_t max_payload) {
  uint8_t hdr[kFrameHeaderSize];
  ARCH_RETURN_IF_ERROR(readFull(hdr, sizeof(hdr), deadline, abort));
  ARCH_ASSIGN_OR_RETURN(*h, decodeHeader(hdr, max_payload));
  payload->resize(h->length);
  ARCH_RETURN_IF_ERROR(readFull(payload->data(), h->length, deadline, abort));
  return checkPayload(*h, *payload);
}

// ---- TLS -------------------------------------------------------------------------

core::Status Socket::startTls(bool server, const TlsFiles& files, const core::Deadline& deadline) {
  ARCH_ASSIGN_OR_RETURN(SSL_CTX * ctx, tlsContext(server, files));
  ssl_ = SSL_new(ctx);
  if (!ssl_) return core::internalError("SSL_new: " + sslError());
  BIO* bio = socketBio(fd_);
  if (!bio) return core::internalError("BIO_new: " + sslError());
  SSL_set_bio(ssl_, bio, bio);  // the SSL object owns the BIO; the fd stays ours
  while (true) {
    int k = server ? SSL_accept(ssl_) : SSL_connect(ssl_);
    if (k == 1) return core::okStatus();
    int err = SSL_get_error(ssl_, k);
    if (err == SSL_ERROR_WANT_READ) {
      ARCH_RETURN_IF_ERROR(waitFor(POLLIN, deadline, nullptr));
    } else if (err == SSL_ERROR_WANT_WRITE) {
      ARCH_RETURN_IF_ERROR(waitFor(POLLOUT, deadline, nullptr));
    } else {
      return tlsError("TLS handshake", ssl_);
    }
  }
}

std::vector<uint8_t> Socket::channelBinding() const {
  if (!ssl_) return {};
  std::vector<uint8_t> out(32);
  static const char kLabel[] = "EXPORTER-archipelago-handshake";
  if (SSL_export_keying_material(ssl_, out.data(), out.size(), kLabel, sizeof(kLabel) - 1, nullptr, 0, 0) != 1) {
    return {};
  }
  return out;
}

// ---- connect / listen ---------------------------------------------------------

core::Result<std::pair<std::string, int>> splitHostPort(const std::string& address) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos) return core::invalidArgument("address '" + address + "' is not HOST:PORT");
  std::string host = address.substr(0, colon);
  // "[::1]:29500": an IPv6 address is bracketed so its colons are not the port's.
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  else if (host.find(':') != std::string::npos) {
    return core::invalidArgument("address '" + address + "': write an IPv6 address in brackets, e.g. [" + host + "]:PORT");
  }
  int port = 0;
  try {
    port = std::stoi(address.substr(colon + 1));
  } catch (...) {
    return core::invalidArgument("address '" + address + "' has no numeric port");
  }
  if (port < 0 || port > 65535) return core::invalidArgument("address '" + address + "': port out of range");
  return std::make_pair(host, port);
}

std::string joinHostPort(const std::string& host, int port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

namespace {

struct SockAddr {
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family() const { return ss.ss_family; }
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&ss); }
};

// IPv4 or IPv6, a literal or a name; "", "0.0.0.0" and "*" are every IPv4
// interface, "::" every interface.
core::Result<SockAddr> resolve(const std::string& host, int port) {
  SockAddr a;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&a.ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&a.ss);
  if (host.empty() || host == "0.0.0.0" || host == "*") {
    v4->sin_family = AF_INET;
    v4->sin_addr.s_addr = htonl(INADDR_ANY);
  } else if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
  } else {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || !res) {
      return core::invalidArgument("cannot resolve host '" + host + "'");
    }
    std::memcpy(&a.ss, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
  }
  if (a.family() == AF_INET6) {
    v6->sin6_port = htons(static_cast<uint16_t>(port));
    a.len = sizeof(sockaddr_in6);
  } else {
    v4->sin_port = htons(static_cast<uint16_t>(port));
    a.len = sizeof(sockaddr_in);
  }
  return a;
}

int portOf(const sockaddr_storage& ss) {
  return ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port)
                                  : ntohs(reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
}

}  // namespace

core::Result<std::pair<int, int>> listenTcp(const std::string& host, int port) {
  ARCH_ASSIGN_OR_RETURN(SockAddr sa, resolve(host, port));
  int fd = ::socket(sa.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return errnoStatus("socket", errno);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, sa.get(), sa.len) != 0) {
    int e = errno;
    ::close(fd);
    return core::unavailable("bind " + joinHostPort(host, port) + ": " + std::strerror(e));
  }
  if (::listen(fd, 512) != 0) {
    int e = errno;
    ::close(fd);
    return errnoStatus("listen", e);
  }
  socklen_t len = sizeof(sa.ss);
  getsockname(fd, reinterpret_cast<sockaddr*>(&sa.ss), &len);
  int fl = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  return std::make_pair(fd, portOf(sa.ss));
}

std::string Socket::peerAddress() const {
  sockaddr_storage sa{};
  socklen_t len = sizeof(sa);
  if (::getpeername(fd_, reinterpret_cast<sockaddr*>(&sa), &len) != 0) return "unknown";
  char host[INET6_ADDRSTRLEN] = {0};
  if (sa.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&sa);
    if (!::inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host))) return "unknown";
    return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (sa.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&sa);
    if (!::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host))) return "unknown";
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return "unknown";
}

core::Result<std::unique_ptr<Socket>> acceptTcp(int listen_fd, const core::Deadline& deadline,
                                                const core::AbortFlag* abort) {
  while (true) {
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) {
      setCommonOptions(fd);
      return std::make_unique<Socket>(fd);
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return errnoStatus("accept", errno);
    if (abort && abort->aborted()) return core::aborted("accept aborted");
    if (deadline.expired()) return core::deadlineExceeded("no connection before the deadline");
    pollWaking(listen_fd, POLLIN, deadline, abort);
  }
}

core::Result<std::unique_ptr<Socket>> connectTcp(const std::string& host, int port, const core::Deadline& deadline,
                                                 const core::AbortFlag* abort) {
  ARCH_ASSIGN_OR_RETURN(SockAddr sa, resolve(host, port));
  const std::string where = joinHostPort(host, port);
  // Retry refused connections until the deadline: the peer may not listen yet.
  int backoff_ms = 5;
  while (true) {
    int fd = ::socket(sa.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return errnoStatus("socket", errno);
    setCommonOptions(fd);
    int r = ::connect(fd, sa.get(), sa.len);
    int err = r == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      auto sock = std::make_unique<Socket>(fd);
      core::Status st = sock->waitFor(POLLOUT, deadline, abort);
      if (!st.isOk()) return st.withContext("connect " + where);
      socklen_t len = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err == 0) return sock;
    } else if (err == 0) {
      return std::make_unique<Socket>(fd);
    } else {
      ::close(fd);
    }
    if (err != ECONNREFUSED && err != ETIMEDOUT && err != ECONNRESET && err != EHOSTUNREACH) {
      return core::unavailable("connect " + where + ": " + std::strerror(err));
    }
    if (abort && abort->aborted()) return core::aborted("connect " + where + " aborted");
    if (deadline.expired()) return core::deadlineExceeded("connect " + where + ": " + std::strerror(err));
    ::usleep(static_cast<useconds_t>(backoff_ms * 1000));
    backoff_ms = std::min(backoff_ms * 2, 200);
  }
}

}  // namespace archipelago::comm
