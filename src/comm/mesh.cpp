// Set-up, posting of sends and receives, the waits, scratch memory and the
// end of a Mesh (close, fail) plus the heartbeat monitor. The per-stream I/O
// threads live in mesh_sender.cpp and mesh_receiver.cpp.
#include "comm/mesh.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
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
      s->crc = l.crc;
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
  postLocked(peer, tag, dst, bytes, reduce_into, dtype, op);
}

void Mesh::postRecvAfter(const SendHandle& after, int peer, uint64_t tag, void* dst, size_t bytes) {
  if (bytes == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (after == nullptr || after->parts_left == 0) {
    postLocked(peer, tag, dst, bytes, nullptr, DType::kU8, ReduceOp::kSum);
    return;
  }
  // The slot exists from now on with the size it expects, so waitRecv waits
  // for it rather than taking it for a zero-byte message; frames that come
  // first are staged as for any receive not yet posted.
  Slot& slot = slots_[{peer, tag}];
  if (slot.early.empty() && slot.remote.empty()) slot.total = bytes;
  after->then_post.push_back(DeferredRecv{peer, tag, static_cast<uint8_t*>(dst), bytes});
}

void Mesh::partSentLocked(SendRequest& req) {
  if (--req.parts_left > 0) return;
  for (const DeferredRecv& d : req.then_post) {
    postLocked(d.peer, d.tag, d.dst, d.bytes, nullptr, DType::kU8, ReduceOp::kSum);
  }
  req.then_post.clear();
}

void Mesh::postLocked(int peer, uint64_t tag, void* dst, size_t bytes, void* reduce_into, DType dtype, ReduceOp op) {
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

uint64_t Mesh::hostId() {
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
  if (!closing_) letFramesFinish();
  stopIo();
  if (first && !closing_) sendAbortNotices(cause);
  for (auto& l : links_) {
    for (auto& s : l.streams) s->shutdown();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fail_done_ = true;
  }
  cv_.notify_all();
}

void Mesh::letFramesFinish() {
  // Let frames being written finish (at most 100 ms: a write to a stalled
  // peer may never finish), so that their streams sit at a frame boundary
  // and can carry the abort notice. With one stream per peer a cut frame
  // would leave the peer with only "connection closed".
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

void Mesh::stopIo() {
  // Every I/O thread's poll watches the flag's eventfd and wakes at once
  // (condition-variable waits are notified below).
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
}

void Mesh::sendAbortNotices(const core::Status& cause) {
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

core::Status Mesh::failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_ ? failure_ : core::okStatus();
}

bool Mesh::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_;
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
