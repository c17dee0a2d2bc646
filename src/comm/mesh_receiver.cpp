// The receiver side of a Mesh: one thread per stream reads frames and puts
// each payload where it belongs: the posted receive buffer, an early buffer
// until the receive is posted, or (same host) a copy straight out of the
// peer's memory. See mesh.h for what each thread owns.
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "archipelago/core/hash.h"
#include "comm/mesh.h"

namespace archipelago::comm {

namespace {
// Copies len bytes at addr in process pid into dst (the single copy).
bool readRemote(int32_t pid, uint8_t* dst, uint64_t addr, uint64_t len) {
  while (len > 0) {
    iovec local{dst, len};
    iovec remote{reinterpret_cast<void*>(addr), len};
    ssize_t k = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (k <= 0) return false;
    dst += k;
    addr += static_cast<uint64_t>(k);
    len -= static_cast<uint64_t>(k);
  }
  return true;
}

int64_t reconstructMicros(uint32_t lo) {
  int64_t now = core::nowMicros();
  int64_t base = now & ~int64_t{0xffffffff};
  int64_t cand = base | lo;
  // Pick the candidate nearest to now (wrap every ~71 minutes).
  if (cand - now > (int64_t{1} << 31)) cand -= int64_t{1} << 32;
  if (now - cand > (int64_t{1} << 31)) cand += int64_t{1} << 32;
  return cand;
}
}  // namespace

void Mesh::copyRemoteLocked(int peer, Slot& slot, const RemoteRange& r) {
  bool ok = r.host == hostId() && r.offset <= slot.total && r.len <= slot.total - r.offset &&
            readRemote(r.pid, slot.dst + r.offset, r.addr, r.len);
  if (ok) {
    slot.reduceRange(r.offset, r.len);
    slot.received += r.len;
  }
  auto* st = static_cast<Stream*>(r.stream);
  Part ack;
  ack.ack = true;
  ack.ack_ok = ok;
  ack.ack_id = r.id;
  st->queue.push_back(ack);
  st->cv.notify_one();
  (void)peer;
}

void Mesh::receiverLoop(Stream* s) {
  const std::string who = "rank " + std::to_string(s->peer) + " stream " + std::to_string(s->index);
  const size_t pi = peerIndex(s->peer);
  while (true) {
    uint8_t hdr[kFrameHeaderSize];
    core::Status st = s->sock->readFull(hdr, sizeof(hdr), core::Deadline::never(), &io_abort_);
    if (!st.isOk()) return loseStream(s, pi, who, st);
    auto hr = decodeHeader(hdr, std::min<uint32_t>(kMaxFramePayload, std::max<uint32_t>(options_.max_frame_bytes,
                                                                                     options_.emulated_frame_bytes)));
    if (!hr.isOk()) return loseStream(s, pi, who, hr.status());
    const FrameHeader h = *hr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_seen_us_[pi] = core::nowMicros();
    }
    if (h.type == FrameType::kHeartbeat) continue;
    if (h.type == FrameType::kAbort) return receiveAbort(s, pi, h);
    if (h.type == FrameType::kRemote || h.type == FrameType::kRemoteAck) {
      if (!receiveSameHost(s, pi, who, h)) return;
      continue;
    }
    if (h.type != FrameType::kData) {
      return loseStream(s, pi, who, core::dataLoss("unexpected frame type " + std::to_string(static_cast<int>(h.type))));
    }
    if (h.epoch != epoch_) {
      return loseStream(s, pi, who,
                        core::failedPrecondition("frame of epoch " + std::to_string(h.epoch) + " on a link of epoch " +
                                                 std::to_string(epoch_)));
    }
    if ((h.flags & kFrameFlagNoCrc) && s->crc) {
      return loseStream(s, pi, who,
                        core::dataLoss("rank " + std::to_string(s->peer) +
                                       " sent a data frame without a CRC32C on a link that requires checksums "
                                       "(both ends must derive the same `checksum` setting from the job)"));
    }
    if (!receiveData(s, pi, who, h)) return;
  }
}

void Mesh::finishStream(Stream* s) {
  std::lock_guard<std::mutex> lock(mu_);
  s->finished = true;
  cv_.notify_all();
}

void Mesh::loseStream(Stream* s, size_t pi, const std::string& who, const core::Status& st) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_ || byes_[pi] > 0) {
      s->finished = true;
      cv_.notify_all();
      return;
    }
  }
  if (st.code() == core::StatusCode::kUnavailable && streams_[pi].size() > 1) {
    // A closed connection may trail the peer's abort notice on a sibling
    // stream: give that a moment so the group reports the original cause.
    // (With one stream the notice, if any, came before the close.)
    for (int i = 0; i < 6; ++i) {
      ::usleep(5000);
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_) return;
    }
  }
  core::Status out = st;
  if (st.code() == core::StatusCode::kUnavailable || st.code() == core::StatusCode::kAborted) {
    out = core::unavailable("lost rank " + std::to_string(s->peer) + " (" + st.message() + ")");
  }
  fail(out.withContext("receive on " + who));
}

