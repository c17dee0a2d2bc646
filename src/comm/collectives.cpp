#include "comm/collectives.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace archipelago::comm::algo {

std::vector<size_t> evenCounts(size_t count, int parts) {
  std::vector<size_t> c(static_cast<size_t>(parts));
  for (int i = 0; i < parts; ++i) c[static_cast<size_t>(i)] = count / parts + (static_cast<size_t>(i) < count % parts ? 1 : 0);
  return c;
}

namespace {

int mod(int a, int n) { return ((a % n) + n) % n; }

struct SendSet {
  std::vector<SendHandle> handles;
  core::Status waitAll(const Ctx& c) {
    for (auto& h : handles) ARCH_RETURN_IF_ERROR(c.mesh->waitSend(h, c.deadline, c.abort));
    handles.clear();
    return core::okStatus();
  }
};

}  // namespace

core::Status ring(const Ctx& c, uint8_t* data, std::span<const size_t> counts, DType dtype, ReduceOp op, bool rs,
                  bool ag, double divide_by, uint32_t phase) {
  const int n = c.n();
  const size_t es = dtypeSize(dtype);
  if (n == 1) {
    if (rs && divide_by != 0) divideInPlace(dtype, data, counts[0], divide_by);
    return core::okStatus();
  }
  std::vector<size_t> off(static_cast<size_t>(n) + 1, 0);
  size_t max_block = 0;
  for (int i = 0; i < n; ++i) {
    off[static_cast<size_t>(i) + 1] = off[static_cast<size_t>(i)] + counts[static_cast<size_t>(i)];
    max_block = std::max(max_block, counts[static_cast<size_t>(i)]);
  }
  const size_t P = std::clamp<size_t>((max_block * es + c.opt->chunk_bytes - 1) / std::max<size_t>(c.opt->chunk_bytes, 1),
                                      1, static_cast<size_t>(std::clamp(c.opt->ring_max_pieces, 1, 64)));
  // Piece j of block b, in elements: [begin, end).
  auto piece = [&](int b, size_t j) {
    size_t cnt = counts[static_cast<size_t>(b)];
    size_t lo = off[static_cast<size_t>(b)] + cnt * j / P;
    size_t hi = off[static_cast<size_t>(b)] + cnt * (j + 1) / P;
    return std::make_pair(lo, hi);
  };
  const int left = c.ranks[static_cast<size_t>(mod(c.me - 1, n))];
  const int right = c.ranks[static_cast<size_t>(mod(c.me + 1, n))];
  const uint32_t ag_base = static_cast<uint32_t>(n - 1);
  auto tagOf = [&](uint32_t step, size_t j) { return c.tag(phase, step * 64 + static_cast<uint32_t>(j)); };
  SendSet sends;

  // The allgather's receives land in place. After a reduce-scatter each one
  // goes into a block that step of the reduce-scatter sent, so it is posted
  // behind that send (Mesh::postRecvAfter); alone, all are posted up front.
  auto postAgAfter = [&](const SendHandle& h, int t, size_t j) {
    auto [lo, hi] = piece(mod(c.me - t - 1, n), j);
    c.mesh->postRecvAfter(h, left, tagOf(ag_base + static_cast<uint32_t>(t), j), data + lo * es, (hi - lo) * es);
  };
  if (ag && !rs) {
    for (int t = 0; t < n - 1; ++t) {
      for (size_t j = 0; j < P; ++j) postAgAfter(nullptr, t, j);
    }
  }
  if (rs) {
    // Two staging blocks (steps alternate), pooled by the mesh.
    ScratchLease lease = c.mesh->borrowScratch(2 * max_block * es);
    uint8_t* scratch[2] = {lease.data(), lease.data() + max_block * es};
    auto postStep = [&](int t) {
      int rb = mod(c.me - t - 2, n);
      for (size_t j = 0; j < P; ++j) {
        auto [lo, hi] = piece(rb, j);
        // The receiving I/O thread reduces each piece into place as it lands.
        c.mesh->postRecvReduce(left, tagOf(static_cast<uint32_t>(t), j),
                               scratch[t % 2] + (lo - off[static_cast<size_t>(rb)]) * es, (hi - lo) * es,
                               data + lo * es, dtype, op);
      }
    };
    postStep(0);
    if (n - 1 > 1) postStep(1);
    int sb0 = mod(c.me - 1, n);
    for (size_t j = 0; j < P; ++j) {
      auto [lo, hi] = piece(sb0, j);
      sends.handles.push_back(c.send(right, tagOf(0, j), data + lo * es, (hi - lo) * es));
      if (ag) postAgAfter(sends.handles.back(), 0, j);
    }
    for (int t = 0; t < n - 1; ++t) {
      int rb = mod(c.me - t - 2, n);
      for (size_t j = 0; j < P; ++j) {
        auto [lo, hi] = piece(rb, j);
        ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(left, tagOf(static_cast<uint32_t>(t), j), c.deadline, c.abort));
        if (t < n - 2) {
          sends.handles.push_back(
              c.send(right, tagOf(static_cast<uint32_t>(t + 1), j), data + lo * es, (hi - lo) * es));
          if (ag) postAgAfter(sends.handles.back(), t + 1, j);
        } else {
          if (divide_by != 0) divideInPlace(dtype, data + lo * es, hi - lo, divide_by);
          if (ag) sends.handles.push_back(c.send(right, tagOf(ag_base, j), data + lo * es, (hi - lo) * es));
        }
      }
      if (t + 2 <= n - 2) postStep(t + 2);
    }
  } else if (ag) {
    for (size_t j = 0; j < P; ++j) {
      auto [lo, hi] = piece(c.me, j);
      sends.handles.push_back(c.send(right, tagOf(ag_base, j), data + lo * es, (hi - lo) * es));
    }
  }
  if (ag) {
    for (int t = 0; t < n - 1; ++t) {
      int rb = mod(c.me - t - 1, n);
      for (size_t j = 0; j < P; ++j) {
        auto [lo, hi] = piece(rb, j);
        ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(left, tagOf(ag_base + static_cast<uint32_t>(t), j), c.deadline, c.abort));
        if (t < n - 2) {
          sends.handles.push_back(
              c.send(right, tagOf(ag_base + static_cast<uint32_t>(t + 1), j), data + lo * es, (hi - lo) * es));
        }
      }
    }
  }
  return sends.waitAll(c);
}

