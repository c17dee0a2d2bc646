#include "comm/endpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>

#include "archipelago/core/log.h"

namespace archipelago::comm {

namespace {
constexpr uint8_t kPlainMarker = 'P';
constexpr uint8_t kTlsMarker = 'T';
constexpr uint32_t kHandshakeMax = 4096;
}  // namespace

core::Status clientHandshake(Socket& sock, std::string_view secret, const Hello& hello_in, const TlsFiles* tls,
                             const core::Deadline& deadline) {
  uint8_t marker = tls ? kTlsMarker : kPlainMarker;
  ARCH_RETURN_IF_ERROR(sock.writeFull(&marker, 1, deadline, nullptr));
  if (tls) ARCH_RETURN_IF_ERROR(sock.startTls(false, *tls, deadline));
  std::vector<uint8_t> channel = sock.channelBinding();
  Hello hello = hello_in;
  randomBytes(hello.nonce);
  FrameHeader h;
  h.type = FrameType::kHello;
  h.epoch = hello.epoch;
  ARCH_RETURN_IF_ERROR(sock.writeFrame(h, encodeHello(hello), deadline));
  std::vector<uint8_t> payload;
  // TLS 1.3 finishes the client's side before the server has checked the
  // client's certificate: a refusal of it arrives here, as an alert
  // (kPermissionDenied from the socket).
  ARCH_RETURN_IF_ERROR(sock.readFrame(&h, &payload, deadline, nullptr, kHandshakeMax));
  if (h.type == FrameType::kReject) {
    std::string why(payload.begin(), payload.end());
    if (why.rfind("stale", 0) == 0) return core::failedPrecondition("server refused: " + why);
    return core::permissionDenied("server refused: " + why);
  }
  if (h.type != FrameType::kChallenge) return core::dataLoss("expected CHALLENGE in the handshake");
  ARCH_ASSIGN_OR_RETURN(Challenge ch, decodeChallenge(payload));
  Mac want = handshakeMac(secret, 'S', hello, ch.nonce, channel);
  if (!macEqual(want, ch.mac)) {
    return core::permissionDenied("server failed to prove the job secret (wrong secret or not our job)");
  }
  Mac mine = handshakeMac(secret, 'C', hello, ch.nonce, channel);
  h = FrameHeader{};
  h.type = FrameType::kAuth;
  h.epoch = hello.epoch;
  ARCH_RETURN_IF_ERROR(sock.writeFrame(h, mine, deadline));
  ARCH_RETURN_IF_ERROR(sock.readFrame(&h, &payload, deadline, nullptr, kHandshakeMax));
  if (h.type == FrameType::kAccept) return core::okStatus();
  std::string why(payload.begin(), payload.end());
  if (h.type == FrameType::kReject && why.rfind("stale", 0) == 0) {
    return core::failedPrecondition("server refused: " + why);
  }
  return core::permissionDenied("server refused: " + why);
}

core::Result<Hello> serverHandshake(Socket& sock, std::string_view secret, int32_t my_rank, uint32_t min_epoch,
                                    const TlsPolicy& tls_required, const core::Deadline& deadline,
                                    const TlsFiles& tls) {
  uint8_t marker = 0;
  ARCH_RETURN_IF_ERROR(sock.readFull(&marker, 1, deadline, nullptr));
  if (marker != kPlainMarker && marker != kTlsMarker) return core::dataLoss("not an archipelago handshake");
  if (marker == kTlsMarker && tls.empty()) {
    // Nothing to answer a ClientHello with: the client's TLS handshake fails on the close.
    return core::permissionDenied("a client asked for TLS, but this end has no TLS credentials "
                                  "(security.credentials / --credentials)");
  }
  if (marker == kTlsMarker) {
    if (core::Status st = sock.startTls(true, tls, deadline); !st.isOk()) {
      // Let the client read our alert (a refused certificate) before the connection goes.
      sock.drainUntilPeerCloses(core::Deadline(std::min(deadline.at(), core::Deadline::afterSeconds(1).at())));
      return st;
    }
  }
  std::vector<uint8_t> channel = sock.channelBinding();
  FrameHeader h;
  std::vector<uint8_t> payload;
  ARCH_RETURN_IF_ERROR(sock.readFrame(&h, &payload, deadline, nullptr, kHandshakeMax));
  if (h.type != FrameType::kHello) return core::dataLoss("expected HELLO in the handshake");
  ARCH_ASSIGN_OR_RETURN(Hello hello, decodeHello(payload));
  auto reject = [&](const core::Status& why) -> core::Status {
    FrameHeader r;
    r.type = FrameType::kReject;
    std::string text = why.code() == core::StatusCode::kFailedPrecondition ? "stale epoch: " + why.message()
                                                                            : why.message();
    // Best effort: the peer learns why; the rejection stands either way.
    (void)sock.writeFrame(r, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()),
                          deadline);
    return why;
  };
  if (marker != kTlsMarker && tls_required && tls_required(hello.role, hello.client_rank)) {
    return reject(core::permissionDenied(
        std::string(hello.role == PeerRole::kPeer ? "rank " + std::to_string(hello.client_rank) : "a coordinator client") +
        " must use TLS on this link (the job's security.tls or its strait's tls: true)"));
  }
  Challenge ch;
  randomBytes(ch.nonce);
  ch.mac = handshakeMac(secret, 'S', hello, ch.nonce, channel);
  h = FrameHeader{};
  h.type = FrameType::kChallenge;
  h.epoch = hello.epoch;
  ARCH_RETURN_IF_ERROR(sock.writeFrame(h, encodeChallenge(ch), deadline));
  ARCH_RETURN_IF_ERROR(sock.readFrame(&h, &payload, deadline, nullptr, kHandshakeMax));
  if (h.type != FrameType::kAuth) return core::dataLoss("expected AUTH in the handshake");
  core::Status v = verifyClient(secret, hello, ch, payload, min_epoch, my_rank, channel);
  if (!v.isOk()) return reject(v);
  h = FrameHeader{};
  h.type = FrameType::kAccept;
  h.epoch = hello.epoch;
  ARCH_RETURN_IF_ERROR(sock.writeFrame(h, {}, deadline));
  return hello;
}

