#include "archipelago/comm/communicator.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include "archipelago/core/hash.h"
#include "archipelago/core/log.h"
#include "comm/collectives.h"
#include "comm/endpoint.h"
#include "comm/link_checksum.h"
#include "comm/link_tls.h"
#include "comm/mesh.h"
#include "comm/socket.h"

namespace archipelago::comm {

// ---- Handle ------------------------------------------------------------------------

struct Handle::State {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  core::Status status;
  std::shared_ptr<Mesh> mesh;
};

bool Handle::done() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->done;
}

core::Status Handle::wait(const core::Deadline& deadline, const core::AbortFlag& abort) {
  if (!state_) return core::failedPrecondition("wait on an empty handle");
  std::unique_lock<std::mutex> lock(state_->mu);
  while (!state_->done) {
    bool timed_out = deadline.expired();
    bool aborted = abort.aborted();
    if (timed_out || aborted) {
      core::Status why = timed_out ? core::deadlineExceeded("wait ran past its deadline")
                                   : core::aborted("wait aborted by the caller");
      lock.unlock();
      // Stop the op so it no longer touches the caller's buffers.
      state_->mesh->fail(why);
      lock.lock();
      state_->cv.wait(lock, [&] { return state_->done; });
      // The op's own status carries op/epoch/rank context (and this cause).
      return state_->status.isOk() ? why : state_->status;
    }
    state_->cv.wait_for(lock, std::min<core::Duration>(deadline.remaining(), std::chrono::milliseconds(20)));
  }
  return state_->status;
}

namespace {
// A handle that is complete from the start: an op refused before it was queued.
Handle failedHandle(core::Status why) {
  auto st = std::make_shared<Handle::State>();
  st->done = true;
  st->status = std::move(why);
  return Handle(st);
}
}  // namespace

// ---- Group -------------------------------------------------------------------------

struct Group::Pending {
  std::string name;
  OpFn fn;
  OpOptions opts;
  std::shared_ptr<Handle::State> state;
};

Group::Group(Communicator* comm, std::shared_ptr<Mesh> mesh, std::vector<int> ranks, std::vector<int> islands,
             const std::string& channel)
    : comm_(comm), mesh_(std::move(mesh)), ranks_(std::move(ranks)), islands_(std::move(islands)) {
  for (size_t i = 0; i < ranks_.size(); ++i) {
    if (ranks_[i] == comm_->rank()) me_ = static_cast<int>(i);
  }
  std::string key = std::to_string(mesh_->epoch());
  for (int r : ranks_) key += "," + std::to_string(r);
  if (!channel.empty()) key += "/" + channel;
  id_ = static_cast<uint16_t>(core::fnv1a64(key) & 0xffff);
  engine_ = std::thread([this] { engineLoop(); });
}

Group::~Group() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (engine_.joinable()) engine_.join();
}

uint32_t Group::epoch() const { return mesh_->epoch(); }
int Group::islandOf(int group_rank) const { return islands_[static_cast<size_t>(group_rank)]; }
uint64_t Group::bytesSent() const { return mesh_->bytesSent(); }
uint64_t Group::straitBytesSent() const { return mesh_->straitBytesSent(); }

Handle Group::submit(const char* name, OpFn fn, const OpOptions& o) {
  auto p = std::make_shared<Pending>();
  p->name = name;
  p->fn = std::move(fn);
  p->opts = o;
  p->state = std::make_shared<Handle::State>();
  p->state->mesh = mesh_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(p);
  }
  cv_.notify_all();
  return Handle(p->state);
}

void Group::engineLoop() {
  while (true) {
    std::shared_ptr<Pending> p;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      p = queue_.front();
      queue_.erase(queue_.begin());
    }
    uint32_t seq = seq_++;
    // Bit 47 stays 0: point-to-point tags own that half (nextP2pTag).
    uint64_t tag_base = (static_cast<uint64_t>(id_) << 48) | (static_cast<uint64_t>(seq & 0x7ffff) << 28);
    OpOptions o = p->opts;
    if (comm_->config().options.op_timeout_s > 0 && o.deadline.isNever()) {
      o.deadline = core::Deadline::afterSeconds(comm_->config().options.op_timeout_s);
    }
    core::Status st = mesh_->failure();
    if (st.isOk()) st = p->fn(tag_base, o);
    if (!st.isOk()) {
      st = st.withContext(p->name + " op " + std::to_string(seq) + " epoch " + std::to_string(mesh_->epoch()) +
                          " rank " + std::to_string(comm_->rank()));
      mesh_->fail(st);  // sticky: also stops the I/O threads touching this op's buffers
    }
    {
      std::lock_guard<std::mutex> lock(p->state->mu);
      p->state->done = true;
      p->state->status = st;
    }
    p->state->cv.notify_all();
  }
}

