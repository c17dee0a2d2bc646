// Multi-process tests of epoch-wide behaviour: a lost peer aborts every
// group of the epoch (world, island, cross-island and ad-hoc subgroups) on
// every survivor; one emulated strait is shared by all flows between two
// islands; the pipelined hierarchical allreduce over an emulated strait
// matches an fp64 reference and is bit-identical on every rank.
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <thread>

#include "archipelago/comm/communicator.h"
#include "comm/endpoint.h"
#include "comm_test_util.h"

namespace archipelago::comm {
namespace {

using testing::inputValue;
using testing::runAll;

// Two islands {0,1} and {2,3}, optionally joined by an emulated strait.
CommConfig twoIslands(double bandwidth, double latency, const std::string& secret) {
  CommConfig cfg = testing::testConfig();
  cfg.island_of_rank = {0, 0, 1, 1};
  core::StraitSpec& s = testing::twoIslandCluster(cfg.cluster, "north", "south");
  s.bandwidth = bandwidth;
  s.latency = latency;
  if (bandwidth <= 0) cfg.cluster.straits.clear();
  cfg.secret = secret;  // the shaper's shared timeline is per job secret
  return cfg;
}

// Rank 3 is SIGKILLed while every survivor has an operation waiting in each
// of its groups, including groups that do not contain rank 3 (island {0,1},
// cross-island {0,2}, subgroup {0,1,2}) and whose peers are alive: every one
// of those waits must end with the typed error from the lost connections, not at its
// own 30 s deadline (the bound is loose: bench comm --ops failure times it),
// and later ops of any group of the epoch fail fast.
TEST(Fault, LostPeerAbortsEveryGroupOfTheEpochOnEverySurvivor) {
  SharedBlock* shared = nullptr;
  std::vector<RankOutcome> out;
  runAll(4, [](const LocalRank& lr) -> std::string {
    CommConfig cfg = twoIslands(0, 0, lr.secret);
    cfg.options.heartbeat_timeout_s = 5;
    auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    Group& world = *cr->world;
    auto island = world.islandGroup();
    auto cross = world.crossIslandGroup();
    if (!island.isOk()) return island.status().toString();
    if (!cross.isOk()) return cross.status().toString();
    std::shared_ptr<Group> sub;
    if (lr.rank != 3) {
      auto s = world.subgroup({0, 1, 2});
      if (!s.isOk()) return s.status().toString();
      sub = *s;
    }
    RANK_OK(world.barrier(OpOptions::within(10)));
    if (lr.rank == 3) {
      // Dies once every survivor has started its waits (whether a wait is
      // already blocked or not, the failure must end it).
      RANK_CHECK(testing::awaitSlot(lr.shared->slot[1], 3), "the survivors never started waiting");
      lr.shared->slot[0].store(core::nowMicros());
      ::raise(SIGKILL);
    }
    // Waits that only the epoch failure can end: receives of messages that
    // live peers never send (in groups without rank 3), and a world
    // allreduce that rank 3 never joins.
    struct Wait {
      const char* group;
      core::Status st;
      double after_s = -1;
    };
    std::vector<Wait> waits;
    waits.push_back({"world", {}, -1});
    waits.push_back({"island", {}, -1});
    waits.push_back({"cross", {}, -1});
    if (sub) waits.push_back({"subgroup", {}, -1});
    std::vector<std::thread> threads;
    float buf[4] = {0, 0, 0, 0};
    float r_island = 0, r_cross = 0, r_sub = 0;
    auto finish = [&](Wait& w, core::Status st) {
      w.st = st;
      w.after_s = static_cast<double>(core::nowMicros() - lr.shared->slot[0].load()) / 1e6;
    };
    threads.emplace_back([&] {
      finish(waits[0], world.allreduce(buf, 4, DType::kF32, ReduceOp::kSum, OpOptions::within(30)));
    });
    threads.emplace_back([&] {
      Group& g = **island;
      finish(waits[1], g.recv(&r_island, 1, DType::kF32, 1 - g.rank(), 7, OpOptions::within(30)));
    });
    threads.emplace_back([&] {
      Group& g = **cross;
      finish(waits[2], g.recv(&r_cross, 1, DType::kF32, 1 - g.rank(), 8, OpOptions::within(30)));
    });
    if (sub) {
      threads.emplace_back([&] {
        finish(waits[3], sub->recv(&r_sub, 1, DType::kF32, (sub->rank() + 1) % 3, 9, OpOptions::within(30)));
      });
    }
    lr.shared->slot[1].fetch_add(1);
    for (auto& t : threads) t.join();
    for (const Wait& w : waits) {
      RANK_CHECK(w.st.code() == core::StatusCode::kUnavailable,
                 "rank " << lr.rank << " " << w.group << ": expected UNAVAILABLE, got " << w.st.toString());
      RANK_CHECK(w.st.message().find("rank 3") != std::string::npos,
                 w.group << ": the error does not name the lost rank: " << w.st.toString());
      // From the lost connections, not the 5 s heartbeat or the 30 s deadline.
      RANK_CHECK(w.after_s < 4.0, w.group << " surfaced the failure " << w.after_s << " s after the SIGKILL");
    }
    // Sticky for every group of the epoch: new ops fail at once.
    for (Group* g : {&world, island->get(), cross->get(), sub.get()}) {
      if (!g) continue;
      auto t0 = core::Clock::now();
      core::Status st = g->barrier(OpOptions::within(30));
      RANK_CHECK(st.code() == core::StatusCode::kUnavailable && core::secondsSince(t0) < 4.0,
                 "a later op of a group of the failed epoch: " << st.toString());
    }
    return "";
  }, 60, {3}, &out, &shared);
  EXPECT_EQ(out[3].signal, SIGKILL);
}

// Both cross-island pairs (0->2 and 1->3) send at once across one emulated
// 40 MB/s strait: together they get 40 MB/s, not 40 MB/s each (the strait's
// timeline is shared by every process that crosses it in that direction).
TEST(LinkEmulation, OneStraitIsSharedByAllFlowsBetweenTwoIslands) {
  runAll(4, [](const LocalRank& lr) -> std::string {
    const double bw = 40e6, lat = 0.01;
    CommConfig cfg = twoIslands(bw, lat, "share-" + std::to_string(::getppid()));
    auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    Group& g = *cr->world;
    const size_t bytes = 3000000;
    std::vector<uint8_t> data(bytes, static_cast<uint8_t>(lr.rank));
    RANK_OK(g.barrier(OpOptions::within(10)));
    lr.shared->slot[10 + lr.rank].store(core::nowMicros());
    if (lr.rank < 2) {
      RANK_OK(g.send(data.data(), bytes, DType::kU8, lr.rank + 2, 1, OpOptions::within(20)));
    } else {
      RANK_OK(g.recv(data.data(), bytes, DType::kU8, lr.rank - 2, 1, OpOptions::within(20)));
      RANK_CHECK(data[bytes - 1] == lr.rank - 2, "payload");
      lr.shared->slot[20 + lr.rank].store(core::nowMicros());
    }
    RANK_OK(g.barrier(OpOptions::within(10)));
    if (lr.rank == 0) {
      int64_t start = std::min(lr.shared->slot[10].load(), lr.shared->slot[11].load());
      int64_t end = std::max(lr.shared->slot[22].load(), lr.shared->slot[23].load());
      double took = static_cast<double>(end - start) / 1e6;
      double shared_link = 2.0 * bytes / bw + lat;  // one strait for both flows
      double separate_links = 1.0 * bytes / bw + lat;
      RANK_CHECK(took >= 0.9 * shared_link && took < 1.6 * shared_link * testing::kTimeSlack,
                 "two flows of " << bytes << " B took " << took << " s; one shared strait: " << shared_link
                                 << " s, a strait per flow would be " << separate_links << " s");
    }
    return "";
  }, 60);
}

// The chunked, windowed hierarchical allreduce across an emulated strait
// (many chunks, so the window and the in-order intra-island reduce-scatter
// are exercised) against an fp64 reference, bit-identical on every rank.
TEST(Hierarchical, PipelineOverEmulatedStraitMatchesFp64Reference) {
  runAll(4, [](const LocalRank& lr) -> std::string {
    CommConfig cfg = twoIslands(400e6, 0.005, "hier-" + std::to_string(::getppid()));
    cfg.options.hier_chunk_bytes = 128 << 10;
    cfg.options.hier_window = 3;
    auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    Group& g = *cr->world;
    const int n = g.size();
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kWeightedAvg}) {
      const size_t count = 700001;  // 2.8 MB: 22 chunks of ~128 KiB, not divisible by anything
      std::vector<float> x(count);
      for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(inputValue(g.rank(), i, 3));
      OpOptions o = OpOptions::within(30);
      o.weight = 1.0 + g.rank();
      RANK_OK(g.hierarchicalAllreduce(x.data(), count, DType::kF32, op, o));
      double wsum = 0;
      for (int r = 0; r < n; ++r) wsum += 1.0 + r;
      for (size_t i = 0; i < count; ++i) {
        double ref = 0;
        for (int r = 0; r < n; ++r) {
          double v = static_cast<float>(inputValue(r, i, 3));
          ref += op == ReduceOp::kWeightedAvg ? (1.0 + r) * v : v;
        }
        if (op == ReduceOp::kWeightedAvg) ref /= wsum;
        RANK_CHECK(std::abs(x[i] - ref) <= 1e-5 * n, reduceOpName(op) << " i=" << i << " got " << x[i] << " want " << ref);
      }
      uint64_t h = core::fnv1a64(std::string_view(reinterpret_cast<const char*>(x.data()), count * 4));
      std::vector<uint64_t> all(static_cast<size_t>(n));
      RANK_OK(g.allgather(&h, all.data(), 1, DType::kI64));
      for (auto v : all) RANK_CHECK(v == h, "hierarchical results differ across ranks");
    }
    RANK_CHECK(g.straitBytesSent() > 0, "rank " << lr.rank << ": nothing crossed the emulated strait");
    return "";
  }, 60);
}

