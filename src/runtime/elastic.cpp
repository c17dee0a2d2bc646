#include "archipelago/runtime/elastic.h"

#include <unistd.h>

#include <algorithm>
#include <regex>
#include <thread>

#include <fmt/format.h>

#include "archipelago/comm/address.h"
#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/security.h"

namespace archipelago::runtime {

namespace {
// Where this rank listens and what it advertises: --listen/--advertise, else
// its island's fields, resolved on this host (comm/address.h).
core::Result<comm::CommConfig> commConfigOf(const core::JobConfig& job, int rank, const ElasticOptions& o) {
  const auto workers = workersOf(job.cluster);
  const std::string& secret = o.secret;
  comm::CommConfig cc;
  cc.rank = rank;
  cc.world = static_cast<int>(workers.size());
  for (const auto& w : workers) cc.island_of_rank.push_back(w.island_index);
  cc.cluster = job.cluster;
  cc.secret = secret;
  cc.options.streams = static_cast<int>(job.strategy.streams);
  cc.options.heartbeat_timeout_s = job.strategy.failure_timeout;
  cc.options.tls_all_links = job.security.tls;
  cc.options.tls = tlsFilesOf(job);
  // Ten per timeout (0.2 s at the default 2 s): a job that sets a long
  // timeout (many workers per core) also sends fewer heartbeats, which with
  // every peer pair heartbeating are most of an idle mesh's frames.
  cc.options.heartbeat_interval_s = job.strategy.failure_timeout / 10;
  const int island = workers[static_cast<size_t>(rank)].island_index;
  const auto& spec = job.cluster.islands[static_cast<size_t>(island)];
  // `auto` addresses route to the first coordinator of a standby list.
  ARCH_ASSIGN_OR_RETURN(auto coord, comm::splitHostPort(o.coordinator.substr(0, o.coordinator.find(','))));
  const bool flags = !o.listen.empty() || !o.advertise.empty();
  ARCH_ASSIGN_OR_RETURN(auto addr, comm::resolveAddresses(o.listen.empty() ? spec.listen : o.listen,
                                                          o.advertise.empty() ? spec.advertise : o.advertise, coord.first,
                                                          flags ? "worker" : "cluster.islands[" + std::to_string(island) + "]"));
  cc.options.listen_host = addr.listen;
  cc.options.advertise_host = addr.advertise;
  return cc;
}

void sleepSeconds(double s) { std::this_thread::sleep_for(std::chrono::duration<double>(s)); }

// What reconfigure() knows of the failure it recovers from, while it waits
// for the coordinator to publish the next epoch.
struct EpochWait {
  uint32_t from = 0;      // the epoch being left
  core::Status why;       // its failure (ok: a planned change such as a join)
  bool reported = false;  // why was reported to the coordinator
  core::Clock::time_point since_change;
};

// Nobody has published the epoch after w.from yet: say what we saw, once.
// True when the failure was just reported (look again at once).
// Reports are best effort: one that does not arrive is found again by the
// coordinator's heartbeat timeout, so their Status is not acted on.
bool reportCause(comm::CoordinatorClient& client, int rank, EpochWait& w, double settle_s) {
  if (!w.reported && !w.why.isOk()) {
    const int suspect = suspectOf(w.why);
    if (suspect >= 0 && suspect != rank) {
      (void)client.reportFailure(suspect, w.from, core::Deadline::afterSeconds(5), w.why.message().substr(0, 300));
      w.reported = true;
      return true;
    }
    if (w.why.code() == core::StatusCode::kDataLoss) {
      (void)client.reportFailure(-1, w.from, core::Deadline::afterSeconds(5), w.why.message().substr(0, 300));
      w.reported = true;
      return true;
    }
  }
  // The cause names nobody (a peer aborted the epoch, a rebuild timed
  // out): heartbeats find a dead rank within the timeout; after that it
  // is a transient fault.
  if (core::secondsSince(w.since_change) > settle_s) {
    (void)client.reportFailure(-1, w.from, core::Deadline::afterSeconds(5),
                               "no epoch change " + std::to_string(static_cast<int>(settle_s)) + " s after: " +
                                   w.why.message().substr(0, 200));
    w.since_change = core::Clock::now();
  }
  return false;
}

// Everyone of the epoch builds its transport at the same time. A member
// still blocked in a collective of the old epoch (it has not seen the
// change) is shaken loose by aborting our side of the old transport, but
// only if it does not arrive by itself within a second: a peer that is
// just finishing the same step must not lose it.
core::Result<comm::Membership> enterEpochBarrier(comm::CoordinatorClient& client, comm::Communicator& comm, int rank,
                                                 uint32_t epoch, bool first_join) {
  auto er = client.enterEpoch(epoch, core::Deadline::afterSeconds(1.0));
  if (!er.isOk() && er.status().code() == core::StatusCode::kDeadlineExceeded) {
    comm.abort("rank " + std::to_string(rank) + " is moving to epoch " + std::to_string(epoch));
    er = client.enterEpoch(epoch, core::Deadline::afterSeconds(first_join ? 600 : 120));
  }
  return er;
}

}  // namespace

int suspectOf(const core::Status& st) {
  static const std::regex re("lost rank ([0-9]+)");
  std::smatch m;
  const std::string msg = st.message();
  if (std::regex_search(msg, m, re)) return std::stoi(m[1].str());
  return -1;
}

namespace {

// The coordinator may start after its workers: dialled in 5 s slices until
// o.connect_timeout_s, each failed slice logged, so a worker never waits in
// silence. A refusal that waiting cannot change (a wrong secret) ends it.
core::Result<std::unique_ptr<comm::CoordinatorClient>> dialCoordinator(const ElasticOptions& o) {
  const auto t0 = core::Clock::now();
  core::Status last;
  while (true) {
    const double left = o.connect_timeout_s - core::secondsSince(t0);
    auto c = comm::CoordinatorClient::connect(o.coordinator, o.secret, o.rank,
                                              core::Deadline::afterSeconds(std::clamp(left, 0.05, 5.0)),
                                              coordinatorTlsOf(*o.job));
    if (c.isOk()) return c;
    last = c.status();
    const bool retry = last.code() == core::StatusCode::kUnavailable ||
                       last.code() == core::StatusCode::kDeadlineExceeded;
    if (!retry) return last;
    if (core::secondsSince(t0) >= o.connect_timeout_s) break;
    ARCH_LOG_INFO("waiting for the coordinator at {}: {} ({:.0f} s of {:.0f} s)", o.coordinator, last.message(),
                  core::secondsSince(t0), o.connect_timeout_s);
  }
  return core::unavailable(fmt::format(
      "no coordinator answered at {} within {:.0f} s ({}): check that `archipelago coordinator` runs there and "
      "that this host can reach it (worker --wait-coordinator S waits longer)",
      o.coordinator, o.connect_timeout_s, last.message()));
}

}  // namespace

core::Result<std::unique_ptr<ElasticSession>> ElasticSession::start(const ElasticOptions& o) {
  if (!o.job) return core::invalidArgument("elastic session: no job");
  std::unique_ptr<ElasticSession> s(new ElasticSession());
  s->opt_ = o;
  s->job_ = *o.job;
  const auto workers = workersOf(s->job_.cluster);
  s->slots_ = static_cast<int>(workers.size());
  // Registering, waiting for the others to register and the mesh: the
  // workers of a job may start a minute apart.
  const auto dl = core::Deadline::afterSeconds(std::max(60.0, o.connect_timeout_s));
  ARCH_ASSIGN_OR_RETURN(s->client_, dialCoordinator(o));
  s->client_->announceFailureTimeout(s->job_.strategy.failure_timeout);
  const double hb = std::min(0.5, s->job_.strategy.failure_timeout / 4);

  if (!o.join) {
    if (o.rank < 0 || o.rank >= s->slots_) {
      return core::invalidArgument("rank " + std::to_string(o.rank) + " is outside [0, " + std::to_string(s->slots_) + ")");
    }
    s->rank_ = o.rank;
    ARCH_ASSIGN_OR_RETURN(auto cc, commConfigOf(s->job_, s->rank_, o));
    ARCH_ASSIGN_OR_RETURN(s->comm_, comm::Communicator::create(cc));
    ARCH_LOG_INFO("listening on {}, peers connect to {}", comm::joinHostPort(cc.options.listen_host, s->comm_->port()),
                  s->comm_->address());
    const auto& me = workers[static_cast<size_t>(s->rank_)];
    ARCH_RETURN_IF_ERROR(s->client_->registerRank(s->rank_, me.island_index, s->comm_->address(), dl).status());
    // Watched from registration on: heartbeats start before the (possibly
    // long) wait for the slower workers of the job.
    s->client_->startHeartbeats(hb);
    ARCH_ASSIGN_OR_RETURN(auto members, s->client_->waitForMembers(s->slots_, dl));
    ARCH_RETURN_IF_ERROR(s->comm_->connect(members.addresses, dl));
    s->membership_ = members;
    if (s->membership_.epoch != 0 || s->membership_.alive.size() != static_cast<size_t>(s->slots_)) {
      // Somebody failed while the job was starting: go straight to the current epoch.
      s->membership_.epoch = 0;  // the transport just built is epoch 0
      ARCH_RETURN_IF_ERROR(s->installGroups(s->comm_->world()));
      ARCH_RETURN_IF_ERROR(s->reconfigure(core::unavailable("a rank failed during start-up")));
    } else {
      ARCH_RETURN_IF_ERROR(s->installGroups(s->comm_->world()));
    }
    return s;
  }

  // Join: take a failed slot (the requested one, or the lowest), listen as
  // that rank, register, and enter the join epoch with the others.
  for (int attempt = 0;; ++attempt) {
    int slot = o.rank;
    if (slot < 0) {
      ARCH_ASSIGN_OR_RETURN(auto m, s->client_->membership(dl));
      if (m.failed.empty()) {
        if (attempt > 50 || dl.expired()) {
          return core::failedPrecondition("--join: no failed worker slot to take (every rank is alive)");
        }
        sleepSeconds(0.2);
        continue;
      }
      slot = m.failed.front();
    }
    if (slot >= s->slots_) return core::invalidArgument("--join --rank " + std::to_string(slot) + " is not a slot of the job");
    s->rank_ = slot;
    ARCH_ASSIGN_OR_RETURN(auto cc, commConfigOf(s->job_, slot, o));
    ARCH_ASSIGN_OR_RETURN(s->comm_, comm::Communicator::create(cc));
    ARCH_LOG_INFO("listening on {}, peers connect to {}", comm::joinHostPort(cc.options.listen_host, s->comm_->port()),
                  s->comm_->address());
    const auto& me = workers[static_cast<size_t>(slot)];
    auto joined = s->client_->join(slot, me.island_index, s->comm_->address(), dl);
    if (!joined.isOk()) {
      if (o.rank < 0 && attempt < 20) continue;  // somebody else took it
      return joined.status().withContext("joining the job");
    }
    break;
  }
  s->joined_ = true;
  s->client_->startHeartbeats(hb);
  ARCH_LOG_INFO("joining the running job as rank {}", s->rank_);
  // The epoch we are in is "none": reconfigure() goes to the newest.
  s->membership_.epoch = 0;
  ARCH_RETURN_IF_ERROR(s->reconfigure(core::okStatus()));
  return s;
}

ElasticSession::~ElasticSession() {
  inner_.reset();
  dp_.reset();
  island_.reset();
  world_.reset();
}

// Long enough for a supervisor to start the coordinator again and for it to
// wait out its recovery window (one failure_timeout).
double ElasticSession::coordinatorTimeout() const { return std::max(30.0, 10 * job_.strategy.failure_timeout); }

std::vector<int> ElasticSession::innerRanks() const {
  return island_ ? island_->ranks() : std::vector<int>{};
}

core::Status ElasticSession::installGroups(std::shared_ptr<comm::Group> world) {
  inner_.reset();
  dp_.reset();
  island_.reset();
  world_ = std::move(world);
  const bool multi_island = job_.cluster.islands.size() > 1;
  const auto& s = job_.strategy;
  const bool hierarchical = s.allreduce == "hierarchical" || (s.allreduce == "auto" && multi_island);
  ARCH_ASSIGN_OR_RETURN(auto codec, comm::parseCodec(s.codec));
  // sync: gradients are summed over the world (hierarchically across the
  // straits, through the codec). diloco/streaming: over the island only.
  const bool per_island = s.kind != "sync";
  dp_ = std::make_unique<GroupDp>(world_, hierarchical && !per_island, per_island ? comm::CodecKind::kNone : codec, 0);
  if (per_island) {
    ARCH_ASSIGN_OR_RETURN(island_, world_->islandGroup());
    inner_ = std::make_unique<GroupDp>(island_, false, comm::CodecKind::kNone, 0);
  }
  return core::okStatus();
}

core::Status ElasticSession::reconfigure(const core::Status& cause) {
  const auto t0 = core::Clock::now();
  EpochWait w{.from = membership_.epoch, .why = cause, .reported = false, .since_change = core::Clock::now()};
  const double settle_s = 2 * job_.strategy.failure_timeout + 1;
  if (!w.why.isOk()) ARCH_LOG_WARN("epoch {}: {}; moving to the next epoch", w.from, w.why.toString());
  while (true) {
    // Counted from the later of the last answer and this change: a
    // coordinator lost while training went on gets the whole time to return.
    if (client_->secondsSinceContact() > coordinatorTimeout() && core::secondsSince(t0) > coordinatorTimeout()) {
      return core::unavailable(fmt::format("no coordinator has answered for {:.0f} s while a membership change "
                                           "waited for one", client_->secondsSinceContact()));
    }
    auto mr = client_->membership(core::Deadline::afterSeconds(5));
    if (!mr.isOk()) {
      sleepSeconds(0.1);
      continue;
    }
    comm::Membership m = std::move(mr).value();
    if (!m.isAlive(rank_)) {
      evicted_ = true;
      return core::aborted(fmt::format("rank {} was declared failed in epoch {} (stalled or cut off); the job went on "
                                       "without it", rank_, m.epoch));
    }
    if (m.epoch <= w.from) {
      if (!reportCause(*client_, rank_, w, settle_s)) sleepSeconds(0.01);
      continue;
    }
    if (static_cast<int64_t>(m.alive.size()) < job_.strategy.min_workers) {
      below_min_ = true;
      return core::failedPrecondition(fmt::format("{} worker(s) alive in epoch {}, below strategy.min_workers = {}",
                                                  m.alive.size(), m.epoch, job_.strategy.min_workers));
    }
    auto er = enterEpochBarrier(*client_, *comm_, rank_, m.epoch, joined_ && w.from == 0);
    if (!er.isOk() || er->epoch != m.epoch) {
      if (!er.isOk()) ARCH_LOG_WARN("epoch {} barrier: {}", m.epoch, er.status().toString());
      continue;  // the epoch moved on (a failure meanwhile): go to the newest
    }
    comm_->setAddresses(er->addresses);
    auto g = comm_->rebuild(er->epoch, er->alive, core::Deadline::afterSeconds(std::max(10.0, 3 * job_.strategy.failure_timeout)));
    if (!g.isOk()) {
      ARCH_LOG_WARN("rebuilding epoch {} failed: {}", er->epoch, g.status().toString());
      membership_ = *er;
      w = EpochWait{.from = er->epoch, .why = g.status(), .reported = false, .since_change = core::Clock::now()};
      continue;
    }
    membership_ = std::move(er).value();
    ARCH_RETURN_IF_ERROR(installGroups(std::move(g).value()));
    last_reconfigure_s_ = core::secondsSince(t0);
    ARCH_LOG_INFO("epoch {}: {} workers [{}] ({:.2f} s to rebuild)", membership_.epoch, membership_.alive.size(),
                  fmt::join(membership_.alive, ","), last_reconfigure_s_);
    return core::okStatus();
  }
}

// Best effort: a rank that cannot say goodbye is found gone by the heartbeat timeout.
void ElasticSession::leave() { (void)client_->leave(core::Deadline::afterSeconds(2)); }

}  // namespace archipelago::runtime
