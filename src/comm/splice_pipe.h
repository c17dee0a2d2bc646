// Internal: zero-copy sends on Linux. A SplicePipe pushes a frame (header +
// payload) into a TCP socket with vmsplice + splice: the payload's pages are
// referenced by the socket buffers (kernel 6.x: MSG_SPLICE_PAGES), not
// copied, so on loopback the receiver's read is the only copy of each byte.
//
// The price: the kernel reads the sender's memory until the receiver has
// consumed the bytes, long after send() would have returned. A caller must
// not write (or let anyone write) the payload's memory before the peer says
// it read it; the Mesh does this with kFrameFlagAckWanted / kDataAck (see
// mesh.h, "Spliced sends"). The header is copied into the pipe, so it may
// live on the stack.
#pragma once

#include <cstddef>
#include <memory>

#include "archipelago/core/status.h"
#include "comm/socket.h"

namespace archipelago::comm {

class SplicePipe {
 public:
  // A pipe of about `pipe_bytes` (the kernel rounds to pages and may cap it
  // at /proc/sys/fs/pipe-max-size; one page is the least).
  static core::Result<std::unique_ptr<SplicePipe>> create(size_t pipe_bytes);
  ~SplicePipe();
  SplicePipe(const SplicePipe&) = delete;
  SplicePipe& operator=(const SplicePipe&) = delete;

  size_t capacity() const { return capacity_; }
  // Writes hdr (copied) then payload (referenced) to sock as one stream of
  // bytes. Only one thread may send through a pipe at a time. On error the
  // pipe may hold residue and the socket stands mid-frame: both are done.
  core::Status send(Socket& sock, const void* hdr, size_t nh, const void* payload, size_t np,
                    const core::AbortFlag* abort);

 private:
  SplicePipe(int rd, int wr, size_t capacity) : rd_(rd), wr_(wr), capacity_(capacity) {}
  int rd_ = -1, wr_ = -1;
  size_t capacity_ = 0;
};

}  // namespace archipelago::comm