namespace {
algo::Ctx makeCtx(Mesh* mesh, const std::vector<int>& ranks, int me, uint64_t tag_base, const OpOptions& o,
                  const CommOptions* opt) {
  algo::Ctx c;
  c.mesh = mesh;
  c.ranks = ranks;
  c.me = me;
  c.tag_base = tag_base;
  c.deadline = o.deadline;
  c.abort = &o.abort;
  c.opt = opt;
  c.same_host_copy = o.same_host_copy;
  return c;
}

// Weighted average: scale by my weight and learn sum(w) first (phase kPhaseWeightSum).
core::Status prepareWeighted(const algo::Ctx& c, void* data, size_t count, DType dtype, ReduceOp op, double weight,
                             double* divide_by) {
  if (op == ReduceOp::kAvg) *divide_by = c.n();
  if (op != ReduceOp::kWeightedAvg) return core::okStatus();
  if (!isFloating(dtype)) return core::invalidArgument("weighted average needs a floating dtype");
  double w = weight;
  ARCH_RETURN_IF_ERROR(algo::recursiveDoubling(c, reinterpret_cast<uint8_t*>(&w), 1, DType::kF64, ReduceOp::kSum, 0,
                                               algo::kPhaseWeightSum));
  if (!(w > 0)) return core::invalidArgument("weighted average: the weights sum to " + std::to_string(w));
  scaleInPlace(dtype, data, count, weight);
  *divide_by = w;
  return core::okStatus();
}

ReduceOp baseOp(ReduceOp op) { return (op == ReduceOp::kAvg || op == ReduceOp::kWeightedAvg) ? ReduceOp::kSum : op; }
}  // namespace

Handle Group::allreduceAsync(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o) {
  const CommOptions* opt = &comm_->config().options;
  return submit("allreduce", [=, this](uint64_t tb, const OpOptions& oo) -> core::Status {
    auto c = makeCtx(mesh_.get(), ranks_, me_, tb, oo, opt);
    double div = 0;
    ARCH_RETURN_IF_ERROR(prepareWeighted(c, data, count, dtype, op, oo.weight, &div));
    return algo::allreduce(c, static_cast<uint8_t*>(data), count, dtype, baseOp(op), div, oo.algo, 0);
  }, o);
}

core::Status Group::allreduce(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o) {
  return allreduceAsync(data, count, dtype, op, o).wait(o.deadline, o.abort);
}

