// Internal: one TCP connection (optionally TLS) with deadline- and
// abort-aware full reads/writes, and frame I/O on top. Non-blocking fd; a
// call first tries the syscall and only polls when the kernel has nothing;
// the poll also watches the abort flag's eventfd (AbortFlag::wakeFd), so an
// abort or a shutdown() wakes it at once and an idle wait costs no wake-ups. Thread model: one
// reader thread and one writer thread may use a Socket at the same time
// (plain TCP); with TLS, reads and writes are serialised by a mutex because
// an SSL object is not safe for concurrent use.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "archipelago/comm/tls.h"
#include "archipelago/comm/wire.h"
#include "archipelago/core/clock.h"
#include "archipelago/comm/address.h"
#include "archipelago/core/status.h"

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;

namespace archipelago::comm {

class Socket {
 public:
  explicit Socket(int fd);
  ~Socket();
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  int fd() const { return fd_; }
  // "ADDR:PORT" of the other end ("[ADDR]:PORT" for IPv6), "unknown" if
  // the kernel cannot say (the peer already left).
  std::string peerAddress() const;
  // Unblocks any thread inside read/write (they return kUnavailable) and
  // makes every later call fail. Safe from any thread, idempotent.
  void shutdown();
  bool isShutdown() const { return shut_.load(); }
  // Half-close: the peer reads everything we sent, then EOF.
  void shutdownWrite();
  // After a refused TLS handshake: half-close and discard what the peer
  // still sends until it closes (or the deadline). Closing with its bytes
  // unread would reset the connection, and the reset can destroy our alert
  // before the peer reads it: it would see "connection closed", not why.
  void drainUntilPeerCloses(const core::Deadline& deadline);

  core::Status readFull(void* buf, size_t n, const core::Deadline& deadline, const core::AbortFlag* abort);
  core::Status writeFull(const void* buf, size_t n, const core::Deadline& deadline, const core::AbortFlag* abort);
  // Writes two buffers (header + payload) as one logical write.
  core::Status writeTwo(const void* a, size_t na, const void* b, size_t nb, const core::Deadline& deadline,
                        const core::AbortFlag* abort);

  // Frame helpers for control traffic (handshake, coordinator): payload is
  // copied into a vector; max_payload bounds what a peer can make us allocate.
  core::Status writeFrame(FrameHeader h, std::span<const uint8_t> payload, const core::Deadline& deadline,
                          const core::AbortFlag* abort = nullptr);
  core::Status readFrame(FrameHeader* h, std::vector<uint8_t>* payload, const core::Deadline& deadline,
                         const core::AbortFlag* abort = nullptr, uint32_t max_payload = kMaxFramePayload);

  // TLS 1.3, mutual (comm/tls_context.h): wraps the connection; call
  // before any other I/O. kUnavailable saying why when the handshake fails
  // (a peer certificate the job's CA did not sign, none at all, ...).
  core::Status startTls(bool server, const TlsFiles& files, const core::Deadline& deadline);
  bool tls() const { return ssl_ != nullptr; }
  // 32 bytes of TLS exporter keying material (empty without TLS).
  std::vector<uint8_t> channelBinding() const;

  // Polls until the fd is ready for `events`, the deadline passes, or abort.
  core::Status waitFor(short events, const core::Deadline& deadline, const core::AbortFlag* abort);

 private:
  int fd_;
  std::atomic<bool> shut_{false};
  SSL* ssl_ = nullptr;
  std::mutex ssl_mu_;
};

// Binds and listens on host:port (port 0 = any); returns the fd and the real port.
core::Result<std::pair<int, int>> listenTcp(const std::string& host, int port);
// Accepts one connection, waiting at most until the deadline.
core::Result<std::unique_ptr<Socket>> acceptTcp(int listen_fd, const core::Deadline& deadline,
                                                const core::AbortFlag* abort);
core::Result<std::unique_ptr<Socket>> connectTcp(const std::string& host, int port, const core::Deadline& deadline,
                                                 const core::AbortFlag* abort);
// "host:port" -> pair
// splitHostPort / joinHostPort: archipelago/comm/address.h.

}  // namespace archipelago::comm
