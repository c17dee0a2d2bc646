// Internal: the transport of one epoch. A Mesh holds authenticated TCP
// streams (S per peer pair) to every other member of the epoch, with one
// receiver thread and one sender thread per stream, a tag-matching mailbox
// and a heartbeat monitor. Collective algorithms (collectives.cpp) talk to
// it through send()/postRecv()/wait*().
//
// Threads and what they own:
//  - receiver (per stream): reads frames; copies a data frame's payload
//    straight into the posted receive buffer (or an "early" buffer if the
//    receive is not posted yet); applies the emulated delivery time.
//  - sender (per stream): drains its queue of stripe parts; CRC (links that
//    carry one: PeerLinks::crc, docs/comm.md "Checksums"), shaping, write;
//    posts the receives deferred behind a send it completes.
//  - monitor: sends heartbeats, declares a silent peer failed.
// Failure is sticky and whole-mesh: the first error (peer closed, corrupt
// frame, heartbeat timeout, deadline or abort of a collective) shuts every
// socket down, wakes every waiter, and waits until no I/O thread touches a
// user buffer any more (fail()). The next epoch builds a new Mesh.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <atomic>
#include <thread>
#include <vector>

#include "archipelago/comm/communicator.h"
#include "archipelago/comm/link_emulator.h"
#include "comm/socket.h"

namespace archipelago::comm {

// A receive that waits for a send to finish before it may land (see
// Mesh::postRecvAfter).
struct DeferredRecv {
  int peer = -1;
  uint64_t tag = 0;
  uint8_t* dst = nullptr;
  size_t bytes = 0;
};

struct SendRequest {
  int peer = -1;
  uint64_t tag = 0;
  const uint8_t* data = nullptr;
  size_t total = 0;
  int parts_left = 0;                  // guarded by Mesh::mu_
  std::vector<DeferredRecv> then_post;  // posted when parts_left reaches 0 (guarded by Mesh::mu_)
};
using SendHandle = std::shared_ptr<SendRequest>;

class Mesh;

// Scratch memory borrowed from a Mesh for the duration of one collective
// (move-only; returned to the mesh's pool on destruction).
class ScratchLease {
 public:
  ScratchLease() = default;
  ScratchLease(Mesh* mesh, std::unique_ptr<uint8_t[]> buf, size_t size)
      : mesh_(mesh), buf_(std::move(buf)), size_(size) {}
  ScratchLease(ScratchLease&& o) noexcept : mesh_(o.mesh_), buf_(std::move(o.buf_)), size_(o.size_) {
    o.mesh_ = nullptr;
  }
  ScratchLease& operator=(ScratchLease&&) = delete;
  ScratchLease(const ScratchLease&) = delete;
  ~ScratchLease();
  uint8_t* data() const { return buf_.get(); }
  size_t size() const { return size_; }

 private:
  Mesh* mesh_ = nullptr;
  std::unique_ptr<uint8_t[]> buf_;
  size_t size_ = 0;
};

class Mesh {
 public:
  struct PeerLinks {
    int peer = -1;
    std::vector<std::unique_ptr<Socket>> streams;
    std::shared_ptr<LinkShaper> shaper;  // null unless the pair crosses an emulated strait
    bool same_host = false;              // may use the single-copy path
    bool crc = true;                     // frames carry (and must carry) a CRC32C; false: a trusted link
  };

  Mesh(int rank, uint32_t epoch, std::vector<int> members, const CommOptions& options);
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  // Takes the connected streams and starts the I/O threads.
  void start(std::vector<PeerLinks> links);

  int rank() const { return rank_; }
  uint32_t epoch() const { return epoch_; }
  const std::vector<int>& members() const { return members_; }

  // Asynchronous send of `bytes` at `data` (must stay valid until waitSend).
  // same_host_copy = false forces TCP frames even where the single-copy
  // path is enabled (the bench compares both in one run).
  SendHandle send(int peer, uint64_t tag, const void* data, size_t bytes, bool same_host_copy = true);
  core::Status waitSend(const SendHandle& h, const core::Deadline& deadline, const core::AbortFlag* abort);
  // Receive `bytes` from peer with tag into dst (valid until waitRecv).
  void postRecv(int peer, uint64_t tag, void* dst, size_t bytes);
  // Like postRecv into `scratch`, and each arriving piece is then reduced
  // into reduce_into (same offsets) by the I/O thread while it is cache-hot.
  void postRecvReduce(int peer, uint64_t tag, void* scratch, size_t bytes, void* reduce_into, DType dtype,
                      ReduceOp op);
  core::Status waitRecv(int peer, uint64_t tag, const core::Deadline& deadline, const core::AbortFlag* abort);
  // postRecv into memory that the send `after` still reads. waitRecv waits
  // for it at once, but the receiver threads write dst only after the last
  // byte of `after` went out (frames arriving sooner are staged). The ring
  // allgather receives into the very blocks its reduce-scatter sends; the
  // protocol orders the two through the peers, which nothing in this
  // process can see: a peer running ahead of it, or ThreadSanitizer, would
  // otherwise find a receiver thread writing bytes a sender thread reads.
  void postRecvAfter(const SendHandle& after, int peer, uint64_t tag, void* dst, size_t bytes);

