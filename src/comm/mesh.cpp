#include "comm/mesh.h"

#include <algorithm>
#include <chrono>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "archipelago/core/hash.h"
#include "archipelago/core/log.h"

namespace archipelago::comm {

Mesh::Mesh(int rank, uint32_t epoch, std::vector<int> members, const CommOptions& options)
    : rank_(rank), epoch_(epoch), members_(std::move(members)), options_(options) {}

Mesh::~Mesh() {
  close();
  fail(core::aborted("transport of epoch " + std::to_string(epoch_) + " closed"));
  {
    std::lock_guard<std::mutex> lock(monitor_mu_);
    stopping_ = true;
  }
  monitor_cv_.notify_all();
  if (monitor_.joinable()) monitor_.join();
  for (auto& per_peer : streams_) {
    for (auto& s : per_peer) {
      s->cv.notify_all();
      if (s->sender.joinable()) s->sender.join();
      if (s->receiver.joinable()) s->receiver.join();
    }
  }
}

void Mesh::start(std::vector<PeerLinks> links) {
  links_ = std::move(links);
  int64_t now = core::nowMicros();
  for (auto& l : links_) {
    std::vector<std::unique_ptr<Stream>> ss;
    for (size_t i = 0; i < l.streams.size(); ++i) {
      auto s = std::make_unique<Stream>();
      s->peer = l.peer;
      s->index = static_cast<int>(i);
      s->sock = l.streams[i].get();
      s->shaper = l.shaper;
      s->remote = l.same_host && !l.shaper && options_.same_host_copy;
      ss.push_back(std::move(s));
    }
    peer_of_index_.push_back(l.peer);
    last_seen_us_.push_back(now);
    byes_.push_back(0);
    streams_.push_back(std::move(ss));
  }
  for (auto& per_peer : streams_) {
    for (auto& s : per_peer) {
      Stream* sp = s.get();
      s->sender = std::thread([this, sp] { senderLoop(sp); });
      s->receiver = std::thread([this, sp] { receiverLoop(sp); });
    }
  }
  monitor_ = std::thread([this] { monitorLoop(); });
}

size_t Mesh::peerIndex(int peer) const {
  for (size_t i = 0; i < peer_of_index_.size(); ++i) {
    if (peer_of_index_[i] == peer) return i;
  }
  return SIZE_MAX;
}

Mesh::Stream* Mesh::streamFor(int peer, size_t index) {
  size_t pi = peerIndex(peer);
  ARCH_CHECK_MSG(pi != SIZE_MAX, "rank " + std::to_string(peer) + " is not a member of this epoch's transport");
  auto& ss = streams_[pi];
  return ss[index % ss.size()].get();
}

SendHandle Mesh::send(int peer, uint64_t tag, const void* data, size_t bytes, bool same_host_copy) {
  auto req = std::make_shared<SendRequest>();
  req->peer = peer;
  req->tag = tag;
  req->data = static_cast<const uint8_t*>(data);
  req->total = bytes;
  if (bytes == 0) return req;
  size_t pi = peerIndex(peer);
  ARCH_CHECK_MSG(pi != SIZE_MAX, "send to rank " + std::to_string(peer) + " outside this epoch's transport");
  size_t nstreams = streams_[pi].size();
  size_t parts = std::clamp<size_t>(bytes / std::max<size_t>(options_.stripe_min_bytes, 1), 1, nstreams);
  // Spread single-part messages over the streams by tag so consecutive ring
  // pieces use different streams.
  size_t first = parts == 1 ? static_cast<size_t>(core::mix64(tag) % nstreams) : 0;
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return req;  // waitSend reports the failure
  req->parts_left = static_cast<int>(parts);
  size_t off = 0;
  for (size_t p = 0; p < parts; ++p) {
    // 8-byte aligned parts keep every frame element-aligned (reduce-on-receive).
    size_t len = p + 1 == parts ? bytes - off : (bytes / parts) & ~size_t{7};
    Stream* s = streams_[pi][(first + p) % nstreams].get();
    Part part{req, off, len, false};
    part.no_remote = !same_host_copy;
    s->queue.push_back(std::move(part));
    s->cv.notify_one();
    off += len;
  }
  return req;
}

core::Status Mesh::waitUntil(std::unique_lock<std::mutex>& lock, const std::function<bool()>& done,
                             const core::Deadline& deadline, const core::AbortFlag* abort, const char* what) {
  while (true) {
    if (failed_) return failure_;
    if (done()) return core::okStatus();
    if (abort && abort->aborted()) return core::aborted(std::string(what) + " aborted by the caller");
    if (deadline.expired()) return core::deadlineExceeded(std::string(what) + " ran past its deadline");
    auto slice = std::min<core::Duration>(deadline.remaining(), std::chrono::milliseconds(20));
    cv_.wait_for(lock, slice);
  }
}

core::Status Mesh::waitSend(const SendHandle& h, const core::Deadline& deadline, const core::AbortFlag* abort) {
  if (h->total == 0) return failure();
  std::unique_lock<std::mutex> lock(mu_);
  core::Status st = waitUntil(lock, [&] { return h->parts_left == 0; }, deadline, abort, "send");
  if (!st.isOk()) return st.withContext("send to rank " + std::to_string(h->peer));
  return st;
}

void Mesh::postRecv(int peer, uint64_t tag, void* dst, size_t bytes) {
  postRecvReduce(peer, tag, dst, bytes, nullptr, DType::kU8, ReduceOp::kSum);
}

void Mesh::postRecvReduce(int peer, uint64_t tag, void* dst, size_t bytes, void* reduce_into, DType dtype,
                          ReduceOp op) {
  if (bytes == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  Slot& slot = slots_[{peer, tag}];
  slot.posted = true;
  slot.dst = static_cast<uint8_t*>(dst);
  slot.reduce_into = static_cast<uint8_t*>(reduce_into);
  slot.dtype = dtype;
  slot.op = op;
  // Early frames carry their message size; a mismatch is a protocol error.
  for (auto& [off, buf] : slot.early) {
    if (off + buf.size() <= bytes) {
      std::memcpy(slot.dst + off, buf.data(), buf.size());
      slot.reduceRange(off, buf.size());
      slot.received += buf.size();
    }
  }
  if (!slot.early.empty() && slot.total != bytes) {
    failed_ = true;
    failure_ = core::dataLoss("rank " + std::to_string(peer) + " sent " + std::to_string(slot.total) +
                              " bytes for a message of " + std::to_string(bytes));
  }
  slot.early.clear();
  slot.early.shrink_to_fit();
  slot.total = bytes;
  for (const auto& r : slot.remote) copyRemoteLocked(peer, slot, r);
  slot.remote.clear();
  cv_.notify_all();
}

core::Status Mesh::waitRecv(int peer, uint64_t tag, const core::Deadline& deadline, const core::AbortFlag* abort) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = slots_.find({peer, tag});
  if (it == slots_.end()) {
    if (failed_) return failure_;
    return core::okStatus();  // zero-byte message
  }
  Slot* slot = &it->second;
  const size_t pi = peerIndex(peer);
  bool gone = false;
  core::Status st = waitUntil(lock, [&] {
    if (slot->received >= slot->total && slot->writers == 0) return true;
    gone = byes_[pi] > 0 && static_cast<size_t>(byes_[pi]) >= streams_[pi].size();
    return gone;
  }, deadline, abort, "receive");
  if (st.isOk() && gone && slot->received < slot->total) {
    st = core::unavailable("rank " + std::to_string(peer) + " closed its transport before sending this message");
  }
  if (!st.isOk()) {
    lock.unlock();
    return st.withContext("receive from rank " + std::to_string(peer));
  }
  slots_.erase(it);
  return st;
}

ScratchLease::~ScratchLease() {
  if (mesh_ && buf_) mesh_->returnScratch(std::move(buf_), size_);
}

ScratchLease Mesh::borrowScratch(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(scratch_mu_);
    // Smallest pooled buffer that fits.
    size_t best = SIZE_MAX;
    for (size_t i = 0; i < scratch_pool_.size(); ++i) {
      if (scratch_pool_[i].first >= bytes && (best == SIZE_MAX || scratch_pool_[i].first < scratch_pool_[best].first)) {
        best = i;
      }
    }
    if (best != SIZE_MAX) {
      auto [size, buf] = std::move(scratch_pool_[best]);
      scratch_pool_.erase(scratch_pool_.begin() + static_cast<std::ptrdiff_t>(best));
      return ScratchLease(this, std::move(buf), size);
    }
  }
  return ScratchLease(this, std::unique_ptr<uint8_t[]>(new uint8_t[std::max<size_t>(bytes, 1)]), bytes);
}

