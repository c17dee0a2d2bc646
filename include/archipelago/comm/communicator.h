// Communicator and Group: Archipelago's collective communication over plain
// TCP (DESIGN.md "Communication"). No libtorch: buffers are raw pointers +
// element count + DType. The runtime wraps torch tensors around this.
//
// Lifecycle (one Communicator per worker process):
//
//   comm::CommConfig cfg;
//   cfg.rank = rank; cfg.world = world; cfg.secret = job_secret; cfg.epoch = epoch;
//   cfg.island_of_rank = {0, 0, 1, 1};          // from the plan / cluster spec
//   cfg.cluster = job.cluster;                  // straits -> link emulation + TLS
//   auto comm = comm::Communicator::create(cfg).value();   // listens on port 0
//   client.registerRank(rank, island, comm->address(), deadline);  // coordinator
//   auto table = client.waitForMembers(world, deadline).value();
//   ARCH_RETURN_IF_ERROR(comm->connect(table.addresses, deadline));
//   auto world_group = comm->world();
//
//   // blocking:
//   ARCH_RETURN_IF_ERROR(world_group->allreduce(grad.data(), grad.size(), DType::kF32, ReduceOp::kAvg));
//   // overlapped with compute (bucket reduced while backward continues):
//   comm::Handle h = world_group->allreduceAsync(bucket.data(), n, DType::kBF16, ReduceOp::kSum);
//   ... compute ...
//   ARCH_RETURN_IF_ERROR(h.wait(core::Deadline::afterSeconds(30), abort_flag));
//   // across islands (reduce-scatter inside, allreduce across straits, allgather):
//   comm::OpOptions o; o.codec = comm::CodecKind::kInt8;
//   world_group->hierarchicalAllreduce(p, n, DType::kF32, ReduceOp::kAvg, o);
//   // DiLoCo: a group per island and a group of the k-th ranks of each island
//   auto island = world_group->islandGroup().value();
//   auto cross = world_group->crossIslandGroup().value();
//
//   // a peer died: every survivor's op returns kUnavailable (< 1 s); then
//   auto next = comm->rebuild(new_epoch, survivors, deadline).value();
//
// Semantics:
//  - All members of a group issue the same collectives in the same order
//    (like MPI/NCCL). Ops of one group run in issue order on that group's
//    progress thread; different groups progress concurrently.
//  - Buffers must stay valid until the op's handle completes.
//  - Failure is sticky: the first failed op (peer lost, corrupt frame,
//    deadline, abort) aborts the whole epoch's transport; every later op of
//    that epoch fails fast with the same cause until rebuild(). After a
//    failed op the contents of its buffers are unspecified (never written
//    out of bounds, never written after the op returned).
//  - Results are bit-identical on every member (each output element is
//    computed once, by one owner, or by commutative pairwise adds).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "archipelago/comm/codec.h"
#include "archipelago/comm/dtype.h"
#include "archipelago/comm/tls.h"
#include "archipelago/core/clock.h"
#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

class Mesh;
class Endpoint;
class Communicator;

// Tuning knobs; every field says when to change it.
struct CommOptions {
  int streams = 4;                          // TCP streams per peer pair; raise for long fat pipes
  int local_streams = 1;                    // streams between processes on the same host (loopback has
                                            // no bandwidth-delay product; more streams = more threads
                                            // and context switches for the same bytes)
  size_t chunk_bytes = 1 << 20;             // ring pipeline piece; smaller = more overlap, more frames
  int ring_max_pieces = 4;                  // at most this many pieces per ring block (1..64): a 16 MB block
                                            // goes as 4 x 4 MB, not 16 x 1 MB (each piece costs wake-ups
                                            // and hand-offs: 1.2-1.4x Gloo instead of 1.5-1.8x, docs/comm.md)
  size_t small_message_bytes = 256 << 10;   // at or below: recursive doubling (log2 n steps of the whole
                                            // buffer) instead of ring or halving-doubling
  size_t halving_doubling_bytes = 1 << 20;  // above small_message_bytes and at or below this, in a
                                            // power-of-two group of 8 or more: halving-doubling (2 log2 n
                                            // steps where the ring takes 2(n-1), each paying a latency)
  size_t hier_chunk_bytes = 4 << 20;        // hierarchical allreduce pipeline chunk (intra reduce-scatter,
                                            // strait crossing and intra allgather of different chunks overlap)
  int hier_window = 4;                      // hierarchical chunks in flight; their strait bytes must cover the
                                            // strait's bandwidth-delay product (1 Gbit/s x 20 ms = 2.5 MB)
  size_t stripe_min_bytes = 256 << 10;      // messages smaller than 2x this use one stream
  uint32_t max_frame_bytes = 256 << 10;     // payload per frame on fast links (<= wire max 16 MiB); small
                                            // enough that CRC and kernel copy find the frame in cache
  uint32_t emulated_frame_bytes = 256 << 10;// payload per frame on emulated straits (shaping grain)
  double connect_timeout_s = 30;            // building the mesh of an epoch
  double heartbeat_interval_s = 0.2;
  double heartbeat_timeout_s = 5;           // silent (e.g. stopped) peer -> kUnavailable; 0 = off
  double op_timeout_s = 0;                  // default deadline of every op; 0 = none (wait's own)
  bool same_host_copy = true;               // peers on this host: the receiver copies straight out of the
                                            // sender's memory (process_vm_readv, one copy instead of TCP's
                                            // two); falls back to TCP frames if the kernel refuses
  size_t same_host_min_bytes = 64 << 10;    // smaller messages go as TCP frames
  std::string checksum = "auto";            // frame CRC32C on every link: auto (per link from the cluster
                                            // spec: docs/comm.md "Checksums") | on | off (tests, bench A/B)
  bool emulate_straits = true;              // shape sends between islands from cluster.straits
  bool tls_on_straits = true;               // TLS on streams whose strait says tls: true
  bool tls_all_links = false;               // TLS on every stream (the job's security.tls)
  TlsFiles tls;                             // the job's CA, certificate and key (archipelago/comm/tls.h);
                                            // required when any link uses TLS
  std::string listen_host = "127.0.0.1";    // interface to listen on
  std::string advertise_host;               // address published to peers; empty = listen_host
};