  // Graceful end of the epoch: tells every peer "closing" after all queued
  // data, waits (bounded) for their goodbyes, then stops the threads. A peer
  // that said goodbye is not a failure unless we still wait for its data.
  void close();
  // Marks the mesh failed (first status wins), shuts every socket, and
  // returns once no I/O thread reads or writes a user buffer any more.
  void fail(core::Status why);
  core::Status failure() const;
  bool failed() const;
  // Scratch memory (not zeroed) of at least `bytes`, reused across ops: a
  // fresh multi-MB allocation per op would page-fault (and zero) new pages
  // every call. Pooled memory lives as long as the Mesh, so an I/O thread
  // that still finishes a write into it after a failed op never touches
  // freed memory.
  ScratchLease borrowScratch(size_t bytes);
  // Counters for the bench: payload bytes this process wrote / read.
  uint64_t bytesSent() const { return bytes_sent_.load(); }
  // Payload bytes this process sent across emulated straits.
  uint64_t straitBytesSent() const { return bytes_strait_.load(); }

 private:
  // A same-host range the peer announced before we posted the receive.
  struct RemoteRange {
    uint64_t offset = 0, len = 0, addr = 0, id = 0, host = 0;
    int32_t pid = 0;
    void* stream = nullptr;
  };
  struct Slot {
    uint8_t* dst = nullptr;
    size_t total = 0;
    size_t received = 0;
    bool posted = false;
    int writers = 0;
    std::vector<std::pair<uint64_t, std::vector<uint8_t>>> early;
    std::vector<RemoteRange> remote;
    uint8_t* reduce_into = nullptr;  // reduce-on-receive target, or null
    DType dtype = DType::kF32;
    ReduceOp op = ReduceOp::kSum;
    void reduceRange(uint64_t offset, uint64_t len) const {
      if (reduce_into) {
        size_t es = dtypeSize(dtype);
        reduceInto(dtype, op, reduce_into + offset, dst + offset, len / es);
      }
    }
  };
  struct Part {
    SendHandle req;
    size_t offset = 0;
    size_t len = 0;
    bool heartbeat = false;
    bool bye = false;
    bool no_remote = false;  // send as TCP frames even on a same-host link
    bool ack = false;        // a kRemoteAck for ack_id
    bool ack_ok = false;
    uint64_t ack_id = 0;
  };
  struct Stream {
    int peer = -1;
    int index = 0;
    bool finished = false;                // receiver saw the peer's goodbye or our close (guarded by mu_)
    std::atomic<bool> mid_frame{false};   // sender wrote part of a frame (stream unusable for an abort notice)
    std::atomic<bool> writing{false};     // a thread is inside a frame write on this stream
    std::atomic<bool> remote{false};      // same-host single-copy path enabled
    Socket* sock = nullptr;
    std::shared_ptr<LinkShaper> shaper;
    bool crc = true;                      // send CRCs and reject frames without one

    std::deque<Part> queue;  // guarded by mu_
    std::condition_variable cv;
    int64_t last_deliver = 0;  // sender thread only
    std::thread sender, receiver;
  };

  // The goodbye notice, and the payload sizes of the same-host frames.
  static constexpr char kBye[] = "closing";
  static constexpr size_t kRemotePayload = 8 + 4 + 8 + 8 + 8;  // id, pid, address, length, host id
  static constexpr size_t kAckPayload = 9;                      // id, ok
  // Identifies this kernel instance, so a peer that merely advertises the
  // same IP (NAT, containers) is never mistaken for a process on this host.
  static uint64_t hostId();

  // Sender side (mesh_sender.cpp). The finish* helpers return false when
  // the sender thread must end.
  // Sender thread of one stream: takes parts off its queue and writes them.
  void senderLoop(Stream* s);
  // Encodes h and writes it with its payload; the stream is mid-frame until the write completes.
  core::Status writeFrameOn(Stream* s, const FrameHeader& h, const void* payload, size_t len);
  // Writes a kRemoteAck telling the peer whether we could copy its range.
  core::Status writeAck(Stream* s, const Part& part);
  // Announces a same-host range for the peer to copy; the part then waits for the ack.
  core::Status writeAnnounce(Stream* s, const Part& part);
  // Ends an announcement's I/O; fails the mesh if the write failed.
  bool finishAnnounce(Stream* s, const core::Status& st, const std::string& who);
  // Writes the goodbye that close() queued.
  core::Status writeBye(Stream* s);
  // Writes an empty heartbeat frame.
  core::Status writeHeartbeat(Stream* s);
  // Writes a data part as frames (CRC'd unless the link is trusted, shaped on
  // an emulated strait).
  core::Status writeData(Stream* s, const Part& part);
  // Counts a written part against its message, wakes waiters, fails the mesh on a lost link.
  bool finishPart(Stream* s, const Part& part, const core::Status& st, const std::string& who);