void Mesh::returnScratch(std::unique_ptr<uint8_t[]> buf, size_t size) {
  constexpr size_t kMaxPooled = 16;  // concurrent ops of all groups rarely need more
  std::lock_guard<std::mutex> lock(scratch_mu_);
  scratch_pool_.emplace_back(size, std::move(buf));
  if (scratch_pool_.size() > kMaxPooled) {
    auto smallest = std::min_element(scratch_pool_.begin(), scratch_pool_.end(),
                                     [](const auto& a, const auto& b) { return a.first < b.first; });
    scratch_pool_.erase(smallest);
  }
}

static const char kBye[] = "closing";

// Test hook of the chaos tests: while the file named by
// ARCHIPELAGO_TEST_CORRUPT_FRAME_FILE exists, the first sender to remove it
// sends one data frame with a wrong checksum (the receiver must fail the
// epoch with kDataLoss). Costs nothing when the variable is unset.
static bool testCorruptNextFrame() {
  static const char* path = std::getenv("ARCHIPELAGO_TEST_CORRUPT_FRAME_FILE");
  return path && *path && ::unlink(path) == 0;
}

namespace {
constexpr size_t kRemotePayload = 8 + 4 + 8 + 8 + 8;  // id, pid, address, length, host id
constexpr size_t kAckPayload = 9;                 // id, ok

// Identifies this kernel instance, so a peer that merely advertises the same
// IP (NAT, containers) is never mistaken for a process on this host.
uint64_t hostId() {
  static const uint64_t id = [] {
    std::string text;
    if (FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
      char buf[128] = {0};
      if (std::fgets(buf, sizeof(buf), f)) text = buf;
      std::fclose(f);
    }
    char host[256] = {0};
    ::gethostname(host, sizeof(host) - 1);
    return core::fnv1a64(text + "/" + host);
  }();
  return id;
}

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

void Mesh::close() {
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_ || closing_) return;
  closing_ = true;
  for (auto& per_peer : streams_) {
    for (auto& s : per_peer) {
      s->queue.push_back(Part{nullptr, 0, 0, false, true});
      s->cv.notify_one();
    }
  }
  auto all = [&](auto pred) {
    for (auto& per_peer : streams_) {
      for (auto& s : per_peer) {
        if (!pred(*s)) return false;
      }
    }
    return true;
  };
  auto limit = core::Clock::now() + std::chrono::seconds(2);
  cv_.wait_until(lock, limit, [&] { return failed_ || (all([](Stream& s) { return s.queue.empty(); }) && active_io_ == 0); });
  lock.unlock();
  for (auto& l : links_) {
    for (auto& s : l.streams) s->shutdownWrite();
  }
  lock.lock();
  cv_.wait_until(lock, limit, [&] { return failed_ || all([](Stream& s) { return s.finished; }); });
  lock.unlock();
  fail(core::aborted("transport of epoch " + std::to_string(epoch_) + " closed"));
}