core::Status recursiveDoubling(const Ctx& c, uint8_t* data, size_t count, DType dtype, ReduceOp op, double divide_by,
                               uint32_t phase) {
  const int n = c.n();
  const size_t bytes = count * dtypeSize(dtype);
  if (n > 1 && bytes > 0) {
    int p = 1;
    while (p * 2 <= n) p *= 2;
    const int rem = n - p;
    ScratchLease lease = c.mesh->borrowScratch(bytes);
    std::span<uint8_t> scratch(lease.data(), bytes);
    auto peer = [&](int i) { return c.ranks[static_cast<size_t>(i)]; };
    uint32_t step = 0;
    if (c.me >= p) {  // fold in: hand my data to me - p, get the result back
      auto h = c.send(peer(c.me - p), c.tag(phase, 0), data, bytes);
      ARCH_RETURN_IF_ERROR(c.mesh->waitSend(h, c.deadline, c.abort));
      c.mesh->postRecv(peer(c.me - p), c.tag(phase, 1000), data, bytes);
      ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(peer(c.me - p), c.tag(phase, 1000), c.deadline, c.abort));
      return core::okStatus();
    }
    if (c.me < rem) {
      c.mesh->postRecv(peer(c.me + p), c.tag(phase, 0), scratch.data(), bytes);
      ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(peer(c.me + p), c.tag(phase, 0), c.deadline, c.abort));
      reduceInto(dtype, op, data, scratch.data(), count);
    }
    for (int mask = 1; mask < p; mask <<= 1) {
      ++step;
      int partner = peer(c.me ^ mask);
      c.mesh->postRecv(partner, c.tag(phase, step), scratch.data(), bytes);
      auto h = c.send(partner, c.tag(phase, step), data, bytes);
      ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(partner, c.tag(phase, step), c.deadline, c.abort));
      ARCH_RETURN_IF_ERROR(c.mesh->waitSend(h, c.deadline, c.abort));
      // IEEE add/max/min are commutative, so both partners get the same bits.
      reduceInto(dtype, op, data, scratch.data(), count);
    }
    if (divide_by != 0) divideInPlace(dtype, data, count, divide_by);
    if (c.me < rem) {
      auto h = c.send(peer(c.me + p), c.tag(phase, 1000), data, bytes);
      ARCH_RETURN_IF_ERROR(c.mesh->waitSend(h, c.deadline, c.abort));
    }
    return core::okStatus();
  }
  if (divide_by != 0) divideInPlace(dtype, data, count, divide_by);
  return core::okStatus();
}

