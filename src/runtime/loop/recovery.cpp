// Elastic recovery of the loop (docs/runtime.md "Failures and elasticity"):
// the next membership epoch, agreeing on the replica state, the periodic
// replica check, and stopping with a checkpoint when the job cannot go on.
#include <algorithm>
#include <cstring>
#include <map>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/elastic.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

bool isPeerFailure(const core::Status& st) {
  const auto code = st.code();
  return code == core::StatusCode::kUnavailable || code == core::StatusCode::kAborted ||
         code == core::StatusCode::kDeadlineExceeded || code == core::StatusCode::kDataLoss;
}

// After a membership change: every member says which step it holds and the
// digest of its whole replica state; the majority state of the newest step
// wins, and whoever differs (a joiner, a replica one step behind, a
// divergent one) receives it from the lowest rank that holds it.
core::Status Trainer::syncReplicas(const std::string& why) {
  comm::Group& g = *world_group_;
  struct Record {
    int64_t step;
    uint8_t digest[32];
  };
  Record mine{};
  mine.step = has_state_ ? step_ : -1;
  if (has_state_) {
    auto d = stateDigest(DigestOf::kWhole);
    std::memcpy(mine.digest, d.data(), 32);
  }
  std::vector<Record> all(static_cast<size_t>(g.size()));
  ARCH_RETURN_IF_ERROR(g.allgather(&mine, all.data(), sizeof(Record), comm::DType::kU8, comm::OpOptions::within(60))
                           .withContext("replica state records"));
  const auto& ranks = g.ranks();
  int64_t newest = -1;
  for (const auto& r : all) newest = std::max(newest, r.step);
  if (newest < 0) return core::failedPrecondition("no member of the new epoch holds the training state (every replica was lost)");
  std::map<std::string, std::vector<int>> by_digest;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].step == newest) by_digest[std::string(reinterpret_cast<const char*>(all[i].digest), 32)].push_back(ranks[i]);
  }
  const std::vector<int>* best = nullptr;
  for (const auto& [d, rs] : by_digest) {
    if (!best || rs.size() > best->size() || (rs.size() == best->size() && rs.front() < best->front())) best = &rs;
  }
  const int donor = best->front();
  std::vector<int> receivers, joiners, behind, divergent;
  for (size_t i = 0; i < all.size(); ++i) {
    if (std::find(best->begin(), best->end(), ranks[i]) != best->end()) continue;
    receivers.push_back(ranks[i]);
    if (all[i].step < 0) joiners.push_back(ranks[i]);
    else if (all[i].step < newest) behind.push_back(ranks[i]);
    else divergent.push_back(ranks[i]);
  }
  if (receivers.empty()) return core::okStatus();
  const auto t0 = core::Clock::now();
  ARCH_RETURN_IF_ERROR(transferState(g, donor, receivers));
  const double secs = core::secondsSince(t0);
  if (amWriter()) {
    for (int r : joiners) {
      event("join", {.rank = r, .detail = fmt::format("rank {} received the live state of step {} from rank {} ({:.2f} s)",
                                                      r, newest, donor, secs), .transfer_s = secs});
    }
    if (!behind.empty()) {
      event("resync", {.detail = fmt::format("ranks [{}] were behind ({}); state of step {} from rank {}",
                                             fmt::join(behind, ","), why, newest, donor)});
    }
    if (!divergent.empty()) {
      event("resync", {.detail = fmt::format("ranks [{}] held a state different from the majority of step {}; "
                                             "re-synchronised from rank {}", fmt::join(divergent, ","), newest, donor)});
    }
  }
  if (!divergent.empty() && rank_ == donor) {
    ARCH_LOG_WARN("replicas [{}] diverged at step {}: re-synchronised from rank {}", fmt::join(divergent, ","), newest, donor);
  }
  return core::okStatus();
}