  // Receiver side (mesh_receiver.cpp). `pi` is the peer's index, `who`
  // names the stream in errors; helpers returning bool return false when
  // the receiver thread must end.
  // Receiver thread of one stream: reads frames until the link ends.
  void receiverLoop(Stream* s);
  // Marks the stream's receiver finished and wakes close().
  void finishStream(Stream* s);
  // After a read or protocol error: ends quietly if the link is closing on purpose, else fails the mesh.
  void loseStream(Stream* s, size_t pi, const std::string& who, const core::Status& st);
  // Reads a kAbort frame: the peer's goodbye or its abort notice (the receiver ends after either).
  void receiveAbort(Stream* s, size_t pi, const FrameHeader& h);
  // Reads a same-host announcement or ack and acts on it.
  bool receiveSameHost(Stream* s, size_t pi, const std::string& who, const FrameHeader& h);
  // Completes the same-host send the peer acked, or requeues it as TCP frames if the copy failed.
  void receiveAck(size_t pi, uint64_t id, bool ok);
  // Copies an announced range now if its receive is posted, else keeps it for postRecv.
  bool receiveRange(Stream* s, const FrameHeader& h, const RemoteRange& r);
  // Reads a data frame into its posted buffer, or stages it if the receive is not posted.
  bool receiveData(Stream* s, size_t pi, const std::string& who, const FrameHeader& h);
  // Reads a frame whose receive is not posted into an early buffer (or fails on a size mismatch).
  bool stageData(Stream* s, size_t pi, const std::string& who, const FrameHeader& h);
  // Reads, checksums and reduces a frame in place in the posted buffer at dst.
  bool readPosted(Stream* s, size_t pi, const std::string& who, const FrameHeader& h, uint8_t* dst,
                  const Slot& target);

  // Parts of fail() (mesh.cpp), run by its first caller only.
  // Stops senders at the next frame boundary and waits (at most 100 ms) for frames in progress.
  void letFramesFinish();
  // Aborts all blocking I/O and waits until no I/O thread touches a user buffer.
  void stopIo();
  // Sends the failure's cause to every peer on each stream that sits at a frame boundary.
  void sendAbortNotices(const core::Status& cause);

  void monitorLoop();
  core::Status waitUntil(std::unique_lock<std::mutex>& lock, const std::function<bool()>& done,
                         const core::Deadline& deadline, const core::AbortFlag* abort, const char* what);
  Stream* streamFor(int peer, size_t index);
  size_t peerIndex(int peer) const;

  const int rank_;
  const uint32_t epoch_;
  const std::vector<int> members_;
  const CommOptions options_;
  std::vector<PeerLinks> links_;
  std::vector<std::vector<std::unique_ptr<Stream>>> streams_;  // [peer index][stream]
  std::vector<int> peer_of_index_;
  std::vector<int64_t> last_seen_us_;  // guarded by mu_
  std::vector<int> byes_;              // goodbyes received per peer index (guarded by mu_)
  bool closing_ = false;               // guarded by mu_

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<int, uint64_t>, Slot> slots_;
  core::Status failure_;
  bool failed_ = false;
  bool fail_started_ = false;  // a thread runs (or ran) the body of fail()
  bool fail_done_ = false;     // that fail() finished (notices sent, I/O stopped)
  int active_io_ = 0;  // threads inside a read/write touching user memory
  core::AbortFlag io_abort_;
  std::atomic<bool> soft_stop_{false};  // failing: finish the frame being written, start no new one
  // Same-host sends waiting for the peer's kRemoteAck (guarded by mu_).
  struct RemotePending {
    Part part;
    Stream* stream = nullptr;
  };
  std::map<uint64_t, RemotePending> remote_pending_;
  uint64_t next_remote_id_ = 0;
  // Copies a peer's announced range into dst and queues the ack; mu_ held.
  void copyRemoteLocked(int peer, Slot& slot, const RemoteRange& r);
  // postRecvReduce's body; mu_ held.
  void postLocked(int peer, uint64_t tag, void* dst, size_t bytes, void* reduce_into, DType dtype, ReduceOp op);
  // Counts one finished part of req; the last one posts req's deferred receives. mu_ held.
  void partSentLocked(SendRequest& req);
  friend class ScratchLease;
  void returnScratch(std::unique_ptr<uint8_t[]> buf, size_t size);
  std::mutex scratch_mu_;
  std::vector<std::pair<size_t, std::unique_ptr<uint8_t[]>>> scratch_pool_;  // guarded by scratch_mu_
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_strait_{0};
  std::thread monitor_;
  std::mutex monitor_mu_;
  std::condition_variable monitor_cv_;
  bool stopping_ = false;
};

}  // namespace archipelago::comm
