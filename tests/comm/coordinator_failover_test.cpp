// Coordinator failover (coordinator.h "Failover"). The table tests drive the
// recovery rules with explicit times and no sockets; the process tests run
// ranks with the coordinator in a process of its own, kill -9 it in the
// middle of collectives and start a new one on the same port: the data plane
// goes on without it, the new coordinator rebuilds the membership from the
// workers' reattaches (same epoch, never a lower one), and the members carry
// on into a later epoch through it, also when a rank died while there was
// no coordinator at all.
#include <signal.h>
#include <unistd.h>

#include <thread>

#include <gtest/gtest.h>

#include "archipelago/comm/coordinator.h"
#include "comm_test_util.h"

namespace archipelago::comm {
namespace {

using testing::kSec;

// A table of three ranks moved to `epoch` by transient faults; its snapshot is every worker's view.
MembershipTable atEpoch(uint32_t epoch) {
  MembershipTable t(2.0);
  for (int r = 0; r < 3; ++r) t.registerRank(r, 0, "h:" + std::to_string(r), 100 + r, 0);
  while (t.epoch() < epoch) t.reportFailure(-1, t.epoch(), 0, "test", 0);
  return t;
}

Reattach reattachOf(const Membership& view, int rank, uint32_t seen, int64_t pid = 0) {
  Reattach r;
  r.rank = rank;
  r.island = 0;
  r.address = view.addresses[static_cast<size_t>(rank)];
  r.pid = pid ? pid : view.pids[static_cast<size_t>(rank)];
  r.seen = seen;
  r.has_view = true;
  r.view = view;
  return r;
}

TEST(CoordinatorFailover, RestartedTableTakesTheWorkersViewUnchanged) {
  const Membership view = atEpoch(3).snapshot();
  MembershipTable fresh(2.0);
  fresh.reattach(reattachOf(view, 1, 3), 10 * kSec);
  EXPECT_TRUE(fresh.recovering());
  fresh.reattach(reattachOf(view, 0, 3), 10 * kSec);
  EXPECT_TRUE(fresh.recovering());
  fresh.reattach(reattachOf(view, 2, 3), 10 * kSec);
  // Every alive rank of the view is back and nobody saw a newer epoch: no change, no bump.
  EXPECT_FALSE(fresh.recovering());
  const Membership m = fresh.snapshot();
  EXPECT_EQ(m.epoch, 3u);
  EXPECT_EQ(m.alive, view.alive);
  EXPECT_EQ(m.addresses, view.addresses);
  EXPECT_TRUE(fresh.allEntered());  // they hold epoch 3's transport already
  EXPECT_TRUE(fresh.events().empty());
}

TEST(CoordinatorFailover, AnEpochAWorkerHasSeenIsNeverHandedOutAgain) {
  const Membership view = atEpoch(3).snapshot();
  MembershipTable fresh(2.0);
  // Rank 2 heard of epoch 4 (published just before the crash), which nobody entered.
  fresh.reattach(reattachOf(view, 0, 3), 0);
  fresh.reattach(reattachOf(view, 1, 3), 0);
  fresh.reattach(reattachOf(view, 2, 4), 0);
  EXPECT_TRUE(fresh.recovering());  // incomplete: epoch 4's membership is unknown
  EXPECT_FALSE(fresh.settleRecovery(1 * kSec));
  EXPECT_TRUE(fresh.settleRecovery(2 * kSec + 1));
  EXPECT_EQ(fresh.epoch(), 5u);
  EXPECT_EQ(fresh.snapshot().alive, (std::vector<int>{0, 1, 2}));
  ASSERT_EQ(fresh.events().size(), 1u);
  EXPECT_EQ(fresh.events()[0].kind, "recovery");
  EXPECT_FALSE(fresh.allEntered());  // everyone meets in epoch 5's barrier
}

TEST(CoordinatorFailover, AnOlderViewNeverReplacesANewerOne) {
  MembershipTable old_table = atEpoch(2);
  const Membership older = old_table.snapshot();
  old_table.reportFailure(2, 2, 0, "rank 2 died", 0);  // epoch 3 without rank 2
  const Membership newer = old_table.snapshot();
  MembershipTable fresh(2.0);
  // Rank 1's barrier reply of epoch 3 was lost with the coordinator: it still holds epoch 2's view.
  fresh.reattach(reattachOf(older, 1, 3), 0);
  EXPECT_TRUE(fresh.recovering());  // epoch 2's view names rank 2, which has not come back
  fresh.reattach(reattachOf(newer, 0, 3), 0);
  fresh.reattach(reattachOf(older, 1, 3), 0);  // again, later: still the older view
  EXPECT_FALSE(fresh.recovering());  // epoch 3's members (0, 1) are both back
  const Membership m = fresh.snapshot();
  EXPECT_EQ(m.epoch, 3u);
  EXPECT_EQ(m.alive, (std::vector<int>{0, 1}));
  EXPECT_EQ(m.failed, (std::vector<int>{2}));
  EXPECT_FALSE(fresh.allEntered());  // rank 1 enters epoch 3 again through the restarted coordinator
  fresh.enter(1, 3);
  EXPECT_TRUE(fresh.allEntered());
}

TEST(CoordinatorFailover, RankSilentThroughTheWindowIsFailed) {
  const Membership view = atEpoch(1).snapshot();
  MembershipTable fresh(2.0);
  fresh.reattach(reattachOf(view, 0, 1), 0);
  fresh.reattach(reattachOf(view, 2, 1), 0);
  EXPECT_FALSE(fresh.settleRecovery(1 * kSec));
  EXPECT_TRUE(fresh.settleRecovery(2 * kSec + 1));
  const Membership m = fresh.snapshot();
  EXPECT_EQ(m.epoch, 2u);
  EXPECT_EQ(m.alive, (std::vector<int>{0, 2}));
  EXPECT_EQ(m.failed, (std::vector<int>{1}));
  // A later process claiming rank 1's slot under another pid is not revived by reattaching.
  fresh.reattach(reattachOf(view, 1, 1, 999), 3 * kSec);
  EXPECT_EQ(fresh.state(1), MembershipTable::State::kFailed);
}

TEST(CoordinatorFailover, AReattachToALiveTableIsAHeartbeat) {
  MembershipTable t = atEpoch(2);
  const Membership view = t.snapshot();
  t.reattach(reattachOf(view, 0, 2), 1 * kSec);
  EXPECT_FALSE(t.recovering());
  EXPECT_EQ(t.epoch(), 2u);
  EXPECT_EQ(t.events().size(), 2u);  // the two transient bumps of atEpoch only
}

// A standby: workers given "A,B" move to B when A is gone, and B, empty,
// takes its table from their reattaches (same epoch, same members).
TEST(CoordinatorFailover, StandbyInTheAddressListTakesOver) {
  CoordinatorOptions o;
  o.heartbeat_timeout_s = 2.0;
  auto a = std::make_unique<CoordinatorServer>("sb-secret", o);
  CoordinatorServer b("sb-secret", o);
  ASSERT_TRUE(a->start().isOk());
  ASSERT_TRUE(b.start().isOk());
  const std::string list = a->address() + "," + b.address();
  const auto dl = core::Deadline::afterSeconds(20);
  auto c0 = CoordinatorClient::connect(list, "sb-secret", 0, dl).value();
  auto c1 = CoordinatorClient::connect(list, "sb-secret", 1, dl).value();
  ASSERT_TRUE(c0->registerRank(0, 0, "h:0", dl).isOk());
  ASSERT_TRUE(c1->registerRank(1, 0, "h:1", dl).isOk());
  std::thread t1([&] { EXPECT_TRUE(c1->waitForMembers(2, dl).isOk()); });
  ASSERT_TRUE(c0->waitForMembers(2, dl).isOk());
  t1.join();
  EXPECT_TRUE(b.membership().alive.empty());  // the standby knows nothing yet
  a->stop();
  a.reset();
  c1->startHeartbeats(0.1);  // rank 1 reattaches to B from its heartbeat thread
  auto m = c0->membership(dl);  // rank 0 from its next request
  while (!m.isOk() && m.status().code() == core::StatusCode::kUnavailable && !dl.expired()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    m = c0->membership(dl);
  }
  ASSERT_TRUE(m.isOk()) << m.status().toString();
  EXPECT_EQ(m->epoch, 0u);
  EXPECT_EQ(m->alive, (std::vector<int>{0, 1}));
  EXPECT_EQ(m->addresses, (std::vector<std::string>{"h:0", "h:1"}));
  EXPECT_GE(c0->reconnects(), 1);
  b.stop();
}

// ---- processes --------------------------------------------------------------------

using testing::runAll;

// Shared slots of the process tests.
enum Slot { kKillNow = 0, kKilled = 1, kReady = 2, kRestarted = 3, kOutageUs = 4, kBackUs = 5, kPastBarrier = 6 };

// The parent's side: kill -9 the coordinator when asked, restart it on the same port once `ready` ranks are.
// heartbeat_timeout_s: also the restarted coordinator's recovery window.
LocalLaunchOptions failoverLaunch(int world, int ready, double heartbeat_timeout_s) {
  LocalLaunchOptions o;
  o.world = world;
  o.timeout_s = 90;
  o.coordinator_process = true;
  o.coordinator.heartbeat_timeout_s = heartbeat_timeout_s;
  o.on_poll = [ready](LocalCoordinator& c, SharedBlock& sh) {
    if (sh.slot[kKillNow].load() == 1 && sh.slot[kKilled].load() == 0) {
      c.kill();
      sh.slot[kOutageUs].store(core::nowMicros());
      sh.slot[kKilled].store(1);
    }
    if (sh.slot[kKilled].load() == 1 && sh.slot[kReady].load() >= ready && sh.slot[kRestarted].load() == 0) {
      const core::Status st = c.start();
      sh.slot[kRestarted].store(st.isOk() ? 1 : 2);
    }
  };
  return o;
}

void runWithFailover(const LocalLaunchOptions& o, const LocalRankFn& fn) {
  auto r = launchLocal(o, fn);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  for (int i = 0; i < o.world; ++i) {
    if (o.expendable.count(i)) continue;
    EXPECT_EQ((*r)[static_cast<size_t>(i)].message, "") << "rank " << i;
  }
}

core::Status allreduceCheck(Group& g, int iteration) {
  std::vector<float> v(1024);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(g.ranks()[static_cast<size_t>(g.rank())] + 1 + iteration);
  ARCH_RETURN_IF_ERROR(g.allreduce(v.data(), v.size(), DType::kF32, ReduceOp::kSum, OpOptions::within(20)));
  float want = 0;
  for (int r : g.ranks()) want += static_cast<float>(r + 1 + iteration);
  if (v[0] != want || v.back() != want) return core::internalError("allreduce sum " + std::to_string(v[0]));
  return core::okStatus();
}

// Waits on the shared flag (events, not clocks; the fixture's timeout bounds it).
void waitFor(SharedBlock& sh, int slot, int64_t value) {
  while (sh.slot[slot].load() < value) ::usleep(1000);
}

// Membership from the restarted coordinator once it has rebuilt it.
core::Result<Membership> membershipAfterRestart(CoordinatorClient& c, uint32_t newer_than_or_equal) {
  while (true) {
    auto m = c.membership(core::Deadline::afterSeconds(10));
    if (m.isOk() && m->epoch >= newer_than_or_equal) return m;
    if (!m.isOk() && m.status().code() != core::StatusCode::kUnavailable) return m.status();
    ::usleep(20000);
  }
}

// Next epoch after a failure: report, wait for it, enter, rebuild the transport.
core::Result<std::shared_ptr<Group>> nextEpoch(ConnectedRank& cr, uint32_t from, int failed) {
  (void)cr.client->reportFailure(failed, from, core::Deadline::afterSeconds(5), "test");
  ARCH_ASSIGN_OR_RETURN(Membership m, membershipAfterRestart(*cr.client, from + 1));
  ARCH_ASSIGN_OR_RETURN(Membership e, cr.client->enterEpoch(m.epoch, core::Deadline::afterSeconds(20)));
  if (e.epoch != m.epoch) return core::internalError("the epoch moved on during the test");
  cr.comm->setAddresses(e.addresses);
  return cr.comm->rebuild(e.epoch, e.alive, core::Deadline::afterSeconds(20));
}

TEST(CoordinatorFailover, KilledCoordinatorIsRebuiltFromTheWorkersAndTheJobGoesOn) {
  // Every failure here is reported, none is left to silence: a timeout
  // far above any stall of a loaded machine (2 s failed a CI run whose
  // rank 2 heartbeat thread waited 2.09 s for a core).
  runWithFailover(failoverLaunch(4, 4, 30.0), [](const LocalRank& lr) -> std::string {
    SharedBlock& sh = *lr.shared;
    auto cr = connectRank(lr, testing::testConfig(), core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    cr->client->startHeartbeats(0.1);
    // Epoch 1 first (a transient fault), so a coordinator restarted at 0 would be caught handing out a lower one.
    if (lr.rank == 0) (void)cr->client->reportFailure(-1, 0, core::Deadline::afterSeconds(5), "test");
    auto e1 = membershipAfterRestart(*cr->client, 1);
    RANK_CHECK(e1.isOk(), e1.status().toString());
    auto m1 = cr->client->enterEpoch(1, core::Deadline::afterSeconds(20));
    RANK_CHECK(m1.isOk() && m1->epoch == 1u, "epoch 1 barrier");
    auto g = cr->comm->rebuild(1, m1->alive, core::Deadline::afterSeconds(20));
    RANK_CHECK(g.isOk(), g.status().toString());
    for (int i = 0; i < 5; ++i) RANK_OK(allreduceCheck(**g, i));
    if (lr.rank == 0) sh.slot[kKillNow].store(1);
    waitFor(sh, kKilled, 1);
    // No coordinator: the data plane carries on.
    for (int i = 5; i < 25; ++i) RANK_OK(allreduceCheck(**g, i));
    sh.slot[kReady].fetch_add(1);
    waitFor(sh, kRestarted, 1);
    RANK_CHECK(sh.slot[kRestarted].load() == 1, "the coordinator did not restart");
    auto back = membershipAfterRestart(*cr->client, 0);
    RANK_CHECK(back.isOk(), back.status().toString());
    RANK_CHECK(back->epoch == 1u, "restarted coordinator is at epoch " << back->epoch << ", workers held 1");
    RANK_CHECK(back->alive == (std::vector<int>{0, 1, 2, 3}), "members after the restart");
    RANK_CHECK(cr->client->reconnects() >= 1, "the client never reconnected");
    if (lr.rank == 0) sh.slot[kBackUs].store(core::nowMicros());
    for (int i = 25; i < 30; ++i) RANK_OK(allreduceCheck(**g, i));  // epoch 1's transport, untouched
    // A later epoch through the restarted coordinator: rank 3 goes away.
    RANK_OK((*g)->barrier(OpOptions::within(20)));
    // A rank leaves the barrier once its own messages are in, possibly before
    // the others: rank 3 dies only after every rank is out, or its death
    // fails the barrier it already left (a CI run lost the test to that).
    sh.slot[kPastBarrier].fetch_add(1);
    if (lr.rank == 3) {
      waitFor(sh, kPastBarrier, 4);
      ::raise(SIGKILL);
    }
    core::Status st = core::okStatus();
    for (int i = 30; st.isOk() && i < 1000; ++i) st = allreduceCheck(**g, i);
    RANK_CHECK(!st.isOk(), "rank 3's death went unnoticed");
    auto g2 = nextEpoch(*cr, 1, 3);
    RANK_CHECK(g2.isOk(), g2.status().toString());
    RANK_CHECK((*g2)->epoch() >= 2u && (*g2)->size() == 3, "epoch " << (*g2)->epoch() << " size " << (*g2)->size());
    for (int i = 0; i < 5; ++i) RANK_OK(allreduceCheck(**g2, i));
    return "";
  });
}

TEST(CoordinatorFailover, RankLostWhileNoCoordinatorRunsIsFailedByTheNextOne) {
  auto o = failoverLaunch(3, 2, 2.0);  // the lost rank is found by the restarted coordinator's window
  o.expendable = {2};
  runWithFailover(o, [](const LocalRank& lr) -> std::string {
    SharedBlock& sh = *lr.shared;
    auto cr = connectRank(lr, testing::testConfig(), core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    cr->client->startHeartbeats(0.1);
    for (int i = 0; i < 3; ++i) RANK_OK(allreduceCheck(*cr->world, i));
    if (lr.rank == 0) sh.slot[kKillNow].store(1);
    waitFor(sh, kKilled, 1);
    if (lr.rank == 2) ::raise(SIGKILL);  // dies while there is no coordinator
    core::Status st = core::okStatus();
    for (int i = 3; st.isOk() && i < 1000; ++i) st = allreduceCheck(*cr->world, i);
    RANK_CHECK(!st.isOk(), "rank 2's death went unnoticed");
    sh.slot[kReady].fetch_add(1);  // the survivors wait for a coordinator; then one starts
    auto g = nextEpoch(*cr, 0, 2);
    RANK_CHECK(g.isOk(), g.status().toString());
    RANK_CHECK((*g)->epoch() == 1u && (*g)->ranks() == (std::vector<int>{0, 1}),
               "epoch " << (*g)->epoch() << " size " << (*g)->size());
    auto m = cr->client->membership(core::Deadline::afterSeconds(5));
    RANK_CHECK(m.isOk() && m->failed == (std::vector<int>{2}), "rank 2 is not failed");
    for (int i = 0; i < 5; ++i) RANK_OK(allreduceCheck(**g, i));
    return "";
  });
}

}  // namespace
}  // namespace archipelago::comm