core::Result<std::unique_ptr<Endpoint>> Endpoint::listen(const std::string& host, int rank, std::string secret,
                                                         TlsPolicy tls_policy, TlsFiles tls) {
  ARCH_ASSIGN_OR_RETURN(auto lp, listenTcp(host, 0));
  std::unique_ptr<Endpoint> ep(new Endpoint());
  ep->listen_fd_ = lp.first;
  ep->port_ = lp.second;
  ep->rank_ = rank;
  ep->secret_ = std::move(secret);
  ep->tls_policy_ = std::move(tls_policy);
  ep->tls_ = std::move(tls);
  ep->refusals_ = std::make_unique<RefusalLog>("comm rank " + std::to_string(rank));
  Endpoint* raw = ep.get();
  ep->thread_ = std::thread([raw] { raw->acceptLoop(); });
  return ep;
}

Endpoint::~Endpoint() {
  stop_.abort();
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
}

void Endpoint::setMinEpoch(uint32_t epoch) {
  std::lock_guard<std::mutex> lock(mu_);
  min_epoch_ = epoch;
  for (auto it = parked_.begin(); it != parked_.end();) {
    it = std::get<0>(it->first) < epoch ? parked_.erase(it) : std::next(it);
  }
}

void Endpoint::acceptLoop() {
  while (!stop_.aborted()) {
    auto sr = acceptTcp(listen_fd_, core::Deadline::afterSeconds(0.2), &stop_);
    if (!sr.isOk()) continue;
    std::unique_ptr<Socket> sock = std::move(sr).value();
    uint32_t min_epoch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      min_epoch = min_epoch_;
    }
    // A stalled or hostile client costs at most this long.
    auto hr = serverHandshake(*sock, secret_, rank_, min_epoch, tls_policy_, core::Deadline::afterSeconds(5), tls_);
    if (!hr.isOk()) {
      refusals_->refused(sock->peerAddress(), hr.status());
      continue;
    }
    const Hello& hello = *hr;
    std::lock_guard<std::mutex> lock(mu_);
    parked_[{hello.epoch, hello.client_rank, hello.stream}] = std::move(sock);
    cv_.notify_all();
  }
}

core::Result<std::unique_ptr<Socket>> Endpoint::take(uint32_t epoch, int peer, uint32_t stream,
                                                     const core::Deadline& deadline, const core::AbortFlag* abort) {
  std::unique_lock<std::mutex> lock(mu_);
  auto key = std::make_tuple(epoch, peer, stream);
  while (true) {
    auto it = parked_.find(key);
    if (it != parked_.end()) {
      auto s = std::move(it->second);
      parked_.erase(it);
      return s;
    }
    if (abort && abort->aborted()) return core::aborted("waiting for rank " + std::to_string(peer) + " aborted");
    if (deadline.expired()) {
      return core::deadlineExceeded("rank " + std::to_string(peer) + " did not connect (epoch " +
                                    std::to_string(epoch) + ", stream " + std::to_string(stream) + ")");
    }
    cv_.wait_for(lock, std::chrono::milliseconds(20));
  }
}

core::Result<std::unique_ptr<Socket>> dialPeer(const std::string& address, std::string_view secret, int my_rank,
                                               int peer, uint32_t epoch, uint32_t stream, const TlsFiles* tls,
                                               const core::Deadline& deadline, const core::AbortFlag* abort) {
  ARCH_ASSIGN_OR_RETURN(auto hp, splitHostPort(address));
  ARCH_ASSIGN_OR_RETURN(auto sock, connectTcp(hp.first, hp.second, deadline, abort));
  Hello hello;
  hello.role = PeerRole::kPeer;
  hello.client_rank = my_rank;
  hello.server_rank = peer;
  hello.epoch = epoch;
  hello.stream = stream;
  core::Status st = clientHandshake(*sock, secret, hello, tls, deadline);
  if (!st.isOk()) return st.withContext("handshake with rank " + std::to_string(peer) + " at " + address);
  return sock;
}

}  // namespace archipelago::comm