void Mesh::receiveAbort(Stream* s, size_t pi, const FrameHeader& h) {
  std::vector<uint8_t> text(h.length);
  core::Status st = s->sock->readFull(text.data(), h.length, core::Deadline::never(), &io_abort_);
  std::string reason(text.begin(), text.end());
  if (st.isOk() && reason == kBye) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++byes_[pi];
    }
    return finishStream(s);
  }
  // The notice reads "<status code name>|<message>" (see fail()).
  core::StatusCode code = core::StatusCode::kAborted;
  auto bar = reason.find('|');
  if (bar != std::string::npos) {
    for (int k = 1; k <= static_cast<int>(core::StatusCode::kInternal); ++k) {
      if (core::statusCodeName(static_cast<core::StatusCode>(k)) == reason.substr(0, bar)) {
        code = static_cast<core::StatusCode>(k);
      }
    }
    reason = reason.substr(bar + 1);
  }
  {
    // Closing anyway: the stream is done. (finishStream would take mu_ again,
    // which this thread holds: the old code deadlocked here.)
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_) {
      s->finished = true;
      cv_.notify_all();
      return;
    }
  }
  return fail(core::Status(code, "rank " + std::to_string(s->peer) + " aborted the epoch: " + reason));
}

bool Mesh::receiveSameHost(Stream* s, size_t pi, const std::string& who, const FrameHeader& h) {
  const size_t want = h.type == FrameType::kRemote ? kRemotePayload : kAckPayload;
  if (h.length != want) {
    loseStream(s, pi, who, core::dataLoss("malformed same-host frame"));
    return false;
  }
  uint8_t pl[kRemotePayload];
  core::Status st = s->sock->readFull(pl, want, core::Deadline::never(), &io_abort_);
  if (st.isOk()) st = checkPayload(h, std::span<const uint8_t>(pl, want));
  if (!st.isOk()) {
    loseStream(s, pi, who, st);
    return false;
  }
  uint64_t id;
  std::memcpy(&id, pl, 8);
  if (h.type == FrameType::kRemoteAck) {
    receiveAck(pi, id, pl[8] != 0);
    return true;
  }
  RemoteRange r;
  r.id = id;
  std::memcpy(&r.pid, pl + 8, 4);
  std::memcpy(&r.addr, pl + 12, 8);
  std::memcpy(&r.len, pl + 20, 8);
  std::memcpy(&r.host, pl + 28, 8);
  r.offset = h.offset;
  r.stream = s;
  if (h.offset > h.total || r.len > h.total - h.offset) {
    loseStream(s, pi, who, core::dataLoss("same-host range out of bounds"));
    return false;
  }
  return receiveRange(s, h, r);
}

void Mesh::receiveAck(size_t pi, uint64_t id, bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = remote_pending_.find(id);
  if (it == remote_pending_.end()) return;  // failed meanwhile
  RemotePending rp = it->second;
  remote_pending_.erase(it);
  if (ok) {
    partSentLocked(*rp.part.req);
    bytes_sent_ += rp.part.len;
  } else {
    // The kernel refused (e.g. ptrace policy): TCP frames from now on.
    for (auto& st2 : streams_[pi]) st2->remote = false;
    rp.part.no_remote = true;
    rp.stream->queue.push_back(rp.part);
    rp.stream->cv.notify_one();
  }
  cv_.notify_all();
}

bool Mesh::receiveRange(Stream* s, const FrameHeader& h, const RemoteRange& r) {
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_) return false;
  Slot& slot = slots_[{s->peer, h.tag}];
  if (slot.posted) {
    if (slot.total != h.total) {
      failed_ = true;
      failure_ = core::dataLoss("rank " + std::to_string(s->peer) + " sent a message of " +
                                std::to_string(h.total) + " bytes where " + std::to_string(slot.total) +
                                " were expected");
    } else {
      // The copy runs unlocked; writers/active_io_ keep waiters and fail() honest.
      uint8_t* dst = slot.dst + r.offset;
      Slot snapshot;
      snapshot.dst = slot.dst;
      snapshot.reduce_into = slot.reduce_into;
      snapshot.dtype = slot.dtype;
      snapshot.op = slot.op;
      ++slot.writers;
      ++active_io_;
      lock.unlock();
      bool ok = r.host == hostId() && readRemote(r.pid, dst, r.addr, r.len);
      if (ok) snapshot.reduceRange(r.offset, r.len);
      lock.lock();
      auto it = slots_.find({s->peer, h.tag});
      if (it != slots_.end()) {
        --it->second.writers;
        if (ok) it->second.received += r.len;
      }
      --active_io_;
      Part ack;
      ack.ack = true;
      ack.ack_ok = ok;
      ack.ack_id = r.id;
      s->queue.push_back(ack);
      s->cv.notify_one();
    }
  } else {
    slot.total = h.total;
    slot.remote.push_back(r);
  }
  cv_.notify_all();
  return true;
}