// Periodic replica check inside the gradient group (whose members must hold
// bit-identical parameters and FP8 histories after every step): their
// digests are compared and a divergent replica is re-synchronised from the majority.
core::Status Trainer::checkIntegrity() {
  std::shared_ptr<comm::Group> g = opt_.elastic->innerGroup();
  if (!g || g->size() <= 1) return core::okStatus();
  auto d = stateDigest(DigestOf::kReplica);
  std::vector<uint8_t> all(32 * static_cast<size_t>(g->size()));
  ARCH_RETURN_IF_ERROR(g->allgather(d.data(), all.data(), 32, comm::DType::kU8, comm::OpOptions::within(60))
                           .withContext("replica digest check"));
  std::map<std::string, std::vector<int>> by;
  for (int i = 0; i < g->size(); ++i) {
    by[std::string(reinterpret_cast<const char*>(all.data() + 32 * i), 32)].push_back(g->ranks()[static_cast<size_t>(i)]);
  }
  if (by.size() <= 1) return core::okStatus();
  const std::vector<int>* best = nullptr;
  for (const auto& [k, rs] : by) {
    if (!best || rs.size() > best->size() || (rs.size() == best->size() && rs.front() < best->front())) best = &rs;
  }
  std::vector<int> receivers;
  for (int r : g->ranks()) {
    if (std::find(best->begin(), best->end(), r) == best->end()) receivers.push_back(r);
  }
  ARCH_LOG_WARN("replica check after step {}: ranks [{}] differ from the majority; re-synchronising from rank {}", step_,
                fmt::join(receivers, ","), best->front());
  // The transfer carries the committed outer state: this step is complete,
  // so it becomes the rollback point, outer state included.
  if (exact_outer_) commit(true);
  ARCH_RETURN_IF_ERROR(transferState(*g, best->front(), receivers));
  if (std::find(best->begin(), best->end(), rank_) != best->end() && best->front() == rank_) {
    event("resync", {.detail = fmt::format("replica check after step {}: ranks [{}] diverged; re-synchronised from "
                                           "rank {}", step_, fmt::join(receivers, ","), rank_)});
  }
  return core::okStatus();
}

core::Status Trainer::recover(const core::Status& cause) {
  ElasticSession& e = *opt_.elastic;
  const bool failure = !cause.isOk();
  if (failure) {
    failure_at_ = wallSeconds();
    failed_step_ = commit_.step;
    if (split()) {
      return core::failedPrecondition("a worker was lost from a pipeline / expert-parallel layout, which cannot "
                                      "shrink: the job restarts from its newest checkpoint")
          .withContext(cause.message());
    }
    if (optim_->sharded()) {
      return core::failedPrecondition("a worker was lost while optimizer state is sharded (train.zero): "
                                      "the job restarts from its newest checkpoint")
          .withContext(cause.message());
    }
    // The old transport is failed; stop the outer sync's exchanges.
    e.communicator().abort("recovering from: " + cause.message().substr(0, 200));
  }
  if (outer_) {
    if (!exact_outer_ || !failure) {
      // A planned change happens between steps: the live outer state is the
      // current one. Streaming with overlap: exchanges span steps, so the
      // state after them is taken as it is (in-flight fragments restart from it).
      commit_.outer_tensors.clear();
      for (const auto& [name, t] : outer_->stateTensors()) commit_.outer_tensors.push_back({name, t.detach().clone()});
      commit_.outer_json = outer_->stateJson();
      commit_.outer_valid = true;
    }
    outer_.reset();
  }
  if (failure) rollback();
  const uint32_t from = e.epoch();
  const auto old_alive = alive_;
  ARCH_RETURN_IF_ERROR(enterNextEpoch(cause, failure ? "failure" : "membership change", old_alive));
  std::vector<int> gone, joined;
  for (int r : old_alive) {
    if (!e.membership().isAlive(r)) gone.push_back(r);
  }
  for (int r : alive_) {
    if (std::find(old_alive.begin(), old_alive.end(), r) == old_alive.end()) joined.push_back(r);
  }
  records_recovery_ = recordsChange(old_alive);
  if (records_recovery_) {
    event("epoch", {.detail = fmt::format("epoch {} -> {}: workers [{}]{}{}; shares [{}]", from, e.epoch(),
                                          fmt::join(alive_, ","),
                                          gone.empty() ? "" : fmt::format(", lost [{}]", fmt::join(gone, ",")),
                                          joined.empty() ? "" : fmt::format(", joined [{}]", fmt::join(joined, ",")),
                                          fmt::join(shares_, ",")),
                    .workers = {alive_.begin(), alive_.end()}, .rebuild_s = e.lastReconfigureSeconds()});
  }
  ARCH_RETURN_IF_ERROR(rebuildOuterFromCommit());
  first_step_after_change_ = true;
  warm_from_ = step_;
  return core::okStatus();
}

