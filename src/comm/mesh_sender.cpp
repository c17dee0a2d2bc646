// The sender side of a Mesh: one thread per stream drains the stream's queue
// of parts (data stripes, same-host announcements and acks, heartbeats, the
// goodbye) and writes each as frames. See mesh.h for what each thread owns.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "archipelago/core/hash.h"
#include "archipelago/core/log.h"
#include "comm/mesh.h"

namespace archipelago::comm {

// Test hook of the chaos tests: while the file named by
// ARCHIPELAGO_TEST_CORRUPT_FRAME_FILE exists, the first sender to remove it
// sends one data frame with a wrong checksum (the receiver must fail the
// epoch with kDataLoss). Only links that carry checksums take part (trusted
// links have none to corrupt). Costs nothing when the variable is unset.
static bool testCorruptNextFrame() {
  static const char* path = std::getenv("ARCHIPELAGO_TEST_CORRUPT_FRAME_FILE");
  return path && *path && ::unlink(path) == 0;
}

void Mesh::senderLoop(Stream* s) {
  const std::string who = "rank " + std::to_string(s->peer) + " stream " + std::to_string(s->index);
  while (true) {
    Part part;
    {
      std::unique_lock<std::mutex> lock(mu_);
      s->cv.wait(lock, [&] { return failed_ || !s->queue.empty(); });
      if (failed_) return;
      part = std::move(s->queue.front());
      s->queue.pop_front();
      ++active_io_;
    }
    core::Status st;
    if (part.ack) {
      st = writeAck(s, part);
    } else if (part.req && !part.no_remote && s->remote.load() && part.len >= options_.same_host_min_bytes) {
      // Same host: the part completes on the peer's ack (receiver thread),
      // so it takes its own way out instead of finishPart().
      st = writeAnnounce(s, part);
      if (!finishAnnounce(s, st, who)) return;
      continue;
    } else if (part.bye) {
      st = writeBye(s);
    } else if (part.heartbeat) {
      st = writeHeartbeat(s);
    } else {
      st = writeData(s, part);
    }
    if (!finishPart(s, part, st, who)) return;
  }
}

core::Status Mesh::writeFrameOn(Stream* s, const FrameHeader& h, const void* payload, size_t len) {
  uint8_t hdr[kFrameHeaderSize];
  encodeHeader(h, hdr);
  s->mid_frame = true;
  s->writing = true;
  core::Status st = len == 0 ? s->sock->writeFull(hdr, sizeof(hdr), core::Deadline::never(), &io_abort_)
                             : s->sock->writeTwo(hdr, sizeof(hdr), payload, len, core::Deadline::never(), &io_abort_);
  s->writing = false;
  if (st.isOk()) s->mid_frame = false;
  return st;
}

core::Status Mesh::writeAck(Stream* s, const Part& part) {
  uint8_t pl[kAckPayload];
  std::memcpy(pl, &part.ack_id, 8);
  pl[8] = part.ack_ok ? 1 : 0;
  FrameHeader h;
  h.type = FrameType::kRemoteAck;
  h.epoch = epoch_;
  h.length = kAckPayload;
  h.total = kAckPayload;
  h.crc = core::crc32c(pl, kAckPayload);
  return writeFrameOn(s, h, pl, kAckPayload);
}

core::Status Mesh::writeAnnounce(Stream* s, const Part& part) {
  // Registered before the frame goes out: the ack may arrive (on the
  // receiver thread) before this write returns.
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    id = ++next_remote_id_;
    remote_pending_[id] = RemotePending{part, s};
  }
  uint8_t pl[kRemotePayload];
  int32_t pid = static_cast<int32_t>(::getpid());
  uint64_t addr = reinterpret_cast<uint64_t>(part.req->data + part.offset);
  uint64_t len = part.len;
  std::memcpy(pl, &id, 8);
  std::memcpy(pl + 8, &pid, 4);
  std::memcpy(pl + 12, &addr, 8);
  std::memcpy(pl + 20, &len, 8);
  uint64_t host = hostId();
  std::memcpy(pl + 28, &host, 8);
  FrameHeader h;
  h.type = FrameType::kRemote;
  h.epoch = epoch_;
  h.length = kRemotePayload;
  h.tag = part.req->tag;
  h.offset = part.offset;
  h.total = part.req->total;
  h.crc = core::crc32c(pl, kRemotePayload);
  return writeFrameOn(s, h, pl, kRemotePayload);
}

