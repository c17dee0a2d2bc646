// Multi-process correctness of every collective against an fp64 reference
// computed by each rank from all ranks' (regenerable) inputs, for 2..8
// ranks including non-powers of two and sizes not divisible by the rank
// count or the pipeline chunk; plus bit-identity of results across ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "archipelago/comm/communicator.h"
#include "comm/collectives.h"
#include "comm_test_util.h"

namespace archipelago::comm {
namespace {

using testing::inputValue;
using testing::runAll;

// Hash of a buffer, allgathered: every rank must hold identical bytes.
std::string checkBitIdentical(Group& g, const void* data, size_t bytes) {
  uint64_t h = core::fnv1a64(std::string_view(static_cast<const char*>(data), bytes));
  std::vector<uint64_t> all(static_cast<size_t>(g.size()));
  RANK_OK(g.allgather(&h, all.data(), 1, DType::kI64));
  for (auto x : all) RANK_CHECK(x == h, "results differ across ranks");
  return "";
}

std::string allreduceF32(Group& g, size_t count, ReduceOp op, AllreduceAlgo algo) {
  const int n = g.size(), me = g.rank();
  std::vector<float> x(count);
  for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(inputValue(me, i));
  OpOptions o;
  o.algo = algo;
  o.weight = 1.0 + me;  // weighted average: rank r weighs r+1
  o.deadline = core::Deadline::afterSeconds(30);
  RANK_OK(g.allreduce(x.data(), count, DType::kF32, op, o));
  double wsum = 0;
  for (int r = 0; r < n; ++r) wsum += 1.0 + r;
  for (size_t i = 0; i < count; ++i) {
    double ref = op == ReduceOp::kMax ? -1e30 : 0;
    for (int r = 0; r < n; ++r) {
      double v = static_cast<float>(inputValue(r, i));
      if (op == ReduceOp::kMax) ref = std::max(ref, v);
      else if (op == ReduceOp::kWeightedAvg) ref += (1.0 + r) * v;
      else ref += v;
    }
    if (op == ReduceOp::kAvg) ref /= n;
    if (op == ReduceOp::kWeightedAvg) ref /= wsum;
    RANK_CHECK(std::abs(x[i] - ref) <= 1e-5 * n, "allreduce " << reduceOpName(op) << " n=" << n << " count=" << count
                                                               << " i=" << i << " got " << x[i] << " want " << ref);
  }
  return checkBitIdentical(g, x.data(), count * 4);
}

std::string sixteenBit(Group& g, size_t count, DType dt) {
  const int n = g.size(), me = g.rank();
  std::vector<uint16_t> x(count);
  auto to = [&](double v) { return dt == DType::kBF16 ? floatToBf16(static_cast<float>(v)) : floatToFp16(static_cast<float>(v)); };
  auto from = [&](uint16_t v) { return dt == DType::kBF16 ? bf16ToFloat(v) : fp16ToFloat(v); };
  for (size_t i = 0; i < count; ++i) x[i] = to(inputValue(me, i));
  RANK_OK(g.allreduce(x.data(), count, dt, ReduceOp::kSum));
  // Each pairwise add rounds once to 16 bits: n-1 roundings of values <= n.
  const double ulp = dt == DType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  for (size_t i = 0; i < count; ++i) {
    double ref = 0;
    for (int r = 0; r < n; ++r) ref += from(to(inputValue(r, i)));
    RANK_CHECK(std::abs(from(x[i]) - ref) <= n * n * ulp, dtypeName(dt) << " i=" << i << " got " << from(x[i]) << " want " << ref);
  }
  return checkBitIdentical(g, x.data(), count * 2);
}

std::string integers(Group& g, size_t count) {
  const int n = g.size(), me = g.rank();
  std::vector<int64_t> x(count);
  std::vector<int32_t> y(count);
  for (size_t i = 0; i < count; ++i) {
    x[i] = static_cast<int64_t>(inputValue(me, i) * 1e12);
    y[i] = static_cast<int32_t>(inputValue(me, i) * 1000);
  }
  RANK_OK(g.allreduce(x.data(), count, DType::kI64, ReduceOp::kMax));
  RANK_OK(g.allreduce(y.data(), count, DType::kI32, ReduceOp::kSum));
  for (size_t i = 0; i < count; ++i) {
    int64_t mx = INT64_MIN;
    int32_t sum = 0;
    for (int r = 0; r < n; ++r) {
      mx = std::max(mx, static_cast<int64_t>(inputValue(r, i) * 1e12));
      sum += static_cast<int32_t>(inputValue(r, i) * 1000);
    }
    RANK_CHECK(x[i] == mx && y[i] == sum, "integer allreduce at " << i);
  }
  return "";
}

std::string gatherScatterBroadcast(Group& g, size_t base) {
  const int n = g.size(), me = g.rank();
  // allgatherv with uneven counts (one rank contributes nothing)
  std::vector<size_t> counts(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) counts[static_cast<size_t>(r)] = r == 1 ? 0 : base + static_cast<size_t>(r) * 3;
  size_t total = std::accumulate(counts.begin(), counts.end(), size_t{0});
  std::vector<float> mine(counts[static_cast<size_t>(me)]), out(total);
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = static_cast<float>(inputValue(me, i, 7));
  RANK_OK(g.allgatherv(mine.data(), out.data(), counts, DType::kF32));
  size_t off = 0;
  for (int r = 0; r < n; ++r) {
    for (size_t i = 0; i < counts[static_cast<size_t>(r)]; ++i) {
      RANK_CHECK(out[off + i] == static_cast<float>(inputValue(r, i, 7)), "allgatherv block " << r << " i=" << i);
    }
    off += counts[static_cast<size_t>(r)];
  }
  // reduce-scatter (sum) with the same uneven counts
  std::vector<float> data(total), seg(counts[static_cast<size_t>(me)]);
  for (size_t i = 0; i < total; ++i) data[i] = static_cast<float>(inputValue(me, i, 9));
  RANK_OK(g.reduceScatter(data.data(), seg.data(), counts, DType::kF32, ReduceOp::kSum));
  size_t my_off = 0;
  for (int r = 0; r < me; ++r) my_off += counts[static_cast<size_t>(r)];
  for (size_t i = 0; i < seg.size(); ++i) {
    double ref = 0;
    for (int r = 0; r < n; ++r) ref += static_cast<float>(inputValue(r, my_off + i, 9));
    RANK_CHECK(std::abs(seg[i] - ref) <= 1e-5 * n, "reduce_scatter i=" << i);
  }
  // the same, queued and in place (ZeRO-2's gradient buckets): the sum lands in data's own block
  for (size_t i = 0; i < total; ++i) data[i] = static_cast<float>(inputValue(me, i, 9));
  RANK_OK(g.reduceScatterAsync(data.data(), data.data() + my_off, counts, DType::kF32, ReduceOp::kSum).wait());
  for (size_t i = 0; i < seg.size(); ++i) {
    RANK_CHECK(data[my_off + i] == seg[i], "in-place reduce_scatter i=" << i);
  }
  // broadcast from the last rank, small (tree) and large (pipelined chain)
  for (size_t count : {size_t{5}, base * 40 + 3}) {
    std::vector<float> b(count);
    for (size_t i = 0; i < count; ++i) b[i] = me == n - 1 ? static_cast<float>(inputValue(99, i)) : -7.0f;
    RANK_OK(g.broadcast(b.data(), count, DType::kF32, n - 1));
    for (size_t i = 0; i < count; ++i) RANK_CHECK(b[i] == static_cast<float>(inputValue(99, i)), "broadcast i=" << i);
  }
  // all-to-all(v): rank r sends (r + j) % 3 + 1 elements to rank j
  std::vector<size_t> sc(static_cast<size_t>(n)), rc(static_cast<size_t>(n));
  for (int j = 0; j < n; ++j) {
    sc[static_cast<size_t>(j)] = static_cast<size_t>((me + j) % 3 + 1);
    rc[static_cast<size_t>(j)] = static_cast<size_t>((j + me) % 3 + 1);
  }
  std::vector<int32_t> sin, sout(std::accumulate(rc.begin(), rc.end(), size_t{0}));
  for (int j = 0; j < n; ++j) {
    for (size_t k = 0; k < sc[static_cast<size_t>(j)]; ++k) sin.push_back(me * 1000 + j * 10 + static_cast<int>(k));
  }
  RANK_OK(g.alltoallv(sin.data(), sc, sout.data(), rc, DType::kI32));
  size_t p = 0;
  for (int j = 0; j < n; ++j) {
    for (size_t k = 0; k < rc[static_cast<size_t>(j)]; ++k) {
      RANK_CHECK(sout[p++] == j * 1000 + me * 10 + static_cast<int>(k), "alltoallv from " << j);
    }
  }
  // send/recv around a ring, then a barrier
  std::vector<float> msg(base + 1, static_cast<float>(me)), got(base + 1);
  int right = (me + 1) % n, left = (me + n - 1) % n;
  if (me % 2 == 0) {
    RANK_OK(g.send(msg.data(), msg.size(), DType::kF32, right, 5));
    RANK_OK(g.recv(got.data(), got.size(), DType::kF32, left, 5));
  } else {
    RANK_OK(g.recv(got.data(), got.size(), DType::kF32, left, 5));
    RANK_OK(g.send(msg.data(), msg.size(), DType::kF32, right, 5));
  }
  RANK_CHECK(got[base] == static_cast<float>(left), "send/recv");
  RANK_OK(g.barrier());
  return "";
}

std::string everythingWith(const LocalRank& lr, const CommConfig& cfg) {
  auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(20));
  if (!cr.isOk()) return cr.status().toString();
  Group& g = *cr->world;
  const size_t n = static_cast<size_t>(g.size());
  // 1 element, fewer than n, small (recursive doubling), and sizes that
  // divide neither by n nor by the 64 KiB chunk (halving-doubling for
  // powers of two, the ring otherwise: testConfig's thresholds).
  for (size_t count : {size_t{1}, n - 1, size_t{777}, size_t{50001}}) {
    if (count == 0) continue;
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kWeightedAvg}) {
      std::string e = allreduceF32(g, count, op, AllreduceAlgo::kAuto);
      if (!e.empty()) return e;
    }
  }
  for (AllreduceAlgo a : {AllreduceAlgo::kRing, AllreduceAlgo::kRecursiveDoubling, AllreduceAlgo::kHalvingDoubling}) {
    std::string e = allreduceF32(g, 3001, ReduceOp::kSum, a);
    if (!e.empty()) return e;
  }
  // Halving-doubling with every op: segments of one element (count = n),
  // halves that do not split evenly (50001), and folded members when n is
  // not a power of two.
  for (size_t count : {n, size_t{50001}}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kWeightedAvg}) {
      std::string e = allreduceF32(g, count, op, AllreduceAlgo::kHalvingDoubling);
      if (!e.empty()) return e;
    }
  }
  for (DType dt : {DType::kBF16, DType::kF16}) {
    std::string e = sixteenBit(g, 40001, dt);
    if (!e.empty()) return e;
  }
  if (auto e = integers(g, 20001); !e.empty()) return e;
  if (auto e = gatherScatterBroadcast(g, 10007); !e.empty()) return e;
  // Async: two ops in flight, completed out of order of waiting.
  std::vector<float> a(30011, 1.0f), b(70001, 2.0f);
  Handle ha = g.allreduceAsync(a.data(), a.size(), DType::kF32, ReduceOp::kSum);
  Handle hb = g.allreduceAsync(b.data(), b.size(), DType::kF32, ReduceOp::kSum);
  RANK_OK(hb.wait(core::Deadline::afterSeconds(30)));
  RANK_OK(ha.wait(core::Deadline::afterSeconds(30)));
  RANK_CHECK(a[30010] == static_cast<float>(n) && b[0] == 2.0f * static_cast<float>(n), "async results");
  return "";
}