void Mesh::fail(core::Status why) {
  bool first = false;
  core::Status cause;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_) {
      failed_ = true;
      failure_ = why;
      if (!closing_) ARCH_LOG_WARN("comm epoch {} rank {}: transport failed: {}", epoch_, rank_, why.toString());
    }
    // (failed_ may also have been set directly by a receive-size mismatch:
    // the first caller of fail() does the stopping either way.)
    if (!fail_started_) {
      fail_started_ = true;
      first = true;
    }
    cause = failure_;
    for (auto& per_peer : streams_) {
      for (auto& s : per_peer) s->queue.clear();
    }
    remote_pending_.clear();
  }
  if (!first) {
    // Another thread is failing the mesh (e.g. an op's own deadline and its
    // Handle::wait fire together): wait until it has sent the abort notices
    // and stopped the I/O, instead of shutting the sockets under it.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return fail_done_; });
    return;
  }
  if (!closing_) {
    // Let frames being written finish (at most 100 ms: a write to a stalled
    // peer may never finish), so that their streams sit at a frame boundary
    // and can carry the abort notice below. With one stream per peer a cut
    // frame would leave the peer with only "connection closed".
    soft_stop_ = true;
    auto until = core::Clock::now() + std::chrono::milliseconds(100);
    auto anyWriting = [&] {
      for (auto& per_peer : streams_) {
        for (auto& s : per_peer) {
          if (s->writing.load()) return true;
        }
      }
      return false;
    };
    while (anyWriting() && core::Clock::now() < until) ::usleep(500);
  }
  // Every I/O thread polls the abort flag at least every 50 ms.
  io_abort_.abort();
  cv_.notify_all();
  for (auto& per_peer : streams_) {
    for (auto& s : per_peer) s->cv.notify_all();
  }
  {
    // After this no I/O thread touches a user buffer: the caller may free them.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return active_io_ == 0; });
  }
  if (first && !closing_) {
    // Tell every peer why, on a stream that sits at a frame boundary, so the
    // whole group fails with the original cause instead of "peer closed".
    std::string text = std::string(core::statusCodeName(cause.code())) + "|" + cause.message();
    if (text.size() > 4000) text.resize(4000);
    for (auto& per_peer : streams_) {
      for (auto& s : per_peer) {
        if (s->mid_frame.load() || s->sock->isShutdown()) continue;
        FrameHeader h;
        h.type = FrameType::kAbort;
        h.epoch = epoch_;
        // Every clean stream carries it: the peer's receivers race, and the
        // first one to read must see the cause, not our FIN. Best effort:
        // the epoch is aborted whether or not the peer hears why.
        (void)s->sock->writeFrame(h, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()),
                                  core::Deadline::afterSeconds(0.1));
      }
    }
  }
  for (auto& l : links_) {
    for (auto& s : l.streams) s->shutdown();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fail_done_ = true;
  }
  cv_.notify_all();
}