AllreduceAlgo autoAllreduceAlgo(int n, size_t count, size_t elem_bytes, const CommOptions& opt) {
  const size_t bytes = count * elem_bytes;
  if (bytes <= opt.small_message_bytes || count < static_cast<size_t>(n)) return AllreduceAlgo::kRecursiveDoubling;
  // Halving-doubling saves the ring's steps where there are many (measured
  // on loopback, docs/comm.md section 7: at 8 and 16 ranks it wins up to
  // 1 MB, at 4 it never beats both others). Folding members beyond a
  // power of two in and out costs two whole-buffer hops.
  const bool power_of_two = (n & (n - 1)) == 0;
  if (n >= 8 && power_of_two && bytes <= opt.halving_doubling_bytes) return AllreduceAlgo::kHalvingDoubling;
  return AllreduceAlgo::kRing;
}

core::Status halvingDoubling(const Ctx& c, uint8_t* data, size_t count, DType dtype, ReduceOp op, double divide_by,
                             uint32_t phase) {
  const int n = c.n();
  int p = 1;
  while (p * 2 <= n) p *= 2;
  // Every member of the power-of-two core needs at least one element.
  if (n == 1 || count < static_cast<size_t>(p)) return recursiveDoubling(c, data, count, dtype, op, divide_by, phase);
  const size_t es = dtypeSize(dtype);
  const int rem = n - p;
  auto peer = [&](int i) { return c.ranks[static_cast<size_t>(i)]; };
  constexpr uint32_t kFoldIn = 0, kFoldOut = 1000, kGather = 500;
  if (c.me >= p) {  // fold in: hand my data to me - p, get the result back
    auto h = c.send(peer(c.me - p), c.tag(phase, kFoldIn), data, count * es);
    ARCH_RETURN_IF_ERROR(c.mesh->waitSend(h, c.deadline, c.abort));
    c.mesh->postRecv(peer(c.me - p), c.tag(phase, kFoldOut), data, count * es);
    return c.mesh->waitRecv(peer(c.me - p), c.tag(phase, kFoldOut), c.deadline, c.abort);
  }
  // The first step's halves are the largest scratch any step needs, except
  // the fold, which lands whole.
  ScratchLease lease = c.mesh->borrowScratch((c.me < rem ? count : (count + 1) / 2) * es);
  if (c.me < rem) {
    c.mesh->postRecvReduce(peer(c.me + p), c.tag(phase, kFoldIn), lease.data(), count * es, data, dtype, op);
    ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(peer(c.me + p), c.tag(phase, kFoldIn), c.deadline, c.abort));
  }
  // Reduce-scatter by recursive halving: at distance `mask` the pair splits
  // its current segment, each keeps one half and receives the partner's
  // copy of it (reduced in as it lands), and sends the other. One rank ends
  // owning each final segment, so every rank gets the same bits from the
  // allgather. The allgather receives into the very halves the sends read,
  // each posted behind its send (Mesh::postRecvAfter), so no step waits
  // for a send.
  struct Split {
    int partner;
    size_t lo, mid, hi;
    bool keep_low;
    SendHandle sent;
  };
  std::vector<Split> splits;
  SendSet sends;
  size_t lo = 0, hi = count;
  uint32_t step = 0;
  for (int mask = p / 2; mask >= 1; mask /= 2, ++step) {
    const int partner = peer(c.me ^ mask);
    const size_t mid = lo + (hi - lo) / 2;
    const bool keep_low = (c.me & mask) == 0;
    const size_t klo = keep_low ? lo : mid, khi = keep_low ? mid : hi;
    const size_t slo = keep_low ? mid : lo, shi = keep_low ? hi : mid;
    c.mesh->postRecvReduce(partner, c.tag(phase, 1 + step), lease.data(), (khi - klo) * es, data + klo * es, dtype,
                           op);
    SendHandle h = c.send(partner, c.tag(phase, 1 + step), data + slo * es, (shi - slo) * es);
    sends.handles.push_back(h);
    splits.push_back({partner, lo, mid, hi, keep_low, h});
    ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(partner, c.tag(phase, 1 + step), c.deadline, c.abort));
    lo = klo, hi = khi;
  }
  if (divide_by != 0) divideInPlace(dtype, data + lo * es, hi - lo, divide_by);
  // Allgather by recursive doubling: the splits in reverse, each pair
  // swapping its halves of the segment it split.
  for (size_t k = splits.size(); k-- > 0;) {
    const Split& sp = splits[k];
    const int partner = sp.partner;
    const size_t rlo = sp.keep_low ? sp.mid : sp.lo, rhi = sp.keep_low ? sp.hi : sp.mid;
    c.mesh->postRecvAfter(sp.sent, partner, c.tag(phase, kGather + static_cast<uint32_t>(k)), data + rlo * es,
                          (rhi - rlo) * es);
    sends.handles.push_back(
        c.send(partner, c.tag(phase, kGather + static_cast<uint32_t>(k)), data + lo * es, (hi - lo) * es));
    ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(partner, c.tag(phase, kGather + static_cast<uint32_t>(k)), c.deadline,
                                          c.abort));
    lo = sp.lo, hi = sp.hi;
  }
  if (c.me < rem) sends.handles.push_back(c.send(peer(c.me + p), c.tag(phase, kFoldOut), data, count * es));
  return sends.waitAll(c);
}

