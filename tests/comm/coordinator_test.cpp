// The coordinator's membership state machine (MembershipTable), driven with
// explicit times and no sockets: registration, heartbeat loss, epoch bumps,
// joins, simultaneous failures and a failure while the survivors are still
// entering the previous epoch. The server test at the end checks the same
// rules through the real protocol (127.0.0.1, port 0).
#include <atomic>
#include <thread>

#include <gtest/gtest.h>

#include "archipelago/comm/coordinator.h"
#include "comm_test_util.h"

namespace archipelago::comm {
namespace {

using testing::kSec;

MembershipTable threeRanks(double timeout_s = 2.0) {
  MembershipTable t(timeout_s);
  for (int r = 0; r < 3; ++r) t.registerRank(r, r < 2 ? 0 : 1, "h:" + std::to_string(r), 100 + r, 0);
  return t;
}

TEST(MembershipTable, RegistrationDoesNotChangeTheEpoch) {
  MembershipTable t(2.0);
  EXPECT_EQ(t.registerRank(1, 0, "h:1", 11, 0), 0u);
  EXPECT_EQ(t.registerRank(0, 0, "h:0", 10, 0), 0u);
  EXPECT_EQ(t.registered(), 2);
  auto m = t.snapshot();
  EXPECT_EQ(m.epoch, 0u);
  EXPECT_EQ(m.addresses, (std::vector<std::string>{"h:0", "h:1"}));
  EXPECT_EQ(m.pids, (std::vector<int64_t>{10, 11}));
  EXPECT_EQ(m.alive, (std::vector<int>{0, 1}));
  EXPECT_TRUE(m.failed.empty());
  EXPECT_TRUE(t.events().empty());
}

TEST(MembershipTable, HeartbeatLossFailsOnlyTheSilentRankOnce) {
  auto t = threeRanks(2.0);
  t.heartbeat(0, 2 * kSec);
  t.heartbeat(2, 2 * kSec);
  EXPECT_TRUE(t.expire(2 * kSec).empty());  // silent for exactly the bound: not yet
  EXPECT_EQ(t.epoch(), 0u);
  MembershipTable u = threeRanks(2.0);
  u.heartbeat(0, 2 * kSec);
  u.heartbeat(2, 2 * kSec);
  EXPECT_EQ(u.expire(static_cast<int64_t>(2.5 * kSec)), (std::vector<int>{1}));
  EXPECT_TRUE(u.expire(static_cast<int64_t>(2.6 * kSec)).empty());  // not failed twice
  EXPECT_EQ(u.epoch(), 1u);
  EXPECT_EQ(u.snapshot().alive, (std::vector<int>{0, 2}));
  EXPECT_EQ(u.snapshot().failed, (std::vector<int>{1}));
  ASSERT_EQ(u.events().size(), 1u);
  EXPECT_EQ(u.events()[0].kind, "failure");
  EXPECT_EQ(u.events()[0].rank, 1);
}

TEST(MembershipTable, ALeftRankIsNotWatched) {
  auto t = threeRanks(2.0);
  t.leave(2);
  t.heartbeat(0, 5 * kSec);
  t.heartbeat(1, 5 * kSec);
  EXPECT_TRUE(t.expire(5 * kSec).empty());
  EXPECT_EQ(t.epoch(), 0u);
}

TEST(MembershipTable, ReportsBumpTheEpochOncePerDeath) {
  auto t = threeRanks();
  EXPECT_TRUE(t.reportFailure(2, 0, 0, "lost rank 2", 0));
  EXPECT_FALSE(t.reportFailure(2, 0, 1, "lost rank 2", 0));  // second survivor, same death
  EXPECT_FALSE(t.reportFailure(2, 1, 1, "", 0));             // already dead
  EXPECT_FALSE(t.reportFailure(0, 0, 1, "", 0));             // names an epoch that is over
  EXPECT_EQ(t.epoch(), 1u);
  EXPECT_EQ(t.snapshot().alive, (std::vector<int>{0, 1}));
  // A transient fault: new epoch, same members.
  EXPECT_TRUE(t.reportFailure(-1, 1, 0, "corrupt frame", 0));
  EXPECT_EQ(t.epoch(), 2u);
  EXPECT_EQ(t.snapshot().alive, (std::vector<int>{0, 1}));
  EXPECT_EQ(t.events().back().kind, "transient");
}

TEST(MembershipTable, TwoFailuresAtOnceEndInOneMembership) {
  MembershipTable t(2.0);
  for (int r = 0; r < 4; ++r) t.registerRank(r, 0, "h:" + std::to_string(r), 0, 0);
  t.heartbeat(0, 3 * kSec);
  t.heartbeat(3, 3 * kSec);
  // Ranks 1 and 2 die together: one expiry pass fails both (one bump each).
  EXPECT_EQ(t.expire(3 * kSec), (std::vector<int>{1, 2}));
  EXPECT_EQ(t.epoch(), 2u);
  // Survivors reporting either death against the epoch they saw change nothing more.
  EXPECT_FALSE(t.reportFailure(1, 0, 0, "", 0));
  EXPECT_FALSE(t.reportFailure(2, 1, 3, "", 0));
  auto m = t.snapshot();
  EXPECT_EQ(m.alive, (std::vector<int>{0, 3}));
  EXPECT_EQ(m.failed, (std::vector<int>{1, 2}));
  // Both survivors enter the newest epoch; the barrier opens.
  EXPECT_FALSE(t.allEntered());
  t.enter(0, 2);
  EXPECT_FALSE(t.allEntered());
  t.enter(3, 2);
  EXPECT_TRUE(t.allEntered());
}

TEST(MembershipTable, FailureDuringRecoveryMovesEveryoneOn) {
  auto t = threeRanks();
  ASSERT_TRUE(t.reportFailure(2, 0, 0, "", 0));  // epoch 1 = {0, 1}
  t.enter(0, 1);                                 // rank 0 is rebuilding epoch 1 ...
  EXPECT_FALSE(t.allEntered());
  // ... when rank 1 dies before entering: the report names epoch 1 and bumps again.
  EXPECT_TRUE(t.reportFailure(1, 1, 0, "rebuild of epoch 1 failed", 0));
  EXPECT_EQ(t.epoch(), 2u);
  EXPECT_FALSE(t.allEntered());  // rank 0 entered 1, not 2
  t.enter(0, 1);                 // a late enter of the old epoch does not count
  EXPECT_FALSE(t.allEntered());
  t.enter(0, 2);
  EXPECT_TRUE(t.allEntered());
  EXPECT_EQ(t.snapshot().alive, (std::vector<int>{0}));
}

TEST(MembershipTable, JoinDuringAStepTakesAFailedSlotAndBumpsTheEpoch) {
  auto t = threeRanks();
  // No free slot while everyone is alive.
  EXPECT_EQ(t.join(-1, -1, "h:new", 7, 0).status().code(), core::StatusCode::kFailedPrecondition);
  EXPECT_EQ(t.join(9, -1, "h:new", 7, 0).status().code(), core::StatusCode::kInvalidArgument);
  ASSERT_TRUE(t.reportFailure(1, 0, 0, "", 0));
  // Survivors are mid-step in epoch 1 (they entered it); a replacement joins.
  t.enter(0, 1);
  t.enter(2, 1);
  ASSERT_TRUE(t.allEntered());
  auto r = t.join(-1, -1, "h:1b", 77, 5 * kSec);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  EXPECT_EQ(*r, 1);
  EXPECT_EQ(t.epoch(), 2u);
  auto m = t.snapshot();
  EXPECT_EQ(m.alive, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(m.addresses[1], "h:1b");
  EXPECT_EQ(m.islands[1], 0);  // the slot's island when the joiner does not say
  EXPECT_EQ(m.pids[1], 77);
  EXPECT_EQ(t.events().back().kind, "join");
  // The survivors finish their step and enter the join epoch with the joiner.
  t.enter(1, 2);
  EXPECT_FALSE(t.allEntered());
  t.enter(0, 2);
  t.enter(2, 2);
  EXPECT_TRUE(t.allEntered());
  // The joiner is watched from its registration on.
  t.heartbeat(0, 6 * kSec);
  t.heartbeat(2, 6 * kSec);
  EXPECT_TRUE(t.expire(6 * kSec).empty());
  EXPECT_EQ(t.expire(8 * kSec), (std::vector<int>{1}));
}

TEST(MembershipTable, JoinOfAnAliveSlotReplacesItInOneBump) {
  auto t = threeRanks();
  auto r = t.join(2, 1, "h:2b", 55, 0);  // a restarted process before its predecessor was detected
  ASSERT_TRUE(r.isOk());
  EXPECT_EQ(t.epoch(), 1u);
  EXPECT_EQ(t.snapshot().addresses[2], "h:2b");
  EXPECT_EQ(t.snapshot().alive, (std::vector<int>{0, 1, 2}));
}

TEST(MembershipTable, ReRegistrationOfAFailedRankIsAJoin) {
  auto t = threeRanks();
  ASSERT_TRUE(t.reportFailure(0, 0, 1, "", 0));
  EXPECT_EQ(t.registerRank(0, 0, "h:0b", 5, 0), 2u);
  EXPECT_EQ(t.events().back().kind, "join");
}

TEST(MembershipTable, ARaisedTimeoutIsTheOneInForceAndNeverLowered) {
  auto t = threeRanks(0);  // none: only reports end a rank
  EXPECT_TRUE(t.expire(100 * kSec).empty());
  t.raiseTimeout(3.0);
  t.raiseTimeout(1.0);  // a shorter one announced later changes nothing
  EXPECT_EQ(t.timeout(), 3.0);
  for (int r = 0; r < 3; ++r) t.heartbeat(r, 100 * kSec);
  EXPECT_TRUE(t.expire(static_cast<int64_t>(102.5 * kSec)).empty());
  t.heartbeat(0, 102 * kSec);
  t.heartbeat(2, 102 * kSec);
  EXPECT_EQ(t.expire(static_cast<int64_t>(103.5 * kSec)), (std::vector<int>{1}));
}

// A standalone coordinator (no timeout of its own) takes the one its
// workers announce: a silent rank is then failed, which with no timeout at
// all would never happen.
TEST(Coordinator, AStandaloneCoordinatorTakesTheFailureTimeoutItsWorkersAnnounce) {
  CoordinatorOptions o;
  o.adopt_worker_timeout = true;
  CoordinatorServer server("sm-secret", o);
  ASSERT_TRUE(server.start().isOk());
  auto dl = core::Deadline::afterSeconds(10);
  auto c0 = CoordinatorClient::connect(server.address(), "sm-secret", 0, dl).value();
  auto c1 = CoordinatorClient::connect(server.address(), "sm-secret", 1, dl).value();
  c0->announceFailureTimeout(0.5);
  c1->announceFailureTimeout(0.5);
  ASSERT_TRUE(c0->registerRank(0, 0, "h:0", dl).isOk());
  ASSERT_TRUE(c1->registerRank(1, 0, "h:1", dl).isOk());
  c0->startHeartbeats(0.05);
  const auto t0 = core::Clock::now();
  while (server.membership().epoch == 0 && core::secondsSince(t0) < 30) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(server.membership().epoch, 1u);
  EXPECT_EQ(server.membership().failed, (std::vector<int>{1}));
  server.stop();
}

TEST(Coordinator, BarrierAndJoinThroughTheServer) {
  CoordinatorOptions o;
  o.heartbeat_timeout_s = 1.0;
  CoordinatorServer server("sm-secret", o);
  ASSERT_TRUE(server.start().isOk());
  auto dl = core::Deadline::afterSeconds(10);
  auto c0 = CoordinatorClient::connect(server.address(), "sm-secret", 0, dl).value();
  auto c1 = CoordinatorClient::connect(server.address(), "sm-secret", 1, dl).value();
  ASSERT_TRUE(c0->registerRank(0, 0, "h:0", dl).isOk());
  ASSERT_TRUE(c1->registerRank(1, 0, "h:1", dl).isOk());
  c0->startHeartbeats(0.1);
  // Rank 1 never heartbeats: declared failed (how fast is a benchmark's
  // question; here only that it happens while rank 0, which heartbeats, is kept).
  auto waitUntil = [](auto cond) {
    const auto t0 = core::Clock::now();
    while (!cond() && core::secondsSince(t0) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return cond();
  };
  ASSERT_TRUE(waitUntil([&] { return server.membership().epoch >= 1; }));
  EXPECT_EQ(server.membership().epoch, 1u);
  EXPECT_EQ(server.membership().alive, (std::vector<int>{0}));
  // Rank 0 sees the new epoch through its heartbeat replies.
  ASSERT_TRUE(waitUntil([&] { return c0->latestEpoch() >= 1; }));
  EXPECT_EQ(c0->latestEpoch(), 1u);
  // A joiner takes the failed slot; the barrier of the join epoch waits for both.
  auto j = CoordinatorClient::connect(server.address(), "sm-secret", -1, dl).value();
  auto joined = j->join(-1, -1, "h:1b", dl);
  ASSERT_TRUE(joined.isOk()) << joined.status().toString();
  EXPECT_EQ(joined->rank, 1);
  EXPECT_EQ(joined->epoch, 2u);
  j->startHeartbeats(0.1);
  std::atomic<bool> joiner_entering{false}, joiner_done{false};
  std::thread joiner([&] {
    joiner_entering = true;
    auto m = j->enterEpoch(2, core::Deadline::afterSeconds(30));
    joiner_done = true;
    EXPECT_TRUE(m.isOk() && m->epoch == 2u && m->alive == (std::vector<int>{0, 1}));
  });
  ASSERT_TRUE(waitUntil([&] { return joiner_entering.load(); }));
  EXPECT_FALSE(joiner_done.load()) << "the join epoch's barrier let the joiner through alone";
  auto m = c0->enterEpoch(2, core::Deadline::afterSeconds(30));
  joiner.join();
  ASSERT_TRUE(m.isOk()) << m.status().toString();
  EXPECT_EQ(m->epoch, 2u);
  EXPECT_EQ(m->addresses[1], "h:1b");
  auto ev = server.events();
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].kind, "failure");
  EXPECT_EQ(ev[1].kind, "join");
  server.stop();
}

}  // namespace
}  // namespace archipelago::comm
