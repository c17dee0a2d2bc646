// Failover of the membership table (coordinator.h "Failover"): a restarted
// or standby coordinator rebuilds the table from the workers' reattaches.
#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/log.h"

namespace archipelago::comm {

MembershipTable::MembershipTable(double heartbeat_timeout_s, double recovery_window_s)
    : timeout_s_(heartbeat_timeout_s),
      window_s_(recovery_window_s > 0 ? recovery_window_s : (heartbeat_timeout_s > 0 ? heartbeat_timeout_s : 5.0)),
      window_is_timeout_(recovery_window_s <= 0) {}

void MembershipTable::raiseTimeout(double s) {
  if (s <= timeout_s_) return;
  timeout_s_ = s;
  if (window_is_timeout_) window_s_ = std::max(window_s_, s);
}

uint32_t MembershipTable::reattach(const Reattach& r, int64_t now_us) {
  if (!recovering_ && slots_.empty()) {
    // Nothing known: this coordinator was (re)started under a running job.
    recovering_ = true;
    rec_ = Recovery{};
    rec_.since_us = now_us;
    ARCH_LOG_WARN("coordinator: rank {} reattached to an empty table (restarted coordinator); rebuilding the "
                  "membership from the workers (window {:.1f} s)", r.rank, window_s_);
  }
  if (recovering_) {
    rec_.members[r.rank] = r;
    rec_.max_seen = std::max({rec_.max_seen, r.seen, r.has_view ? r.view.epoch : 0u});
    if (r.has_view && (!rec_.has_best || r.view.epoch > rec_.best.epoch)) {
      rec_.has_best = true;
      rec_.best = r.view;
    }
    settleRecovery(now_us);
    return epoch_;
  }
  auto it = slots_.find(r.rank);
  if (it == slots_.end()) {
    registerRank(r.rank, r.island, r.address, r.pid, now_us);  // a worker this table never saw: it registers
  } else if (it->second.state == State::kAlive && it->second.pid == r.pid) {
    heartbeat(r.rank, now_us);  // the same process reconnecting to the same table
  }
  // A failed slot, or an older process of a replaced one, is not revived:
  // it learns it was declared failed at its next membership change.
  if (r.seen > epoch_) {
    // Nobody may be handed an epoch number that already meant another membership.
    epoch_ = r.seen;
    bump("recovery", -1, fmt::format("rank {} had seen epoch {}", r.rank, r.seen));
  }
  return epoch_;
}

double MembershipTable::recoverySeconds(int64_t now_us) const {
  return recovering_ ? static_cast<double>(now_us - rec_.since_us) / 1e6 : 0.0;
}

bool MembershipTable::recoveryComplete() const {
  if (!rec_.has_best || rec_.max_seen > rec_.best.epoch) return false;
  for (int a : rec_.best.alive) {
    auto it = rec_.members.find(a);
    if (it == rec_.members.end()) return false;
    const auto pid = rec_.best.pids[static_cast<size_t>(a)];
    if (pid != 0 && it->second.pid != pid) return false;
  }
  return true;
}

bool MembershipTable::settleRecovery(int64_t now_us) {
  if (!recovering_) return false;
  if (!recoveryComplete() && recoverySeconds(now_us) < window_s_) return false;
  finishRecovery(now_us);
  return true;
}

std::pair<std::vector<int>, std::vector<int>> MembershipTable::adoptView(int64_t now_us) {
  std::vector<int> lost, added;
  const Membership& v = rec_.best;
  for (size_t r = 0; rec_.has_best && r < v.addresses.size(); ++r) {
    const int rank = static_cast<int>(r);
    if (v.addresses[r].empty()) continue;  // never registered
    Slot& s = slots_[rank];
    s.address = v.addresses[r];
    s.island = v.islands[r];
    s.pid = v.pids[r];
    s.state = v.isAlive(rank) ? State::kAlive : State::kFailed;
    if (s.state != State::kAlive) continue;
    auto it = rec_.members.find(rank);
    if (it == rec_.members.end() || (s.pid != 0 && it->second.pid != s.pid)) {
      s.state = State::kFailed;  // gone while there was no coordinator
      lost.push_back(rank);
      continue;
    }
    occupy(s, s.island, s.address, s.pid, now_us);
    // Past the barrier of the view's epoch: the workers hold its transport.
    if (it->second.has_view && it->second.view.epoch == v.epoch) s.entered = v.epoch + 1;
  }
  // Reattached workers the view does not know (still registering): they register.
  for (const auto& [rank, m] : rec_.members) {
    if (slots_.count(rank)) continue;
    Slot& s = slots_[rank];
    occupy(s, m.island, m.address, m.pid, now_us);
    added.push_back(rank);
  }
  return {lost, added};
}

void MembershipTable::finishRecovery(int64_t now_us) {
  recovering_ = false;
  const auto [lost, added] = adoptView(now_us);
  const uint32_t view_epoch = rec_.has_best ? rec_.best.epoch : 0u;
  const uint32_t before = epoch_;  // 0 unless this table published epochs without members
  epoch_ = std::max({before, view_epoch, rec_.max_seen});
  // Without a view (the job was still starting) the registrations are the table.
  const bool changed = rec_.has_best ? !lost.empty() || !added.empty() || epoch_ > view_epoch : epoch_ > 0;
  const double secs = static_cast<double>(now_us - rec_.since_us) / 1e6;
  if (changed) {
    bump("recovery", -1, fmt::format("membership rebuilt from {} reattached worker(s) in {:.2f} s{}",
                                     rec_.members.size(), secs,
                                     lost.empty() ? "" : fmt::format("; lost while the coordinator was away: [{}]",
                                                                     fmt::join(lost, ","))));
    for (auto& [r, s] : slots_) s.entered = 0;
  } else {
    ARCH_LOG_INFO("coordinator: membership of epoch {} rebuilt from {} reattached worker(s) in {:.2f} s; unchanged",
                  epoch_, rec_.members.size(), secs);
  }
  rec_ = Recovery{};
}

}  // namespace archipelago::comm