core::Status allreduce(const Ctx& c, uint8_t* data, size_t count, DType dtype, ReduceOp op, double divide_by,
                       AllreduceAlgo algo, uint32_t phase) {
  if (algo == AllreduceAlgo::kAuto) algo = autoAllreduceAlgo(c.n(), count, dtypeSize(dtype), *c.opt);
  if (algo == AllreduceAlgo::kRecursiveDoubling) return recursiveDoubling(c, data, count, dtype, op, divide_by, phase);
  if (algo == AllreduceAlgo::kHalvingDoubling) return halvingDoubling(c, data, count, dtype, op, divide_by, phase);
  auto counts = evenCounts(count, c.n());
  return ring(c, data, counts, dtype, op, true, true, divide_by, phase);
}

core::Status ringCodec(const Ctx& c, float* data, size_t count, CodecKind codec, double divide_by, uint32_t phase,
                       uint64_t* wire_bytes) {
  const int n = c.n();
  if (n == 1) {
    if (divide_by != 0) divideInPlace(DType::kF32, data, count, divide_by);
    roundTrip(codec, std::span<float>(data, count));
    return core::okStatus();
  }
  auto counts = evenCounts(count, n);
  std::vector<size_t> off(static_cast<size_t>(n) + 1, 0);
  for (int i = 0; i < n; ++i) off[static_cast<size_t>(i) + 1] = off[static_cast<size_t>(i)] + counts[static_cast<size_t>(i)];
  const int left = c.ranks[static_cast<size_t>(mod(c.me - 1, n))];
  const int right = c.ranks[static_cast<size_t>(mod(c.me + 1, n))];
  auto blk = [&](int b) { return std::span<float>(data + off[static_cast<size_t>(b)], counts[static_cast<size_t>(b)]); };
  auto esz = [&](int b) { return encodedSize(codec, counts[static_cast<size_t>(b)]); };
  std::vector<std::vector<uint8_t>> bufs;  // every encoded buffer stays alive until all sends finish
  bufs.reserve(static_cast<size_t>(4 * n));
  SendSet sends;
  std::vector<float> tmp;
  uint64_t wire = 0;
  // Reduce-scatter: each hop carries the encoded partial sum.
  for (int t = 0; t < n - 1; ++t) {
    int sb = mod(c.me - t - 1, n), rb = mod(c.me - t - 2, n);
    bufs.emplace_back(esz(sb));
    encode(codec, blk(sb), bufs.back());
    wire += bufs.back().size();
    sends.handles.push_back(c.send(right, c.tag(phase, static_cast<uint32_t>(t)), bufs.back().data(), bufs.back().size()));
    bufs.emplace_back(esz(rb));
    auto& in = bufs.back();
    c.mesh->postRecv(left, c.tag(phase, static_cast<uint32_t>(t)), in.data(), in.size());
    ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(left, c.tag(phase, static_cast<uint32_t>(t)), c.deadline, c.abort));
    tmp.resize(counts[static_cast<size_t>(rb)]);
    ARCH_RETURN_IF_ERROR(decode(codec, in, tmp));
    // The block we reduce into was encoded for sending in an earlier step
    // (a copy), so reducing in place is safe while that send is in flight.
    reduceInto(DType::kF32, ReduceOp::kSum, blk(rb).data(), tmp.data(), tmp.size());
  }
  if (divide_by != 0) divideInPlace(DType::kF32, blk(c.me).data(), blk(c.me).size(), divide_by);
  bufs.emplace_back(esz(c.me));
  std::vector<uint8_t>* fwd = &bufs.back();
  encode(codec, blk(c.me), *fwd);
  ARCH_RETURN_IF_ERROR(decode(codec, *fwd, blk(c.me)));  // owner keeps what the others decode
  const uint32_t ag = static_cast<uint32_t>(n);
  for (int t = 0; t < n - 1; ++t) {
    wire += fwd->size();
    sends.handles.push_back(c.send(right, c.tag(phase, ag + static_cast<uint32_t>(t)), fwd->data(), fwd->size()));
    int rb = mod(c.me - t - 1, n);
    bufs.emplace_back(esz(rb));
    auto& in = bufs.back();
    c.mesh->postRecv(left, c.tag(phase, ag + static_cast<uint32_t>(t)), in.data(), in.size());
    ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(left, c.tag(phase, ag + static_cast<uint32_t>(t)), c.deadline, c.abort));
    ARCH_RETURN_IF_ERROR(decode(codec, in, blk(rb)));
    fwd = &in;  // forwarded unchanged: no re-encoding, so no drift between ranks
  }
  if (wire_bytes) *wire_bytes += wire;
  return sends.waitAll(c);
}