namespace {
// Where this rank sits in a group split into islands.
struct HierLayout {
  size_t islands = 0;             // number of islands
  size_t K = SIZE_MAX;            // shards per chunk: the smallest island's size
  int li = 0;                     // my index within my island
  std::vector<int> island_ranks;  // global ranks of my island, in group order
  std::vector<int> cross;         // local rank li of every island (empty when li >= K)
  int my_cross = 0;               // my index in `cross`
};

// Islands in order of first appearance; members in group order.
HierLayout hierLayout(const std::vector<int>& ranks, const std::vector<int>& islands, int me) {
  std::map<int, std::vector<int>> by_island;
  std::vector<int> island_order;
  for (int i = 0; i < static_cast<int>(ranks.size()); ++i) {
    int isl = islands[static_cast<size_t>(i)];
    if (!by_island.count(isl)) island_order.push_back(isl);
    by_island[isl].push_back(i);
  }
  HierLayout lay;
  lay.islands = island_order.size();
  if (lay.islands == 1) return lay;  // the caller runs a flat allreduce
  for (auto& [isl, m] : by_island) lay.K = std::min(lay.K, m.size());
  const auto& mine = by_island[islands[static_cast<size_t>(me)]];
  lay.li = static_cast<int>(std::find(mine.begin(), mine.end(), me) - mine.begin());
  for (int i : mine) lay.island_ranks.push_back(ranks[static_cast<size_t>(i)]);
  if (static_cast<size_t>(lay.li) < lay.K) {
    for (int isl : island_order) {
      int member = by_island[isl][static_cast<size_t>(lay.li)];
      if (member == me) lay.my_cross = static_cast<int>(lay.cross.size());
      lay.cross.push_back(ranks[static_cast<size_t>(member)]);
    }
  }
  return lay;
}

// What every chunk of one hierarchical allreduce shares.
struct HierOp {
  const algo::Ctx& c;  // the whole group
  HierLayout layout;
  DType dtype;
  ReduceOp bop;        // the reduction on the wire (kAvg and kWeightedAvg travel as kSum)
  double div;          // divisor of the averages, applied on the cross-island leg (0: none)
  CodecKind codec;     // codec of the cross-island leg
  Mesh* mesh;
};

// One chunk of the buffer through the three phases (tag phases p..p+2);
// rs_turn()/rs_done() bracket the intra-island reduce-scatter.
core::Status hierChunk(const HierOp& h, uint8_t* ptr, size_t cnt, uint32_t p, const std::function<bool()>& rs_turn,
                       const std::function<void()>& rs_done) {
  const HierLayout& lay = h.layout;
  const size_t es = dtypeSize(h.dtype);
  // Shard k (k < K) goes to local rank k of every island; local ranks
  // >= K (bigger islands) hold empty shards.
  auto shard = algo::evenCounts(cnt, static_cast<int>(lay.K));
  std::vector<size_t> counts(lay.island_ranks.size(), 0);
  for (size_t k = 0; k < lay.K; ++k) counts[k] = shard[k];
  auto ic = h.c.withRanks(lay.island_ranks, lay.li);
  if (rs_turn && !rs_turn()) return h.mesh->failure();
  core::Status rs = algo::ring(ic, ptr, counts, h.dtype, h.bop, true, false, 0, p);
  if (rs_done) rs_done();
  ARCH_RETURN_IF_ERROR(rs);
  if (static_cast<size_t>(lay.li) < lay.K) {
    auto cc = h.c.withRanks(lay.cross, lay.my_cross);
    size_t off = 0;
    for (int k = 0; k < lay.li; ++k) off += shard[static_cast<size_t>(k)];
    uint8_t* mine_ptr = ptr + off * es;
    if (h.codec != CodecKind::kNone) {
      ARCH_RETURN_IF_ERROR(algo::ringCodec(cc, reinterpret_cast<float*>(mine_ptr), shard[static_cast<size_t>(lay.li)],
                                           h.codec, h.div, p + 1, nullptr));
    } else {
      ARCH_RETURN_IF_ERROR(algo::allreduce(cc, mine_ptr, shard[static_cast<size_t>(lay.li)], h.dtype, h.bop, h.div,
                                           AllreduceAlgo::kAuto, p + 1));
    }
  }
  return algo::ring(ic, ptr, counts, h.dtype, h.bop, false, true, 0, p + 2);
}

// Runs `chunks` chunks of the buffer through hierChunk on `window` threads;
// the reduce-scatters take turns in chunk order (see the caller for why).
core::Status hierPipeline(const HierOp& h, uint8_t* bytes, size_t count, size_t chunks, size_t window) {
  const size_t es = dtypeSize(h.dtype);
  auto parts = algo::evenCounts(count, static_cast<int>(chunks));
  std::vector<size_t> starts(chunks, 0);
  for (size_t ch = 1; ch < chunks; ++ch) starts[ch] = starts[ch - 1] + parts[ch - 1];
  std::vector<core::Status> sts(chunks);
  std::mutex order_mu;
  std::condition_variable order_cv;
  size_t next_chunk = 0, next_rs = 0;
  bool stop = false;
  auto rsTurn = [&](size_t ch) -> bool {  // waits for chunk ch's turn to reduce-scatter
    std::unique_lock<std::mutex> lock(order_mu);
    order_cv.wait(lock, [&] { return stop || next_rs == ch; });
    return !stop;
  };
  auto rsDone = [&] {
    {
      std::lock_guard<std::mutex> lock(order_mu);
      ++next_rs;
    }
    order_cv.notify_all();
  };
  auto worker = [&] {
    while (true) {
      size_t ch;
      {
        std::lock_guard<std::mutex> lock(order_mu);
        if (stop || next_chunk == chunks) return;
        ch = next_chunk++;
      }
      core::Status st = hierChunk(h, bytes + starts[ch] * es, parts[ch], static_cast<uint32_t>(1 + 3 * ch),
                                  [&] { return rsTurn(ch); }, rsDone);
      if (!st.isOk()) {
        sts[ch] = st;
        {
          std::lock_guard<std::mutex> lock(order_mu);
          stop = true;
        }
        order_cv.notify_all();
        h.mesh->fail(st);  // stop the sibling chunks too
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  for (size_t w = 0; w < window; ++w) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  for (auto& st : sts) {
    if (!st.isOk()) return st;
  }
  return h.mesh->failure();
}
}  // namespace

Handle Group::hierarchicalAllreduceAsync(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o) {
  const CommOptions* opt = &comm_->config().options;
  return submit("hierarchical_allreduce", [=, this](uint64_t tb, const OpOptions& oo) -> core::Status {
    auto c = makeCtx(mesh_.get(), ranks_, me_, tb, oo, opt);
    if (oo.codec != CodecKind::kNone && dtype != DType::kF32) {
      return core::invalidArgument("a codec on the cross-island leg needs f32 data (got " +
                                   std::string(dtypeName(dtype)) + ")");
    }
    double div = 0;
    ARCH_RETURN_IF_ERROR(prepareWeighted(c, data, count, dtype, op, oo.weight, &div));
    const HierOp h{c, hierLayout(ranks_, islands_, me_), dtype, baseOp(op), div, oo.codec, mesh_.get()};
    auto* bytes = static_cast<uint8_t*>(data);
    if (h.layout.islands == 1) {
      return algo::allreduce(c, bytes, count, dtype, h.bop, div, oo.algo, 0);
    }
    // Large buffers are a pipeline of chunks (hier_chunk_bytes each, at most
    // kMaxHierChunks) taken in order by hier_window worker threads, so the
    // strait never idles: while chunk c crosses, chunk c+1 reduce-scatters
    // inside the island and chunk c-1 allgathers. The intra-island
    // reduce-scatters run one at a time in chunk order, so the first chunk
    // reaches the strait as early as possible instead of sharing the CPU
    // with all the others; the window keeps several chunks' bytes in flight
    // across the strait (its bandwidth-delay product).
    const size_t total_bytes = count * dtypeSize(dtype);
    const size_t want = (total_bytes + opt->hier_chunk_bytes - 1) / std::max<size_t>(opt->hier_chunk_bytes, 1);
    const size_t chunks = std::clamp<size_t>(std::min(want, count), 1, algo::kMaxHierChunks);
    if (chunks == 1) return hierChunk(h, bytes, count, 1, nullptr, nullptr);
    const size_t window = std::clamp<size_t>(static_cast<size_t>(std::max(opt->hier_window, 1)), 1, chunks);
    return hierPipeline(h, bytes, count, chunks, window);
  }, o);
}

core::Status Group::hierarchicalAllreduce(void* data, size_t count, DType dtype, ReduceOp op, const OpOptions& o) {
  return hierarchicalAllreduceAsync(data, count, dtype, op, o).wait(o.deadline, o.abort);
}

core::Status Group::reduceScatter(void* data, void* out, std::span<const size_t> counts, DType dtype, ReduceOp op,
                                  const OpOptions& o) {
  return reduceScatterAsync(data, out, counts, dtype, op, o).wait(o.deadline, o.abort);
}

Handle Group::reduceScatterAsync(void* data, void* out, std::span<const size_t> counts, DType dtype, ReduceOp op,
                                 const OpOptions& o) {
  if (counts.size() != ranks_.size()) {
    return failedHandle(core::invalidArgument("reduceScatter: counts.size() != group size"));
  }
  std::vector<size_t> cv(counts.begin(), counts.end());
  const CommOptions* opt = &comm_->config().options;
  return submit("reduce_scatter", [=, this](uint64_t tb, const OpOptions& oo) -> core::Status {
    auto c = makeCtx(mesh_.get(), ranks_, me_, tb, oo, opt);
    size_t total = std::accumulate(cv.begin(), cv.end(), size_t{0});
    double div = 0;
    ARCH_RETURN_IF_ERROR(prepareWeighted(c, data, total, dtype, op, oo.weight, &div));
    ARCH_RETURN_IF_ERROR(algo::ring(c, static_cast<uint8_t*>(data), cv, dtype, baseOp(op), true, false, div, 0));
    size_t off = 0;
    for (int i = 0; i < me_; ++i) off += cv[static_cast<size_t>(i)];
    const size_t es = dtypeSize(dtype);
    uint8_t* src = static_cast<uint8_t*>(data) + off * es;
    // A rank whose share is empty may pass null: memmove must not see it.
    const size_t mine = cv[static_cast<size_t>(me_)] * es;
    if (mine > 0 && out != src) std::memmove(out, src, mine);
    return core::okStatus();
  }, o);
}

core::Status Group::allgatherv(const void* in, void* out, std::span<const size_t> counts, DType dtype,
                               const OpOptions& o) {
  if (counts.size() != ranks_.size()) return core::invalidArgument("allgatherv: counts.size() != group size");
  std::vector<size_t> cv(counts.begin(), counts.end());
  const CommOptions* opt = &comm_->config().options;
  return run("allgather", [=, this](uint64_t tb, const OpOptions& oo) -> core::Status {
    auto c = makeCtx(mesh_.get(), ranks_, me_, tb, oo, opt);
    size_t off = 0;
    for (int i = 0; i < me_; ++i) off += cv[static_cast<size_t>(i)];
    const size_t es = dtypeSize(dtype);
    uint8_t* dst = static_cast<uint8_t*>(out) + off * es;
    // A rank with nothing to contribute may pass null (an empty vector's
    // data()); memmove's arguments must be valid even for zero bytes.
    const size_t mine = cv[static_cast<size_t>(me_)] * es;
    if (mine > 0 && dst != in) std::memmove(dst, in, mine);
    return algo::ring(c, static_cast<uint8_t*>(out), cv, dtype, ReduceOp::kSum, false, true, 0, 0);
  }, o);
}

core::Status Group::allgather(const void* in, void* out, size_t count, DType dtype, const OpOptions& o) {
  std::vector<size_t> counts(ranks_.size(), count);
  return allgatherv(in, out, counts, dtype, o);
}

Handle Group::broadcastAsync(void* data, size_t count, DType dtype, int root, const OpOptions& o) {
  const CommOptions* opt = &comm_->config().options;
  return submit("broadcast", [=, this](uint64_t tb, const OpOptions& oo) -> core::Status {
    if (root < 0 || root >= size()) return core::invalidArgument("broadcast root " + std::to_string(root) + " out of range");
    auto c = makeCtx(mesh_.get(), ranks_, me_, tb, oo, opt);
    return algo::broadcast(c, static_cast<uint8_t*>(data), count * dtypeSize(dtype), root, 0);
  }, o);
}

core::Status Group::broadcast(void* data, size_t count, DType dtype, int root, const OpOptions& o) {
  return broadcastAsync(data, count, dtype, root, o).wait(o.deadline, o.abort);
}

core::Status Group::alltoallv(const void* in, std::span<const size_t> send_counts, void* out,
                              std::span<const size_t> recv_counts, DType dtype, const OpOptions& o) {
  if (send_counts.size() != ranks_.size() || recv_counts.size() != ranks_.size()) {
    return core::invalidArgument("alltoallv: counts must have one entry per group rank");
  }
  const size_t es = dtypeSize(dtype);
  std::vector<size_t> sb, rb;
  for (size_t x : send_counts) sb.push_back(x * es);
  for (size_t x : recv_counts) rb.push_back(x * es);
  const CommOptions* opt = &comm_->config().options;
  return run("alltoall", [=, this](uint64_t tb, const OpOptions& oo) -> core::Status {
    auto c = makeCtx(mesh_.get(), ranks_, me_, tb, oo, opt);
    return algo::alltoallv(c, static_cast<const uint8_t*>(in), sb, static_cast<uint8_t*>(out), rb, 0);
  }, o);
}

core::Status Group::alltoall(const void* in, void* out, size_t count_per_rank, DType dtype, const OpOptions& o) {
  std::vector<size_t> counts(ranks_.size(), count_per_rank);
  return alltoallv(in, counts, out, counts, dtype, o);
}

core::Status Group::barrier(const OpOptions& o) {
  const CommOptions* opt = &comm_->config().options;
  return run("barrier", [=, this](uint64_t tb, const OpOptions& oo) -> core::Status {
    return algo::barrier(makeCtx(mesh_.get(), ranks_, me_, tb, oo, opt), 0);
  }, o);
}

// Point to point: tag = group id | 1<<47 | user tag (15 bits) << 32 | per-(peer, tag) message count.
uint64_t Group::nextP2pTag(int peer, bool sending, uint32_t tag) {
  const uint64_t key = (static_cast<uint64_t>(peer) << 20) | (sending ? (1u << 16) : 0u) | (tag & 0x7fff);
  uint32_t n;
  {
    std::lock_guard<std::mutex> lock(p2p_mu_);
    auto it = std::find_if(p2p_counters_.begin(), p2p_counters_.end(), [&](auto& p) { return p.first == key; });
    if (it == p2p_counters_.end()) it = p2p_counters_.insert(p2p_counters_.end(), {key, 0});
    n = it->second++;
  }
  return (static_cast<uint64_t>(id_) << 48) | (uint64_t{1} << 47) | (static_cast<uint64_t>(tag & 0x7fff) << 32) | n;
}

core::Status Group::send(const void* data, size_t count, DType dtype, int dst, uint32_t tag, const OpOptions& o) {
  if (dst < 0 || dst >= size() || dst == me_) return core::invalidArgument("send: bad destination " + std::to_string(dst));
  const uint64_t t = nextP2pTag(dst, true, tag);
  ARCH_RETURN_IF_ERROR(mesh_->failure());
  auto h = mesh_->send(ranks_[static_cast<size_t>(dst)], t, data, count * dtypeSize(dtype), o.same_host_copy);
  core::Status st = mesh_->waitSend(h, o.deadline, &o.abort);
  if (!st.isOk()) mesh_->fail(st);
  return st;
}

core::Status Group::recv(void* data, size_t count, DType dtype, int src, uint32_t tag, const OpOptions& o) {
  if (src < 0 || src >= size() || src == me_) return core::invalidArgument("recv: bad source " + std::to_string(src));
  const uint64_t t = nextP2pTag(src, false, tag);
  ARCH_RETURN_IF_ERROR(mesh_->failure());
  int peer = ranks_[static_cast<size_t>(src)];
  mesh_->postRecv(peer, t, data, count * dtypeSize(dtype));
  core::Status st = mesh_->waitRecv(peer, t, o.deadline, &o.abort);
  if (!st.isOk()) mesh_->fail(st);
  return st;
}

core::Result<std::shared_ptr<Group>> Group::subgroup(const std::vector<int>& global_ranks, const std::string& channel) {
  for (int r : global_ranks) {
    if (std::find(ranks_.begin(), ranks_.end(), r) == ranks_.end()) {
      return core::invalidArgument("subgroup: rank " + std::to_string(r) + " is not in this group");
    }
  }
  return comm_->makeGroup(mesh_, global_ranks, channel);
}

core::Result<std::shared_ptr<Group>> Group::islandGroup() {
  std::vector<int> r;
  for (int i = 0; i < size(); ++i) {
    if (islands_[static_cast<size_t>(i)] == islands_[static_cast<size_t>(me_)]) r.push_back(ranks_[static_cast<size_t>(i)]);
  }
  return subgroup(r);
}

core::Result<std::shared_ptr<Group>> Group::crossIslandGroup() {
  std::map<int, std::vector<int>> by_island;
  std::vector<int> order;
  for (int i = 0; i < size(); ++i) {
    int isl = islands_[static_cast<size_t>(i)];
    if (!by_island.count(isl)) order.push_back(isl);
    by_island[isl].push_back(ranks_[static_cast<size_t>(i)]);
  }
  const auto& mine = by_island[islands_[static_cast<size_t>(me_)]];
  size_t k = static_cast<size_t>(std::find(mine.begin(), mine.end(), ranks_[static_cast<size_t>(me_)]) - mine.begin());
  std::vector<int> r;
  for (int isl : order) {
    if (k < by_island[isl].size()) r.push_back(by_island[isl][k]);
  }
  return subgroup(r);
}

core::Result<std::shared_ptr<Group>> Group::rebuild(uint32_t new_epoch, const std::vector<int>& survivors,
                                                    const core::Deadline& deadline) {
  return comm_->rebuild(new_epoch, survivors, deadline);
}

// ---- Communicator --------------------------------------------------------------------

Communicator::Communicator(CommConfig config) : config_(std::move(config)) {}

Communicator::~Communicator() {
  std::shared_ptr<Mesh> mesh;
  {
    std::lock_guard<std::mutex> lock(mu_);
    world_.reset();
    mesh = mesh_;
    mesh_.reset();
  }
  if (mesh) mesh->close();
}

core::Result<std::unique_ptr<Communicator>> Communicator::create(CommConfig config) {
  if (config.secret.empty()) return core::invalidArgument("comm: the job secret is empty; set a per-job secret");
  if (config.world < 1 || config.rank < 0 || config.rank >= config.world) {
    return core::invalidArgument("comm: rank " + std::to_string(config.rank) + " outside world of " +
                                 std::to_string(config.world));
  }
  if (config.island_of_rank.empty()) config.island_of_rank.assign(static_cast<size_t>(config.world), 0);
  if (static_cast<int>(config.island_of_rank.size()) != config.world) {
    return core::invalidArgument("comm: island_of_rank has " + std::to_string(config.island_of_rank.size()) +
                                 " entries for a world of " + std::to_string(config.world));
  }
  if (config.options.streams < 1 || config.options.streams > 64) {
    return core::invalidArgument("comm: streams must be in 1..64 (got " + std::to_string(config.options.streams) + ")");
  }
  if (config.options.ring_max_pieces < 1 || config.options.ring_max_pieces > 64) {
    return core::invalidArgument("comm: ring_max_pieces must be in 1..64 (got " +
                                 std::to_string(config.options.ring_max_pieces) + ")");
  }
  if (config.options.local_streams < 1 || config.options.local_streams > 64) {
    return core::invalidArgument("comm: local_streams must be in 1..64 (got " +
                                 std::to_string(config.options.local_streams) + ")");
  }
  ARCH_RETURN_IF_ERROR(checkChecksumOption(config.options.checksum));
  std::unique_ptr<Communicator> c(new Communicator(std::move(config)));
  Communicator* raw = c.get();
  auto tls_policy = [raw](PeerRole role, int32_t peer) {
    const CommConfig& cc = raw->config_;
    if (role != PeerRole::kPeer || peer < 0 || peer >= cc.world) return cc.options.tls_all_links;
    return linkTls(cc.options, cc.cluster, cc.island_of_rank[static_cast<size_t>(cc.rank)],
                   cc.island_of_rank[static_cast<size_t>(peer)]);
  };
  ARCH_RETURN_IF_ERROR(checkTlsCredentials(c->config_.options, c->config_.cluster));
  ARCH_ASSIGN_OR_RETURN(c->endpoint_, Endpoint::listen(c->config_.options.listen_host, c->config_.rank,
                                                       c->config_.secret, tls_policy, c->config_.options.tls));
  c->endpoint_->setMinEpoch(c->config_.epoch);
  return c;
}

uint32_t Communicator::epoch() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mesh_ ? mesh_->epoch() : config_.epoch;
}

int Communicator::port() const { return endpoint_->port(); }

std::string Communicator::address() const {
  const auto& o = config_.options;
  return joinHostPort(o.advertise_host.empty() ? o.listen_host : o.advertise_host, port());
}

std::vector<std::string> Communicator::emulationSummary() const {
  std::vector<std::string> out;
  if (!config_.options.emulate_straits) return out;
  const auto& cl = config_.cluster;
  for (const auto& s : cl.straits) {
    if (!cl.emulated(s)) continue;
    out.push_back("EMULATED strait " + s.a + "<->" + s.b + ": " + linkParamsFromStrait(s).describe() +
                  " (userspace shaper, not a real link)");
  }
  return out;
}

namespace {

// A peer that cannot be reached ends the wait within max(10 s, 5 x the
// heartbeat timeout) of starting on it (the bound a lost coordinator gets
// too), not at the caller's deadline, which at start-up is long. A connect
// needs only the peer's kernel (its listener is up before it registers), so
// that is ample even on a loaded host; the accepting side allows twice as
// long, because the dialer may first be busy with lower peers.
core::Deadline reachDeadline(const core::Deadline& deadline, double heartbeat_timeout_s, int factor) {
  const double reach_s = factor * std::max(10.0, 5 * heartbeat_timeout_s);
  return core::Deadline(std::min(deadline.at(), core::Deadline::afterSeconds(reach_s).at()));
}

// Both ranks and the address tried, and which side could not reach which.
core::Status unreachable(const core::Status& st, int me, int peer, const std::vector<std::string>& addresses,
                         uint32_t epoch) {
  const std::string& mine = addresses[static_cast<size_t>(me)];
  const std::string& theirs = addresses[static_cast<size_t>(peer)];
  const std::string what =
      me < peer ? "rank " + std::to_string(me) + " could not reach rank " + std::to_string(peer) + " at " + theirs +
                      " (the address rank " + std::to_string(peer) + " advertised; is it reachable from this host?)"
                : "rank " + std::to_string(peer) + " never connected to rank " + std::to_string(me) + " at " + mine +
                      " (the address this rank advertised; is it reachable from rank " + std::to_string(peer) +
                      "'s host?)";
  return core::Status(st.code(), what + ", epoch " + std::to_string(epoch) + ": " + st.message());
}

}  // namespace

core::Result<std::shared_ptr<Mesh>> Communicator::buildMesh(uint32_t epoch, const std::vector<int>& members,
                                                            const core::Deadline& deadline) {
  const int me = config_.rank;
  auto mesh = std::make_shared<Mesh>(me, epoch, members, config_.options);
  const auto& cl = config_.cluster;
  const uint64_t job = core::fnv1a64(config_.secret);
  std::vector<Mesh::PeerLinks> links;
  core::AbortFlag never;
  for (int peer : members) {
    if (peer == me) continue;
    Mesh::PeerLinks l;
    l.peer = peer;
    int a = config_.island_of_rank[static_cast<size_t>(me)];
    int b = config_.island_of_rank[static_cast<size_t>(peer)];
    const bool tls = linkTls(config_.options, cl, a, b);
    if (tls) ARCH_LOG_DEBUG("comm rank {}: TLS to rank {}", me, peer);
    if (a != b && a < static_cast<int>(cl.islands.size()) && b < static_cast<int>(cl.islands.size())) {
      const auto& na = cl.islands[static_cast<size_t>(a)].name;
      const auto& nb = cl.islands[static_cast<size_t>(b)].name;
      const core::StraitSpec* s = cl.strait(na, nb);
      if (s && config_.options.emulate_straits && cl.emulated(*s) && (s->bandwidth > 0 || s->latency > 0)) {
        // One shaper per direction of the strait, shared by every process of the job.
        std::string shm = "/arch-" + std::to_string(job % 1000000007ULL) + "-e" + std::to_string(epoch) + "-" +
                          std::to_string(a) + "to" + std::to_string(b);
        l.shaper = std::make_shared<LinkShaper>(linkParamsFromStrait(*s), shm, core::mix64(job + static_cast<uint64_t>(me)));
        static std::set<std::pair<int, int>> logged;
        if (!logged.count({a, b})) {
          logged.insert({a, b});
          ARCH_LOG_INFO("EMULATED strait {}<->{}: {} (rank {} -> rank {}; userspace shaper)", na, nb,
                        l.shaper->params().describe(), me, peer);
        }
      }
    }
    {
      auto host = [](const std::string& a) { return a.substr(0, a.rfind(':')); };
      const bool one_host = host(addresses_[static_cast<size_t>(peer)]) == host(addresses_[static_cast<size_t>(me)]);
      l.same_host = !tls && one_host;
      l.crc = linkChecksum(config_.options.checksum, cl, a, b, one_host, tls);
    }
    // Both ends derive the same count: same cluster spec, same addresses.
    const int S = l.same_host && !l.shaper ? config_.options.local_streams : config_.options.streams;
    const core::Deadline reach = reachDeadline(deadline, config_.options.heartbeat_timeout_s, me < peer ? 1 : 2);
    for (int s = 0; s < S; ++s) {
      core::Result<std::unique_ptr<Socket>> sock =
          me < peer ? dialPeer(addresses_[static_cast<size_t>(peer)], config_.secret, me, peer, epoch,
                               static_cast<uint32_t>(s), tls ? &config_.options.tls : nullptr, reach, &never)
                    : endpoint_->take(epoch, peer, static_cast<uint32_t>(s), reach, &never);
      if (!sock.isOk()) return unreachable(sock.status(), me, peer, addresses_, epoch);
      l.streams.push_back(std::move(sock).value());
    }
    links.push_back(std::move(l));
  }
  mesh->start(std::move(links));
  return mesh;
}

core::Result<std::shared_ptr<Group>> Communicator::makeGroup(std::shared_ptr<Mesh> mesh, std::vector<int> ranks,
                                                             const std::string& channel) {
  if (std::find(ranks.begin(), ranks.end(), config_.rank) == ranks.end()) {
    return core::invalidArgument("rank " + std::to_string(config_.rank) + " is not a member of the requested group");
  }
  std::vector<int> islands;
  for (int r : ranks) islands.push_back(config_.island_of_rank[static_cast<size_t>(r)]);
  return std::shared_ptr<Group>(new Group(this, std::move(mesh), std::move(ranks), std::move(islands), channel));
}

core::Status Communicator::connect(const std::vector<std::string>& addresses, const core::Deadline& deadline) {
  if (static_cast<int>(addresses.size()) != config_.world) {
    return core::invalidArgument("comm: " + std::to_string(addresses.size()) + " addresses for a world of " +
                                 std::to_string(config_.world));
  }
  addresses_ = addresses;
  std::vector<int> all(static_cast<size_t>(config_.world));
  std::iota(all.begin(), all.end(), 0);
  ARCH_ASSIGN_OR_RETURN(auto mesh, buildMesh(config_.epoch, all, deadline));
  ARCH_ASSIGN_OR_RETURN(auto g, makeGroup(mesh, all));
  std::lock_guard<std::mutex> lock(mu_);
  mesh_ = mesh;
  world_ = g;
  return core::okStatus();
}

std::shared_ptr<Group> Communicator::world() {
  std::lock_guard<std::mutex> lock(mu_);
  return world_;
}

core::Result<std::shared_ptr<Group>> Communicator::rebuild(uint32_t new_epoch, const std::vector<int>& survivors,
                                                           const core::Deadline& deadline) {
  std::shared_ptr<Mesh> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (mesh_ && new_epoch <= mesh_->epoch()) {
      return core::failedPrecondition("rebuild to epoch " + std::to_string(new_epoch) + " but already at epoch " +
                                      std::to_string(mesh_->epoch()));
    }
    old = mesh_;
  }
  if (old) old->fail(core::aborted("epoch " + std::to_string(old->epoch()) + " replaced by epoch " +
                                   std::to_string(new_epoch)));
  endpoint_->setMinEpoch(new_epoch);
  ARCH_ASSIGN_OR_RETURN(auto mesh, buildMesh(new_epoch, survivors, deadline));
  ARCH_ASSIGN_OR_RETURN(auto g, makeGroup(mesh, survivors));
  std::lock_guard<std::mutex> lock(mu_);
  mesh_ = mesh;
  world_ = g;
  return g;
}

void Communicator::setAddresses(std::vector<std::string> addresses) {
  addresses.resize(static_cast<size_t>(config_.world));
  addresses_ = std::move(addresses);
}

void Communicator::abort(const std::string& reason) {
  std::shared_ptr<Mesh> m;
  {
    std::lock_guard<std::mutex> lock(mu_);
    m = mesh_;
  }
  if (m) m->fail(core::aborted(reason));
}

}  // namespace archipelago::comm
