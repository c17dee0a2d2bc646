#include "comm/bench_tcp_floor.h"

#include <unistd.h>

#include <cstring>
#include <thread>
#include <vector>

#include "comm/socket.h"

namespace archipelago::comm {

namespace {
struct Address {
  char host[64];
  int32_t port;
};
}  // namespace

TcpFloor::TcpFloor(int n, std::unique_ptr<Socket> next, std::unique_ptr<Socket> prev)
    : n_(n), next_(std::move(next)), prev_(std::move(prev)) {}

TcpFloor::~TcpFloor() = default;

core::Result<std::unique_ptr<TcpFloor>> TcpFloor::connect(Group& g, const std::string& host) {
  const int n = g.size();
  if (n == 1) return std::unique_ptr<TcpFloor>(new TcpFloor(1, nullptr, nullptr));
  if (host.size() >= sizeof(Address::host)) return core::invalidArgument("tcp floor: host '" + host + "' is too long");
  ARCH_ASSIGN_OR_RETURN(auto listening, listenTcp(host, 0));
  const int lfd = listening.first;
  Address mine{};
  std::memcpy(mine.host, host.data(), host.size());
  mine.port = listening.second;
  std::vector<Address> all(static_cast<size_t>(n));
  core::Status st = g.allgather(&mine, all.data(), sizeof(Address), DType::kU8, OpOptions::within(60));
  core::Result<std::unique_ptr<Socket>> next = core::unavailable("not connected");
  core::Result<std::unique_ptr<Socket>> prev = core::unavailable("not connected");
  if (st.isOk()) {
    const Address& to = all[static_cast<size_t>((g.rank() + 1) % n)];
    // The kernel completes the handshake before accept(): connect, then accept.
    next = connectTcp(std::string(to.host, strnlen(to.host, sizeof(to.host))), to.port,
                      core::Deadline::afterSeconds(30), nullptr);
    if (next.isOk()) prev = acceptTcp(lfd, core::Deadline::afterSeconds(30), nullptr);
  }
  ::close(lfd);
  ARCH_RETURN_IF_ERROR(st.withContext("tcp floor: exchanging addresses"));
  ARCH_RETURN_IF_ERROR(next.status().withContext("tcp floor: connecting to the next rank"));
  ARCH_RETURN_IF_ERROR(prev.status().withContext("tcp floor: accepting the previous rank"));
  return std::unique_ptr<TcpFloor>(new TcpFloor(n, std::move(*next), std::move(*prev)));
}

core::Status TcpFloor::exchange(const void* src, void* dst, size_t bytes) {
  if (n_ == 1) return core::okStatus();
  const size_t piece = bytes / static_cast<size_t>(n_);
  const int pieces = 2 * (n_ - 1);
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
  core::Status sent;
  std::thread sender([&] {
    for (int k = 0; k < pieces && sent.isOk(); ++k) {
      sent = next_->writeFull(in + static_cast<size_t>(k % n_) * piece, piece, core::Deadline::afterSeconds(600),
                              nullptr);
    }
  });
  core::Status received;
  for (int k = 0; k < pieces && received.isOk(); ++k) {
    received = prev_->readFull(out + static_cast<size_t>(k % n_) * piece, piece, core::Deadline::afterSeconds(600),
                               nullptr);
  }
  if (!received.isOk()) next_->shutdown();  // unblocks a sender stuck on a peer that stopped reading
  sender.join();
  ARCH_RETURN_IF_ERROR(received.withContext("tcp floor: receive"));
  return sent.withContext("tcp floor: send");
}

}  // namespace archipelago::comm