bool Mesh::finishAnnounce(Stream* s, const core::Status& st, const std::string& who) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --active_io_;
  }
  cv_.notify_all();
  if (!st.isOk()) {
    if (failed()) return false;
    fail(core::unavailable("lost rank " + std::to_string(s->peer) + " (" + st.message() + ")")
             .withContext("send on " + who));
    return false;
  }
  return true;
}

core::Status Mesh::writeBye(Stream* s) {
  FrameHeader h;
  h.type = FrameType::kAbort;
  h.epoch = epoch_;
  h.length = sizeof(kBye) - 1;
  h.total = h.length;
  h.crc = core::crc32c(kBye, h.length);
  return writeFrameOn(s, h, kBye, h.length);
}

core::Status Mesh::writeHeartbeat(Stream* s) {
  FrameHeader h;
  h.type = FrameType::kHeartbeat;
  h.epoch = epoch_;
  h.crc = core::crc32c(nullptr, 0);
  return writeFrameOn(s, h, nullptr, 0);
}

core::Status Mesh::writeData(Stream* s, const Part& part) {
  const bool shaped = s->shaper != nullptr;
  const uint32_t frame_max = shaped ? options_.emulated_frame_bytes : options_.max_frame_bytes;
  core::Status st;
  size_t done = 0;
  while (done < part.len && st.isOk()) {
    // A failing mesh lets the frame in progress finish (so the stream can
    // still carry the abort notice) but starts no new one.
    if (soft_stop_.load()) return core::aborted("the transport of epoch " + std::to_string(epoch_) + " is failing");
    size_t len = std::min<size_t>(part.len - done, frame_max);
    const uint8_t* p = part.req->data + part.offset + done;
    FrameHeader h;
    h.type = FrameType::kData;
    h.epoch = epoch_;
    h.length = static_cast<uint32_t>(len);
    h.tag = part.req->tag;
    h.offset = part.offset + done;
    h.total = part.req->total;
    if (s->crc) {
      h.crc = core::crc32c(p, len);
    } else {
      h.flags |= kFrameFlagNoCrc;
    }
    if (s->crc && testCorruptNextFrame()) {  // only where a checksum can catch it
      h.crc ^= 1u;
      ARCH_LOG_WARN("comm epoch {} rank {}: test hook: the data frame to rank {} (tag {}, bytes {}-{} of {}) carries a "
                    "wrong checksum", epoch_, rank_, s->peer, h.tag, h.offset, h.offset + len, h.total);
    }
    if (shaped) {
      s->last_deliver = s->shaper->send(len + kFrameHeaderSize, s->last_deliver, &io_abort_);
      h.deliver_at_lo = static_cast<uint32_t>(s->last_deliver) | 1u;  // never 0 when shaped
    }
    st = writeFrameOn(s, h, p, len);
    done += len;
  }
  if (st.isOk()) {
    bytes_sent_ += part.len;
    if (shaped) bytes_strait_ += part.len;
  }
  return st;
}

bool Mesh::finishPart(Stream* s, const Part& part, const core::Status& st, const std::string& who) {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    --active_io_;
    if (st.isOk() && part.req) partSentLocked(*part.req);
    // Wake waiters only for a finished message or an ending mesh (each
    // futex wake-up costs a context switch on a busy machine).
    wake = !part.req || part.req->parts_left == 0 || failed_ || closing_;
  }
  if (wake) cv_.notify_all();
  if (!st.isOk()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closing_ || byes_[peerIndex(s->peer)] > 0) return false;  // the link is ending on purpose
      if (failed_) return false;  // already failing: fail() is in charge
    }
    fail(core::unavailable("lost rank " + std::to_string(s->peer) + " (" + st.message() + ")")
             .withContext("send on " + who));
    return false;
  }
  return true;
}

}  // namespace archipelago::comm