core::Status Mesh::failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_ ? failure_ : core::okStatus();
}

bool Mesh::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_;
}

core::Status Mesh::writeData(Stream* s, const Part& part) {
  const bool shaped = s->shaper != nullptr;
  const uint32_t frame_max = shaped ? options_.emulated_frame_bytes : options_.max_frame_bytes;
  core::Status st;
  uint8_t hdr[kFrameHeaderSize];
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
    h.crc = core::crc32c(p, len);
    if (testCorruptNextFrame()) h.crc ^= 1u;
    if (shaped) {
      s->last_deliver = s->shaper->send(len + kFrameHeaderSize, s->last_deliver, &io_abort_);
      h.deliver_at_lo = static_cast<uint32_t>(s->last_deliver) | 1u;  // never 0 when shaped
    }
    encodeHeader(h, hdr);
    s->mid_frame = true;
    s->writing = true;
    st = s->sock->writeTwo(hdr, sizeof(hdr), p, len, core::Deadline::never(), &io_abort_);
    s->writing = false;
    if (st.isOk()) s->mid_frame = false;
    done += len;
  }
  if (st.isOk()) {
    bytes_sent_ += part.len;
    if (shaped) bytes_strait_ += part.len;
  }
  return st;
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
    uint8_t hdr[kFrameHeaderSize];
    if (part.ack) {
      uint8_t pl[kAckPayload];
      std::memcpy(pl, &part.ack_id, 8);
      pl[8] = part.ack_ok ? 1 : 0;
      FrameHeader h;
      h.type = FrameType::kRemoteAck;
      h.epoch = epoch_;
      h.length = kAckPayload;
      h.total = kAckPayload;
      h.crc = core::crc32c(pl, kAckPayload);
      encodeHeader(h, hdr);
      s->mid_frame = true;
      s->writing = true;
      st = s->sock->writeTwo(hdr, sizeof(hdr), pl, kAckPayload, core::Deadline::never(), &io_abort_);
      s->writing = false;
      if (st.isOk()) s->mid_frame = false;
    } else if (part.req && !part.no_remote && s->remote.load() && part.len >= options_.same_host_min_bytes) {
      // Same host: announce the range; the peer copies it out of our memory
      // and acks. The part completes on the ack (receiver thread).
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
      encodeHeader(h, hdr);
      s->mid_frame = true;
      s->writing = true;
      st = s->sock->writeTwo(hdr, sizeof(hdr), pl, kRemotePayload, core::Deadline::never(), &io_abort_);
      s->writing = false;
      if (st.isOk()) s->mid_frame = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        --active_io_;
      }
      cv_.notify_all();
      if (!st.isOk()) {
        if (failed()) return;
        fail(core::unavailable("lost rank " + std::to_string(s->peer) + " (" + st.message() + ")")
                 .withContext("send on " + who));
        return;
      }
      continue;
    } else if (part.bye) {
      FrameHeader h;
      h.type = FrameType::kAbort;
      h.epoch = epoch_;
      h.length = sizeof(kBye) - 1;
      h.total = h.length;
      h.crc = core::crc32c(kBye, h.length);
      encodeHeader(h, hdr);
      s->mid_frame = true;
      s->writing = true;
      st = s->sock->writeTwo(hdr, sizeof(hdr), kBye, h.length, core::Deadline::never(), &io_abort_);
      s->writing = false;
      if (st.isOk()) s->mid_frame = false;
    } else if (part.heartbeat) {
      FrameHeader h;
      h.type = FrameType::kHeartbeat;
      h.epoch = epoch_;
      h.crc = core::crc32c(nullptr, 0);
      encodeHeader(h, hdr);
      s->mid_frame = true;
      s->writing = true;
      st = s->sock->writeFull(hdr, sizeof(hdr), core::Deadline::never(), &io_abort_);
      s->writing = false;
      if (st.isOk()) s->mid_frame = false;
    } else {
      st = writeData(s, part);
    }
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --active_io_;
      if (st.isOk() && part.req) --part.req->parts_left;
      // Wake waiters only for a finished message or an ending mesh (each
      // futex wake-up costs a context switch on a busy machine).
      wake = !part.req || part.req->parts_left == 0 || failed_ || closing_;
    }
    if (wake) cv_.notify_all();
    if (!st.isOk()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (closing_ || byes_[peerIndex(s->peer)] > 0) return;  // the link is ending on purpose
        if (failed_) return;  // already failing: fail() is in charge
      }
      fail(core::unavailable("lost rank " + std::to_string(s->peer) + " (" + st.message() + ")")
               .withContext("send on " + who));
      return;
    }
  }
}