std::string everything(const LocalRank& lr) { return everythingWith(lr, testing::testConfig()); }

class Collectives : public ::testing::TestWithParam<int> {};

TEST_P(Collectives, MatchFp64ReferenceAndAreBitIdentical) { runAll(GetParam(), everything, 120); }

INSTANTIATE_TEST_SUITE_P(Ranks, Collectives, ::testing::Values(2, 3, 4, 5, 6, 7, 8));

TEST(AllreduceChoice, ByMessageSizeAndGroupSize) {
  const CommOptions o;  // 256 KiB small, 1 MiB halving-doubling
  EXPECT_EQ(algo::autoAllreduceAlgo(4, 64 << 10, 4, o), AllreduceAlgo::kRecursiveDoubling);  // 256 KiB
  EXPECT_EQ(algo::autoAllreduceAlgo(6, 64 << 10, 4, o), AllreduceAlgo::kRecursiveDoubling);
  EXPECT_EQ(algo::autoAllreduceAlgo(4, (64 << 10) + 1, 4, o), AllreduceAlgo::kRing);
  EXPECT_EQ(algo::autoAllreduceAlgo(8, (64 << 10) + 1, 4, o), AllreduceAlgo::kHalvingDoubling);
  EXPECT_EQ(algo::autoAllreduceAlgo(16, 1 << 18, 4, o), AllreduceAlgo::kHalvingDoubling);  // 1 MiB
  EXPECT_EQ(algo::autoAllreduceAlgo(16, (1 << 18) + 1, 4, o), AllreduceAlgo::kRing);
  EXPECT_EQ(algo::autoAllreduceAlgo(12, 1 << 17, 4, o), AllreduceAlgo::kRing);  // not a power of two
}

