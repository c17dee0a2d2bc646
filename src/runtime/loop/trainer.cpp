// The one training loop of a worker: run() and the helpers every part of
// the loop uses (docs/runtime.md "The loop").
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/core/island_layout.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

namespace fs = std::filesystem;

double wallSeconds() { return static_cast<double>(core::wallMicros()) / 1e6; }

std::pair<int, int64_t> corruptParamsHook() {
  const char* v = std::getenv("ARCHIPELAGO_TEST_CORRUPT_PARAMS");
  if (!v || !*v) return {-1, -1};
  int r = -1;
  long long s = -1;
  if (std::sscanf(v, "%d:%lld", &r, &s) != 2) return {-1, -1};
  return {r, static_cast<int64_t>(s)};
}

void hashTensor(core::Sha256& h, const torch::Tensor& t) {
  torch::Tensor c = t.to(torch::kCPU).contiguous();
  h.update(c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
}

void Trainer::logStart() const {
  // Every worker says where it computes: islands differ.
  ARCH_LOG_INFO("rank {} ({}): {} compute, {} thread(s){}{}", rank_, me_.island, place_.describe(), me_.threads,
                flat_->mixed() ? ", fp32 master weights" : "",
                scaler_->enabled() ? fmt::format(", dynamic loss scale {}", scaler_->scale()) : "");
  if (rank_ != 0 && !(elastic() && amWriter())) return;
  ARCH_LOG_INFO("training {} parameters, {} steps from step {}, global batch {} x {} tokens over {} ({}), shares [{}]{}",
                flat_->numel(), tc_.steps, start_step_, tc_.global_batch, T_, alive_.size(), dp_->describe(),
                fmt::join(shares_, ","),
                optim_->sharded() ? fmt::format(", {}: {}", optim_->name(), optim_->describe())
                                  : "");
  if (!split() || rank_ != 0) return;
  if (job_lay_.perIsland()) {
    ARCH_LOG_INFO("layout per island ({}), {} replica(s), shares [{}], strategy {}", core::describeIslandLayouts(job_),
                  job_lay_.replicas(), fmt::join(shares_, ","), job_.strategy.kind);
    return;
  }
  ARCH_LOG_INFO("layout: {} pipeline stage(s) with layers [{}] x {} replica(s), expert parallel {} (experts per "
                "member [{}]), tensor parallel {}, shares [{}], strategy {}",
                lay_.stages, fmt::join(lay_.stage_layers, ","), lay_.replicas, lay_.ep, fmt::join(lay_.expert_begin, ","),
                lay_.tp, fmt::join(shares_, ","), job_.strategy.kind);
}

core::Result<TrainSummary> Trainer::run() {
  const auto t_start = core::Clock::now();
  if (elastic() && opt_.elastic->joined()) has_state_ = false;
  ARCH_RETURN_IF_ERROR(setup());
  if (!has_state_) {
    if (split()) return core::failedPrecondition("a pipeline / expert-parallel layout takes no replacement workers");
    if (zeroInUse() >= 1) return core::failedPrecondition("a job with sharded state (train.zero) takes no replacement workers");
    core::Status st = syncReplicas("join");
    if (!st.isOk()) {
      st = enterNextEpoch(st, "join", {});
      if (!st.isOk()) return opt_.elastic->evicted() ? st : saveAndStop(st);
    }
    ARCH_RETURN_IF_ERROR(rebuildOuterFromCommit());
    start_step_ = step_;
    first_step_after_change_ = true;
    ARCH_LOG_INFO("joined at step {} with the live state from a peer", step_);
  } else {
    step_ = start_step_;
  }
  predict();
  predictMemory();
  if (world_ > 1 && !(elastic() && opt_.elastic->joined())) {
    // A world start barrier after predict() (seconds of calibration on
    // rank 0). DiLoCo / streaming: the islands' loops never meet before the
    // first outer sync, so the island whose rank 0 calibrated arrives there
    // late and the other waits, a one-off start-up cost counted against the
    // training loop (measured: 1.7 s at streaming's first fragment).
    // Synchronous runs would meet at their first gradient allreduce, but the
    // other ranks' first forward+backward would run during the calibration,
    // slowing both. A failure here is left to the first step, which meets it
    // again and handles it (elastic recovery).
    double token = 0;
    const core::Status st =
        world_group_ ? world_group_->barrier() : dp_->allreduceSum(std::span<double>(&token, 1));
    if (!st.isOk()) ARCH_LOG_WARN("start barrier: {}", st.message());
  }
  summary_.first_step = start_step_;
  warm_from_ = start_step_;
  logStart();
  if (split() && rank_ == 0 && opt_.write_metrics) {
    metrics_.write(report::ParallelRecord{.pipeline_stages = lay_.stages, .stage_layers = lay_.stage_layers,
                                          .replicas = lay_.replicas, .expert_parallel = lay_.ep,
                                          .expert_begin = lay_.expert_begin, .tensor_parallel = lay_.tp,
                                          .shares = shares_,
                                          .recompute = tc_.recompute, .strategy = job_.strategy.kind});
  }
  if (elastic()) event("started", {.detail = fmt::format("rank {} in step at step {}", rank_, step_), .pid = ::getpid()});
  ARCH_RETURN_IF_ERROR(loop());
  return finish(t_start);
}

// Steps until the end, a stop request or a failure the job cannot survive.
core::Status Trainer::loop() {
  while (step_ < tc_.steps) {
    if (elastic()) {
      // A lost coordinator does not stop training (docs/runtime.md "Control
      // plane failover"): only a membership change waits for its successor.
      if (!split()) {  // the rollback point (split layouts restart from a checkpoint instead)
        const auto c0 = core::Clock::now();
        commit();
        commit_s_ = core::secondsSince(c0);
      }
    }
    core::Status st = trainStep();
    if (st.isOk() && !(elastic() && epoch_pending_)) {
      if (stop_now_) break;
      continue;
    }
    if (!elastic() || (!st.isOk() && !isPeerFailure(st))) return st;
    if (stop_now_ && st.isOk()) break;
    core::Status rc = recover(st);
    if (!rc.isOk()) {
      if (opt_.elastic->evicted()) return rc;
      return saveAndStop(rc);
    }
  }
  return core::okStatus();
}

core::Result<TrainSummary> Trainer::finish(core::Clock::time_point t_start) {
  if (stop_now_) {
    summary_.stopped_early = step_ < tc_.steps;
    if (rank_ == 0) ARCH_LOG_WARN("stop requested: stopped after step {} (checkpoint written)", step_);
  }
  if (ckpt_) ARCH_RETURN_IF_ERROR(ckpt_->drain());
  summary_.steps_done = step_;
  summary_.final_loss = summary_.losses.empty() ? 0 : summary_.losses.back();
  summary_.wall_s = core::secondsSince(t_start);
  summary_.mean_step_s = steps_timed_ > 0 ? step_time_sum_ / static_cast<double>(steps_timed_) : 0;
  summary_.predicted_step_s = predicted_step_s_;
  if (rank_ == 0 && predicted_step_s_ > 0 && summary_.mean_step_s > 0) {
    ARCH_LOG_INFO("step time: predicted {:.3f}s, measured {:.3f}s ({:+.0f}%)", predicted_step_s_, summary_.mean_step_s,
                  100.0 * (predicted_step_s_ - summary_.mean_step_s) / summary_.mean_step_s);
  }
  logMemory();
  if (elastic()) {
    auto d = stateDigest(DigestOf::kParams);
    summary_.replica_digest = core::toHex(d);
    if (opt_.write_metrics) {
      metrics_.write(report::ReplicaRecord{.rank = rank_, .step = step_, .digest = summary_.replica_digest});
    }
  }
  if (opt_.write_metrics) {
    // The trace is a diagnostic: a run that trained is not failed for it.
    const core::Status st =
        trace_.writeFile((fs::path(opt_.run_dir) / "trace" / ("rank" + std::to_string(rank_) + ".json")).string());
    if (!st.isOk()) ARCH_LOG_WARN("trace not written: {}", st.message());
  }
  return summary_;
}

}  // namespace archipelago::runtime::loop

namespace archipelago::runtime {

core::Result<TrainSummary> runTrainer(const TrainerOptions& opt) {
  loop::Trainer t(opt);
  return t.run();
}

}  // namespace archipelago::runtime