static int64_t reconstructMicros(uint32_t lo) {
  int64_t now = core::nowMicros();
  int64_t base = now & ~int64_t{0xffffffff};
  int64_t cand = base | lo;
  // Pick the candidate nearest to now (wrap every ~71 minutes).
  if (cand - now > (int64_t{1} << 31)) cand -= int64_t{1} << 32;
  if (now - cand > (int64_t{1} << 31)) cand += int64_t{1} << 32;
  return cand;
}

void Mesh::receiverLoop(Stream* s) {
  const std::string who = "rank " + std::to_string(s->peer) + " stream " + std::to_string(s->index);
  const size_t pi = peerIndex(s->peer);
  std::vector<uint8_t> scratch;
  auto finish = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    s->finished = true;
    cv_.notify_all();
  };
  auto lost = [&](const core::Status& st) {
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
  };
  while (true) {
    uint8_t hdr[kFrameHeaderSize];
    core::Status st = s->sock->readFull(hdr, sizeof(hdr), core::Deadline::never(), &io_abort_);
    if (!st.isOk()) return lost(st);
    auto hr = decodeHeader(hdr, std::min<uint32_t>(kMaxFramePayload, std::max<uint32_t>(options_.max_frame_bytes,
                                                                                     options_.emulated_frame_bytes)));
    if (!hr.isOk()) return lost(hr.status());
    const FrameHeader h = *hr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_seen_us_[pi] = core::nowMicros();
    }
    if (h.type == FrameType::kHeartbeat) continue;
    if (h.type == FrameType::kAbort) {
      scratch.resize(h.length);
      st = s->sock->readFull(scratch.data(), h.length, core::Deadline::never(), &io_abort_);
      std::string reason(scratch.begin(), scratch.end());
      if (st.isOk() && reason == kBye) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          ++byes_[pi];
        }
        return finish();
      }
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
        std::lock_guard<std::mutex> lock(mu_);
        if (closing_) return finish();
      }
      return fail(core::Status(code, "rank " + std::to_string(s->peer) + " aborted the epoch: " + reason));
    }
    if (h.type == FrameType::kRemote || h.type == FrameType::kRemoteAck) {
      const size_t want = h.type == FrameType::kRemote ? kRemotePayload : kAckPayload;
      if (h.length != want) return lost(core::dataLoss("malformed same-host frame"));
      uint8_t pl[kRemotePayload];
      st = s->sock->readFull(pl, want, core::Deadline::never(), &io_abort_);
      if (st.isOk()) st = checkPayload(h, std::span<const uint8_t>(pl, want));
      if (!st.isOk()) return lost(st);
      uint64_t id;
      std::memcpy(&id, pl, 8);
      if (h.type == FrameType::kRemoteAck) {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = remote_pending_.find(id);
        if (it == remote_pending_.end()) continue;  // failed meanwhile
        RemotePending rp = it->second;
        remote_pending_.erase(it);
        if (pl[8]) {
          --rp.part.req->parts_left;
          bytes_sent_ += rp.part.len;
        } else {
          // The kernel refused (e.g. ptrace policy): TCP frames from now on.
          for (auto& st2 : streams_[pi]) st2->remote = false;
          rp.part.no_remote = true;
          rp.stream->queue.push_back(rp.part);
          rp.stream->cv.notify_one();
        }
        cv_.notify_all();
        continue;
      }
      RemoteRange r;
      r.id = id;
      std::memcpy(&r.pid, pl + 8, 4);
      std::memcpy(&r.addr, pl + 12, 8);
      std::memcpy(&r.len, pl + 20, 8);
      std::memcpy(&r.host, pl + 28, 8);
      r.offset = h.offset;
      r.stream = s;
      if (h.offset > h.total || r.len > h.total - h.offset) return lost(core::dataLoss("same-host range out of bounds"));
      std::unique_lock<std::mutex> lock(mu_);
      if (failed_) return;
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
      continue;
    }
    if (h.type != FrameType::kData) {
      return lost(core::dataLoss("unexpected frame type " + std::to_string(static_cast<int>(h.type))));
    }
    if (h.epoch != epoch_) {
      return lost(core::failedPrecondition("frame of epoch " + std::to_string(h.epoch) + " on a link of epoch " +
                                           std::to_string(epoch_)));
    }
    uint8_t* dst = nullptr;
    Slot target;  // where a reduce-on-receive goes (no ownership)
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_) return;
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
    if (dst == nullptr) {
      // Not posted yet (or size mismatch, detected below): stage a copy.
      std::vector<uint8_t> buf(h.length);
      st = s->sock->readFull(buf.data(), h.length, core::Deadline::never(), &io_abort_);
      if (!st.isOk()) return lost(st);
      st = checkPayload(h, buf);
      if (!st.isOk()) return lost(st);
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
      continue;
    }
    {
      // Read, checksum and reduce in cache-sized grains, each while it is
      // hot, instead of three passes over the whole frame. A corrupt frame
      // is detected at its end: the op then fails (its buffer contents are
      // unspecified, never written out of bounds).
      constexpr size_t kGrain = 64 << 10;  // multiple of every element size
      uint32_t crc = 0;
      for (size_t k = 0; k < h.length && st.isOk(); k += kGrain) {
        const size_t m = std::min<size_t>(kGrain, h.length - k);
        st = s->sock->readFull(dst + k, m, core::Deadline::never(), &io_abort_);
        if (!st.isOk()) break;
        crc = core::crc32c(dst + k, m, crc);
        target.reduceRange(h.offset + k, m);
      }
      if (st.isOk()) st = checkPayloadCrc(h, crc);
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
    if (!st.isOk()) return lost(st);
  }
}