// Every byte through TCP frames (no same-host copy), on loopback links
// without checksums (their default) and with checksums forced on.
TEST(CollectivesOverTcp, WithoutChecksums) {
  runAll(4, [](const LocalRank& lr) {
    CommConfig cfg = testing::testConfig();
    cfg.options.same_host_copy = false;
    cfg.options.ring_max_pieces = CommOptions{}.ring_max_pieces;
    return everythingWith(lr, cfg);
  }, 120);
}

TEST(CollectivesOverTcp, WithChecksums) {
  runAll(3, [](const LocalRank& lr) {
    CommConfig cfg = testing::testConfig();
    cfg.options.same_host_copy = false;
    cfg.options.checksum = "on";
    return everythingWith(lr, cfg);
  }, 120);
}

// A channel: a second group over the same ranks whose collectives are
// ordered apart from the first's. The ranks submit to the two groups in
// opposite orders; over one group the first ops would pair with each other.
TEST(Channels, TwoGroupsOverTheSameRanksKeepTheirOwnOrder) {
  runAll(3, [](const LocalRank& lr) -> std::string {
    auto cr = connectRank(lr, testing::testConfig(), core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    Group& world = *cr->world;
    auto second = world.subgroup({0, 1, 2}, "second");
    if (!second.isOk()) return second.status().toString();
    std::vector<float> a(5001, static_cast<float>(lr.rank + 1)), b(7001, 10.0f * static_cast<float>(lr.rank + 1));
    Handle ha, hb;
    if (lr.rank % 2 == 0) {
      hb = (*second)->allreduceAsync(b.data(), b.size(), DType::kF32, ReduceOp::kSum);
      ha = world.allreduceAsync(a.data(), a.size(), DType::kF32, ReduceOp::kSum);
    } else {
      ha = world.allreduceAsync(a.data(), a.size(), DType::kF32, ReduceOp::kSum);
      hb = (*second)->allreduceAsync(b.data(), b.size(), DType::kF32, ReduceOp::kSum);
    }
    RANK_OK(ha.wait(core::Deadline::afterSeconds(30)));
    RANK_OK(hb.wait(core::Deadline::afterSeconds(30)));
    RANK_CHECK(std::all_of(a.begin(), a.end(), [](float x) { return x == 6.0f; }), "world sum " << a[0]);
    RANK_CHECK(std::all_of(b.begin(), b.end(), [](float x) { return x == 60.0f; }), "channel sum " << b[0]);
    return "";
  }, 60);
}

// Hierarchical allreduce over uneven islands {0,0,1,1,1} and 3 islands
// {0,1,1,2,2,2}: intra reduce-scatter, cross allreduce, intra allgather.
std::string hierarchical(const LocalRank& lr, std::vector<int> islands) {
  CommConfig cfg = testing::testConfig();
  cfg.island_of_rank = islands;
  cfg.options.hier_chunk_bytes = 1 << 20;  // the 8.4 MB case runs as 9 chunks through a window of 4
  auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(20));
  if (!cr.isOk()) return cr.status().toString();
  Group& g = *cr->world;
  const int n = g.size();
  // 2.1M elements (8.4 MB) run as a pipeline of overlapped chunks.
  for (size_t count : {size_t{3}, size_t{100003}, size_t{2100001}}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
      if (count > 1000000 && op == ReduceOp::kAvg) continue;
      std::vector<float> x(count);
      for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(inputValue(g.rank(), i));
      RANK_OK(g.hierarchicalAllreduce(x.data(), count, DType::kF32, op));
      for (size_t i = 0; i < count; ++i) {
        double ref = 0;
        for (int r = 0; r < n; ++r) ref += static_cast<float>(inputValue(r, i));
        if (op == ReduceOp::kAvg) ref /= n;
        RANK_CHECK(std::abs(x[i] - ref) <= 1e-5 * n, "hierarchical i=" << i << " got " << x[i] << " want " << ref);
      }
      if (auto e = checkBitIdentical(g, x.data(), count * 4); !e.empty()) return e;
    }
  }
  // int8 on the cross-island leg: bounded error, bit-identical everywhere.
  const size_t count = 65537;
  std::vector<float> x(count);
  for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(inputValue(g.rank(), i));
  OpOptions o;
  o.codec = CodecKind::kInt8;
  RANK_OK(g.hierarchicalAllreduce(x.data(), count, DType::kF32, ReduceOp::kSum, o));
  double max_err = 0;
  for (size_t i = 0; i < count; ++i) {
    double ref = 0;
    for (int r = 0; r < n; ++r) ref += static_cast<float>(inputValue(r, i));
    max_err = std::max(max_err, std::abs(x[i] - ref));
  }
  // int8 with per-block absmax scales: each of the few encodes of values
  // <= n in magnitude errs by <= scale/2 = n/254.
  RANK_CHECK(max_err <= 4.0 * n / 254.0, "int8 hierarchical max error " << max_err);
  RANK_CHECK(max_err > 0, "int8 codec was not applied");
  if (auto e = checkBitIdentical(g, x.data(), count * 4); !e.empty()) return e;
  // Island and cross-island subgroups (DiLoCo's two groups).
  auto island = g.islandGroup();
  auto cross = g.crossIslandGroup();
  if (!island.isOk()) return island.status().toString();
  if (!cross.isOk()) return cross.status().toString();
  float v = 1.0f;
  RANK_OK((*island)->allreduce(&v, 1, DType::kF32, ReduceOp::kSum));
  int same = static_cast<int>(std::count(islands.begin(), islands.end(), islands[static_cast<size_t>(g.rank())]));
  RANK_CHECK(v == static_cast<float>(same), "island group size " << v << " vs " << same);
  float w = 1.0f;
  RANK_OK((*cross)->allreduce(&w, 1, DType::kF32, ReduceOp::kSum));
  RANK_CHECK(w == static_cast<float>((*cross)->size()), "cross-island group");
  return "";
}

TEST(Hierarchical, UnevenTwoIslands) {
  runAll(5, [](const LocalRank& lr) { return hierarchical(lr, {0, 0, 1, 1, 1}); }, 120);
}

TEST(Hierarchical, ThreeIslands) {
  runAll(6, [](const LocalRank& lr) { return hierarchical(lr, {0, 1, 1, 2, 2, 2}); }, 120);
}

}  // namespace
}  // namespace archipelago::comm