// Over real sockets (127.0.0.1, port 0): a listener at epoch 3 refuses a
// peer dialing for epoch 2 (kFailedPrecondition, "stale epoch") and a peer
// with the wrong job secret (kPermissionDenied), and accepts the right one.
TEST(Handshake, StaleEpochAndWrongSecretAreRefusedOverTcp) {
  auto ep = Endpoint::listen("127.0.0.1", 1, "job-secret", [](PeerRole, int32_t) { return false; });
  ASSERT_TRUE(ep.isOk()) << ep.status().toString();
  (*ep)->setMinEpoch(3);
  const std::string addr = "127.0.0.1:" + std::to_string((*ep)->port());
  auto dl = [] { return core::Deadline::afterSeconds(5); };
  auto stale = dialPeer(addr, "job-secret", 0, 1, 2, 0, nullptr, dl(), nullptr);
  ASSERT_FALSE(stale.isOk());
  EXPECT_EQ(stale.status().code(), core::StatusCode::kFailedPrecondition) << stale.status().toString();
  auto wrong = dialPeer(addr, "not-the-secret", 0, 1, 3, 0, nullptr, dl(), nullptr);
  ASSERT_FALSE(wrong.isOk());
  EXPECT_EQ(wrong.status().code(), core::StatusCode::kPermissionDenied) << wrong.status().toString();
  auto good = dialPeer(addr, "job-secret", 0, 1, 3, 0, nullptr, dl(), nullptr);
  ASSERT_TRUE(good.isOk()) << good.status().toString();
  auto taken = (*ep)->take(3, 0, 0, dl(), nullptr);
  ASSERT_TRUE(taken.isOk()) << taken.status().toString();
  // The two streams are connected: bytes written on one arrive on the other.
  const char msg[] = "epoch 3";
  ASSERT_TRUE((*good)->writeFull(msg, sizeof(msg), dl(), nullptr).isOk());
  char got[sizeof(msg)] = {};
  ASSERT_TRUE((*taken)->readFull(got, sizeof(got), dl(), nullptr).isOk());
  EXPECT_STREQ(got, msg);
}

}  // namespace
}  // namespace archipelago::comm