void Mesh::monitorLoop() {
  const auto interval = std::chrono::duration<double>(std::max(options_.heartbeat_interval_s, 0.01));
  std::unique_lock<std::mutex> mlock(monitor_mu_);
  while (!stopping_) {
    monitor_cv_.wait_for(mlock, interval);
    if (stopping_) return;
    int dead_peer = -1;
    double silent = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_) return;
      int64_t now = core::nowMicros();
      for (size_t i = 0; i < streams_.size(); ++i) {
        if (byes_[i] > 0 || closing_) continue;
        auto* s0 = streams_[i][0].get();
        if (s0->queue.empty()) {
          s0->queue.push_back(Part{nullptr, 0, 0, true});
          s0->cv.notify_one();
        }
        double quiet = static_cast<double>(now - last_seen_us_[i]) / 1e6;
        if (options_.heartbeat_timeout_s > 0 && quiet > options_.heartbeat_timeout_s) {
          dead_peer = peer_of_index_[i];
          silent = quiet;
        }
      }
    }
    if (dead_peer >= 0) {
      fail(core::unavailable("lost rank " + std::to_string(dead_peer) + " (no heartbeat for " +
                             std::to_string(silent).substr(0, 4) + " s)"));
      return;
    }
  }
}

}  // namespace archipelago::comm