core::Status broadcast(const Ctx& c, uint8_t* data, size_t bytes, int root, uint32_t phase) {
  const int n = c.n();
  if (n == 1 || bytes == 0) return core::okStatus();
  const int pos = mod(c.me - root, n);
  auto rankAt = [&](int p) { return c.ranks[static_cast<size_t>(mod(p + root, n))]; };
  SendSet sends;
  if (bytes <= c.opt->small_message_bytes) {  // binomial tree
    int mask = 1;
    while (mask < n) {
      if (pos & mask) {
        c.mesh->postRecv(rankAt(pos - mask), c.tag(phase, 0), data, bytes);
        ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(rankAt(pos - mask), c.tag(phase, 0), c.deadline, c.abort));
        break;
      }
      mask <<= 1;
    }
    mask >>= 1;
    while (mask > 0) {
      if (pos + mask < n) sends.handles.push_back(c.send(rankAt(pos + mask), c.tag(phase, 0), data, bytes));
      mask >>= 1;
    }
    return sends.waitAll(c);
  }
  // Pipelined chain root -> root+1 -> ...: each piece is forwarded as soon as it lands.
  const size_t P = std::clamp<size_t>((bytes + c.opt->chunk_bytes - 1) / c.opt->chunk_bytes, 1, 1 << 19);
  auto pieceOf = [&](size_t j) { return std::make_pair(bytes * j / P, bytes * (j + 1) / P); };
  if (pos > 0) {
    for (size_t j = 0; j < P; ++j) {
      auto [lo, hi] = pieceOf(j);
      c.mesh->postRecv(rankAt(pos - 1), c.tag(phase, static_cast<uint32_t>(j)), data + lo, hi - lo);
    }
  }
  for (size_t j = 0; j < P; ++j) {
    auto [lo, hi] = pieceOf(j);
    if (pos > 0) ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(rankAt(pos - 1), c.tag(phase, static_cast<uint32_t>(j)), c.deadline, c.abort));
    if (pos < n - 1) sends.handles.push_back(c.send(rankAt(pos + 1), c.tag(phase, static_cast<uint32_t>(j)), data + lo, hi - lo));
  }
  return sends.waitAll(c);
}