enum class AllreduceAlgo { kAuto, kRing, kRecursiveDoubling, kHalvingDoubling };

// Per-call options; every blocking wait honours deadline and abort.
struct OpOptions {
  core::Deadline deadline = core::Deadline::never();
  core::AbortFlag abort;                    // copies share the flag; default: never set
  double weight = 1.0;                      // kWeightedAvg: this rank's weight (e.g. its sample count)
  AllreduceAlgo algo = AllreduceAlgo::kAuto;
  CodecKind codec = CodecKind::kNone;       // hierarchical: codec of the cross-island leg (f32 only)
  bool same_host_copy = true;               // false: this op sends every byte as TCP frames even to
                                            // same-host peers (comparisons; CommOptions can turn the
                                            // single-copy path off for the whole process)

  static OpOptions within(double seconds) {
    OpOptions o;
    o.deadline = core::Deadline::afterSeconds(seconds);
    return o;
  }
};

// Completion of an asynchronous op. Copyable; all copies see one op.
class Handle {
 public:
  Handle() = default;
  // Waits for completion. If the deadline passes or abort is set first, the
  // epoch's transport is aborted (so the op stops touching its buffers),
  // and kDeadlineExceeded / kAborted is returned after it has stopped.
  core::Status wait(const core::Deadline& deadline = core::Deadline::never(),
                    const core::AbortFlag& abort = core::AbortFlag());
  bool done() const;
  bool valid() const { return state_ != nullptr; }

  struct State;
  explicit Handle(std::shared_ptr<State> s) : state_(std::move(s)) {}

 private:
  std::shared_ptr<State> state_;
};

struct CommConfig {
  int rank = 0;
  int world = 1;
  std::vector<int> island_of_rank;  // island index (into cluster.islands) per rank; empty = all 0
  core::ClusterSpec cluster;        // straits: emulation and TLS; may be empty
  std::string secret;               // per-job secret for the handshake HMAC (required)
  uint32_t epoch = 0;
  CommOptions options;
};

// An ordered set of ranks of one epoch. Index i of ranks() is "group rank" i.
class Group : public std::enable_shared_from_this<Group> {
 public:
  ~Group();
  int rank() const { return me_; }
  int size() const { return static_cast<int>(ranks_.size()); }
  const std::vector<int>& ranks() const { return ranks_; }  // global ranks
  uint32_t epoch() const;
  int islandOf(int group_rank) const;

  // In place: data holds count elements on entry and the result on return.
  core::Status allreduce(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o = {});
  Handle allreduceAsync(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o = {});
  // Reduce-scatter inside each island, allreduce across islands (shard k
  // between the k-th ranks of every island), allgather inside. Islands of
  // different sizes: see docs/comm.md (K = smallest island size shards).
  core::Status hierarchicalAllreduce(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o = {});
  Handle hierarchicalAllreduceAsync(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o = {});
  // data (sum of counts elements) is clobbered; out receives block rank().
  core::Status reduceScatter(void* data, void* out, std::span<const size_t> counts, DType dtype, ReduceOp op,
                             const OpOptions& o = {});
  // The same, queued: data and out stay untouched by the caller until the handle completes.
  Handle reduceScatterAsync(void* data, void* out, std::span<const size_t> counts, DType dtype, ReduceOp op,
                            const OpOptions& o = {});
  // out holds size() blocks of `count` elements; block rank() comes from in.
  core::Status allgather(const void* in, void* out, size_t count, DType dtype, const OpOptions& o = {});
  core::Status allgatherv(const void* in, void* out, std::span<const size_t> counts, DType dtype,
                          const OpOptions& o = {});
  core::Status broadcast(void* data, size_t count, DType dtype, int root, const OpOptions& o = {});
  Handle broadcastAsync(void* data, size_t count, DType dtype, int root, const OpOptions& o = {});
  // in: block j (send_counts[j] elements) goes to rank j; out: block i from rank i.
  core::Status alltoallv(const void* in, std::span<const size_t> send_counts, void* out,
                         std::span<const size_t> recv_counts, DType dtype, const OpOptions& o = {});
  core::Status alltoall(const void* in, void* out, size_t count_per_rank, DType dtype, const OpOptions& o = {});
  // Point to point (group ranks); messages with the same (peer, tag) match in order.
  core::Status send(const void* data, size_t count, DType dtype, int dst, uint32_t tag, const OpOptions& o = {});
  core::Status recv(void* data, size_t count, DType dtype, int src, uint32_t tag, const OpOptions& o = {});
  core::Status barrier(const OpOptions& o = {});

