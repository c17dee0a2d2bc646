// Internal to `archipelago bench comm`: the TCP floor of an allreduce on
// these hosts, the row `tcp_floor`. Each rank streams the bytes a ring
// allreduce sends, 2(n-1)/n of the message, to the next rank over one plain
// TCP connection while it receives as many from the previous rank: no
// framing, no reduction, no ordering between pieces, send and receive in two
// threads. Every bandwidth-optimal allreduce sends and receives at least
// that much per rank (Patarasuk and Yuan's bound), through the same kernel
// copies, so no allreduce over TCP between these ranks can beat this row's
// time: it bounds what "N x Gloo" a TCP implementation can reach here.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

class Socket;

class TcpFloor {
 public:
  // Connects this rank to the next one of `g` (plain TCP, listening on
  // `host`, the address peers reach this rank at); the addresses travel
  // through `g`. Every rank of g must call it.
  static core::Result<std::unique_ptr<TcpFloor>> connect(Group& g, const std::string& host);
  ~TcpFloor();
  // One allreduce's worth of traffic for a message of `bytes`: sends
  // 2(n-1)/n of it, read from `src`, to the next rank and receives as much
  // from the previous one into `dst` (each at least `bytes` long, reused
  // piece by piece as a ring reuses its blocks).
  core::Status exchange(const void* src, void* dst, size_t bytes);

 private:
  TcpFloor(int n, std::unique_ptr<Socket> next, std::unique_ptr<Socket> prev);
  int n_;
  std::unique_ptr<Socket> next_, prev_;
};

}  // namespace archipelago::comm