core::Status alltoallv(const Ctx& c, const uint8_t* in, std::span<const size_t> send_bytes, uint8_t* out,
                       std::span<const size_t> recv_bytes, uint32_t phase) {
  const int n = c.n();
  std::vector<size_t> soff(static_cast<size_t>(n) + 1, 0), roff(static_cast<size_t>(n) + 1, 0);
  for (int i = 0; i < n; ++i) {
    soff[static_cast<size_t>(i) + 1] = soff[static_cast<size_t>(i)] + send_bytes[static_cast<size_t>(i)];
    roff[static_cast<size_t>(i) + 1] = roff[static_cast<size_t>(i)] + recv_bytes[static_cast<size_t>(i)];
  }
  // Zero bytes to keep is common (a rank routes no tokens to itself) and then
  // either buffer may be null, which memmove must not see.
  const size_t keep = std::min(send_bytes[static_cast<size_t>(c.me)], recv_bytes[static_cast<size_t>(c.me)]);
  if (keep > 0) std::memmove(out + roff[static_cast<size_t>(c.me)], in + soff[static_cast<size_t>(c.me)], keep);
  SendSet sends;
  for (int k = 1; k < n; ++k) {
    int from = mod(c.me - k, n);
    c.mesh->postRecv(c.ranks[static_cast<size_t>(from)], c.tag(phase, 0), out + roff[static_cast<size_t>(from)],
                     recv_bytes[static_cast<size_t>(from)]);
  }
  for (int k = 1; k < n; ++k) {
    int to = mod(c.me + k, n);
    sends.handles.push_back(c.send(c.ranks[static_cast<size_t>(to)], c.tag(phase, 0),
                                         in + soff[static_cast<size_t>(to)], send_bytes[static_cast<size_t>(to)]));
  }
  for (int k = 1; k < n; ++k) {
    int from = mod(c.me - k, n);
    ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(c.ranks[static_cast<size_t>(from)], c.tag(phase, 0), c.deadline, c.abort));
  }
  return sends.waitAll(c);
}

core::Status barrier(const Ctx& c, uint32_t phase) {
  const int n = c.n();
  uint8_t token = 1;
  uint32_t step = 0;
  for (int d = 1; d < n; d <<= 1, ++step) {  // dissemination barrier
    uint8_t got = 0;
    int to = c.ranks[static_cast<size_t>(mod(c.me + d, n))];
    int from = c.ranks[static_cast<size_t>(mod(c.me - d, n))];
    c.mesh->postRecv(from, c.tag(phase, step), &got, 1);
    auto h = c.send(to, c.tag(phase, step), &token, 1);
    ARCH_RETURN_IF_ERROR(c.mesh->waitRecv(from, c.tag(phase, step), c.deadline, c.abort));
    ARCH_RETURN_IF_ERROR(c.mesh->waitSend(h, c.deadline, c.abort));
  }
  return core::okStatus();
}

}  // namespace archipelago::comm::algo