  // Groups over the same transport. Every listed rank must make the same
  // call. A group's collectives run in the order its members submit them;
  // a `channel` makes a group over the same ranks whose collectives are
  // independent of the others' (their own tags and order), so two threads
  // can each drive one.
  core::Result<std::shared_ptr<Group>> subgroup(const std::vector<int>& global_ranks, const std::string& channel = "");
  core::Result<std::shared_ptr<Group>> islandGroup();       // members on my island
  core::Result<std::shared_ptr<Group>> crossIslandGroup();  // k-th member of every island, k = my index
  // New epoch from the survivors (global ranks); old groups fail fast.
  core::Result<std::shared_ptr<Group>> rebuild(uint32_t new_epoch, const std::vector<int>& survivors,
                                               const core::Deadline& deadline);

  // Bytes this process has written to the wire (all groups of the epoch).
  uint64_t bytesSent() const;
  // Bytes this process has sent across emulated straits (0 without emulation).
  uint64_t straitBytesSent() const;

 private:
  friend class Communicator;
  Group(Communicator* comm, std::shared_ptr<Mesh> mesh, std::vector<int> ranks, std::vector<int> islands,
        const std::string& channel);
  using OpFn = std::function<core::Status(uint64_t tag_base, const OpOptions&)>;
  Handle submit(const char* name, OpFn fn, const OpOptions& o);
  core::Status run(const char* name, OpFn fn, const OpOptions& o) {
    Handle h = submit(name, std::move(fn), o);
    return h.wait(o.deadline, o.abort);
  }
  void engineLoop();

  Communicator* comm_;
  std::shared_ptr<Mesh> mesh_;
  std::vector<int> ranks_;
  std::vector<int> islands_;  // island index of each member
  int me_ = -1;
  uint16_t id_ = 0;
  uint32_t seq_ = 0;  // engine thread only
  std::mutex p2p_mu_;
  std::vector<std::pair<uint64_t, uint32_t>> p2p_counters_;  // ((peer,dir,tag) key, count)
  // Wire tag of the next point-to-point message to/from group rank `peer`
  // with user tag `tag` in direction `sending` (advances its counter).
  uint64_t nextP2pTag(int peer, bool sending, uint32_t tag);

  struct Pending;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<Pending>> queue_;
  bool stop_ = false;
  std::thread engine_;
};

// One per worker process: owns the listening socket (kept across epochs),
// the authentication secret and the current epoch's transport.
class Communicator {
 public:
  static core::Result<std::unique_ptr<Communicator>> create(CommConfig config);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return config_.rank; }
  int worldSize() const { return config_.world; }
  uint32_t epoch() const;
  int port() const;
  std::string address() const;  // "host:port" to publish through the coordinator
  const CommConfig& config() const { return config_; }

  // Connects to every rank of config.world (addresses[r] = "host:port" of
  // rank r) for config.epoch and creates world().
  core::Status connect(const std::vector<std::string>& addresses, const core::Deadline& deadline);
  std::shared_ptr<Group> world();
  // Builds the next epoch from the survivors (global ranks, this rank
  // included) over the same listeners; returns the new world group
  // (group rank i = survivors[i]). Old groups fail fast from now on.
  core::Result<std::shared_ptr<Group>> rebuild(uint32_t new_epoch, const std::vector<int>& survivors,
                                               const core::Deadline& deadline);
  // Addresses by rank for the next rebuild (a rank that rejoined listens
  // somewhere new; a joiner that never called connect() learns them here).
  // Call from the thread that calls rebuild().
  void setAddresses(std::vector<std::string> addresses);
  // Aborts the current epoch: every pending and later op fails with kAborted.
  void abort(const std::string& reason);

  // Emulated straits as "EMULATED strait a<->b: ..." lines (empty if none).
  std::vector<std::string> emulationSummary() const;

 private:
  friend class Group;
  explicit Communicator(CommConfig config);
  core::Result<std::shared_ptr<Mesh>> buildMesh(uint32_t epoch, const std::vector<int>& members,
                                                const core::Deadline& deadline);
  core::Result<std::shared_ptr<Group>> makeGroup(std::shared_ptr<Mesh> mesh, std::vector<int> ranks,
                                                 const std::string& channel = "");

  CommConfig config_;
  std::unique_ptr<Endpoint> endpoint_;
  std::vector<std::string> addresses_;
  mutable std::mutex mu_;
  std::shared_ptr<Mesh> mesh_;
  std::shared_ptr<Group> world_;
  std::vector<std::pair<uint16_t, std::vector<int>>> group_ids_;
};

}  // namespace archipelago::comm
