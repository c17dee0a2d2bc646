// Internal: the authenticated handshake over a Socket, and the Endpoint (a
// listening socket that accepts peers of any epoch, authenticates them and
// parks each stream until the Mesh of that epoch takes it).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>

#include "comm/refusal_log.h"
#include "comm/socket.h"

namespace archipelago::comm {

// Client side: TLS with `tls` unless it is null, HELLO, verify CHALLENGE,
// AUTH, wait ACCEPT. kPermissionDenied if the server lacks the secret or
// refuses ours, kFailedPrecondition for a stale epoch, kUnavailable when
// TLS fails (the reason in words: a certificate of another CA, ...).
core::Status clientHandshake(Socket& sock, std::string_view secret, const Hello& hello, const TlsFiles* tls,
                             const core::Deadline& deadline);
// Whether a client (by its HELLO's role and rank) must use TLS.
using TlsPolicy = std::function<bool(PeerRole role, int32_t client_rank)>;
// Server side: returns the authenticated HELLO. A client that must use TLS
// (tls_required) and did not is refused; a client that asks for TLS is
// refused when `tls` is empty (this end has no credentials). On refusal
// sends REJECT and returns the reason.
core::Result<Hello> serverHandshake(Socket& sock, std::string_view secret, int32_t my_rank, uint32_t min_epoch,
                                    const TlsPolicy& tls_required, const core::Deadline& deadline,
                                    const TlsFiles& tls);

class Endpoint {
 public:
  static core::Result<std::unique_ptr<Endpoint>> listen(const std::string& host, int rank, std::string secret,
                                                        TlsPolicy tls_policy, TlsFiles tls = {});
  ~Endpoint();
  int port() const { return port_; }
  void setMinEpoch(uint32_t epoch);
  // An authenticated stream that `peer` opened to us for (epoch, stream).
  core::Result<std::unique_ptr<Socket>> take(uint32_t epoch, int peer, uint32_t stream,
                                             const core::Deadline& deadline, const core::AbortFlag* abort);

 private:
  Endpoint() = default;
  void acceptLoop();
  int listen_fd_ = -1;
  int port_ = 0;
  int rank_ = 0;
  std::string secret_;
  TlsPolicy tls_policy_;
  TlsFiles tls_;
  core::AbortFlag stop_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint32_t min_epoch_ = 0;
  std::map<std::tuple<uint32_t, int, uint32_t>, std::unique_ptr<Socket>> parked_;
  std::unique_ptr<RefusalLog> refusals_;
};

// Opens one authenticated stream to `peer` at address (TLS unless `tls` is null).
core::Result<std::unique_ptr<Socket>> dialPeer(const std::string& address, std::string_view secret, int my_rank,
                                               int peer, uint32_t epoch, uint32_t stream, const TlsFiles* tls,
                                               const core::Deadline& deadline, const core::AbortFlag* abort);

}  // namespace archipelago::comm