bool Trainer::recordsChange(const std::vector<int>& before) const {
  for (int r : alive_) {
    if (std::find(before.begin(), before.end(), r) != before.end()) return r == rank_;
  }
  return false;  // a joiner's own view (`before` empty): its peers record the change
}

core::Status Trainer::rebuildOuterFromCommit() {
  if (job_.strategy.kind == "sync") return core::okStatus();
  ARCH_RETURN_IF_ERROR(makeOuter(commit_.outer_valid ? &commit_.outer_tensors : nullptr,
                                 commit_.outer_valid ? &commit_.outer_json : nullptr));
  if (!exact_outer_ && commit_.outer_valid) {
    // Every replica restarts from the last model all islands agreed on.
    for (const auto& [name, t] : commit_.outer_tensors) {
      if (name == "anchor") flat_->params().copy_(t);
    }
  }
  return core::okStatus();
}

// Reconfigures into the next epoch and agrees on the replica state; a
// failure during that (a member lost while the state is transferred) moves
// on to the epoch after it. A receiver applies a transferred state only
// once the whole of it arrived, so its own state stays the committed one.
core::Status Trainer::enterNextEpoch(core::Status cause, const std::string& why, const std::vector<int>& before) {
  std::vector<int> left = before;  // the members of the epoch the last attempt left
  for (int attempt = 0;; ++attempt) {
    ARCH_RETURN_IF_ERROR(opt_.elastic->reconfigure(cause));
    bindComm();
    ARCH_ASSIGN_OR_RETURN(shares_, initialShares());
    if (!cause.isOk() && recordsChange(before)) {
      // Every failure gets its record, the ones during a state sync too
      // (a joiner's included: its peers record them).
      std::vector<int> gone;
      for (int r : left) {
        if (!opt_.elastic->membership().isAlive(r)) gone.push_back(r);
      }
      event("failure", {.step = attempt == 0 && failure_at_ > 0 ? failed_step_ : step_,
                        .detail = cause.message().substr(0, 300),
                        .failed_rank = gone.empty() ? suspectOf(cause) : gone.front(),
                        .detected_at = attempt == 0 && failure_at_ > 0 ? failure_at_ : wallSeconds()});
    }
    left = alive_;
    core::Status st = syncReplicas(why);
    if (st.isOk()) return st;
    if (!isPeerFailure(st) || attempt >= 20) return st;
    cause = st;
  }
}

core::Status Trainer::saveAndStop(const core::Status& why) {
  // Survivors below the minimum (or without a coordinator) write what they
  // hold; the lowest alive rank writes, the launcher restarts from it.
  // A split layout's writer would gather from ranks that may be gone: the
  // restart takes the newest periodic checkpoint instead.
  if (has_state_ && holdsWholeCopy() && (amWriter() || outer_) && step_ > 0) {
    auto snap = snapshot(step_);
    if (snap.isOk()) {
      auto st = runtime::writeCheckpoint(opt_.run_dir, amWriter() ? std::move(*snap) : rankPart(std::move(*snap)),
                                         job_.checkpoint.keep_last);
      if (st.isOk()) ARCH_LOG_WARN("wrote {} before stopping", checkpointDirName(step_));
      else ARCH_LOG_WARN("could not write a checkpoint before stopping: {}", st.toString());
    }
  }
  event("stop", {.detail = why.message().substr(0, 300)});
  return why;
}

}  // namespace archipelago::runtime::loop