bool Mesh::receiveData(Stream* s, size_t pi, const std::string& who, const FrameHeader& h) {
  uint8_t* dst = nullptr;
  Slot target;  // where a reduce-on-receive goes (no ownership)
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_) return false;
    auto it = slots_.find({s->peer, h.tag});
    if (it != slots_.end() && it->second.posted) {
      Slot& slot = it->second;
      if (h.total == slot.total) {
        target.dst = slot.dst;
        target.reduce_into = slot.reduce_into;
        target.dtype = slot.dtype;
        target.op = slot.op;
        dst = slot.dst + h.offset;  // offset+length <= total checked by decodeHeader
        ++slot.writers;
        ++active_io_;
      }
    }
  }
  // Not posted yet (or size mismatch, detected there): stage a copy.
  if (dst == nullptr) return stageData(s, pi, who, h);
  return readPosted(s, pi, who, h, dst, target);
}

bool Mesh::stageData(Stream* s, size_t pi, const std::string& who, const FrameHeader& h) {
  std::vector<uint8_t> buf(h.length);
  core::Status st = s->sock->readFull(buf.data(), h.length, core::Deadline::never(), &io_abort_);
  if (!st.isOk()) {
    loseStream(s, pi, who, st);
    return false;
  }
  st = checkPayload(h, buf);
  if (!st.isOk()) {
    loseStream(s, pi, who, st);
    return false;
  }
  if (h.deliver_at_lo) sleepUntilMicros(reconstructMicros(h.deliver_at_lo), &io_abort_);
  std::lock_guard<std::mutex> lock(mu_);
  Slot& slot = slots_[{s->peer, h.tag}];
  if (slot.posted && h.total == slot.total) {
    std::memcpy(slot.dst + h.offset, buf.data(), buf.size());
    slot.reduceRange(h.offset, buf.size());
    slot.received += buf.size();
  } else if (slot.posted || (!slot.early.empty() && slot.total != h.total)) {
    failed_ = true;
    failure_ = core::dataLoss("rank " + std::to_string(s->peer) + " sent a message of " + std::to_string(h.total) +
                              " bytes where " + std::to_string(slot.total) + " were expected")
                   .withContext("receive on " + who);
  } else {
    slot.total = h.total;
    slot.early.emplace_back(h.offset, std::move(buf));
  }
  cv_.notify_all();
  return true;
}

bool Mesh::readPosted(Stream* s, size_t pi, const std::string& who, const FrameHeader& h, uint8_t* dst,
                      const Slot& target) {
  core::Status st;
  {
    // Read, checksum and reduce in cache-sized grains, each while it is
    // hot, instead of three passes over the whole frame. A corrupt frame
    // is detected at its end: the op then fails (its buffer contents are
    // unspecified, never written out of bounds).
    constexpr size_t kGrain = 64 << 10;  // multiple of every element size
    const bool check = !(h.flags & kFrameFlagNoCrc);  // a trusted link's frame (policy checked by the caller)
    uint32_t crc = 0;
    for (size_t k = 0; k < h.length && st.isOk(); k += kGrain) {
      const size_t m = std::min<size_t>(kGrain, h.length - k);
      st = s->sock->readFull(dst + k, m, core::Deadline::never(), &io_abort_);
      if (!st.isOk()) break;
      if (check) crc = core::crc32c(dst + k, m, crc);
      target.reduceRange(h.offset + k, m);
    }
    if (st.isOk() && check) st = checkPayloadCrc(h, crc);
  }
  if (st.isOk() && h.deliver_at_lo) sleepUntilMicros(reconstructMicros(h.deliver_at_lo), &io_abort_);
  bool wake = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find({s->peer, h.tag});
    if (it != slots_.end()) {
      --it->second.writers;
      if (st.isOk()) it->second.received += h.length;
      wake = it->second.received >= it->second.total || failed_ || closing_;
    }
    --active_io_;
  }
  if (wake) cv_.notify_all();
  if (!st.isOk()) {
    loseStream(s, pi, who, st);
    return false;
  }
  return true;
}

}  // namespace archipelago::comm
