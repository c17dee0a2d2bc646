// The end of a step: step records (and pipeline / MoE records), the
// recovery event, test hooks, and what is due at the step's boundary:
// replica check, the last outer sync, evaluation, checkpoint.
#include <algorithm>
#include <cmath>

#include "archipelago/core/host_memory.h"
#include "archipelago/core/log.h"
#include "archipelago/model/layers.h"
#include "archipelago/model/tensor_memory.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "archipelago/runtime/host_view.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

core::Status Trainer::afterStep(const parallel::StepStats& stats, const data::Batch& batch, double loss, double lr,
                                double grad_norm, const std::vector<int64_t>& old_shares, double step_s, double cpu0,
                                int64_t faults0, double comm_s, double data_s, double optimizer_s) {
  if (step_ > start_step_ + 1 && !first_step_after_change_) {  // warm-up and recovery steps are not typical
    step_time_sum_ += step_s;
    ++steps_timed_;
  }
  noteTensorPeak();
  if (opt_.write_metrics && (step_ % tc_.log_every == 0 || step_ == tc_.steps || first_step_after_change_)) {
    const int64_t tokens = stats.tokens;
    metrics_.write(report::StepRecord{
        .step = step_, .rank = rank_, .island = me_.island,
        .epoch = elastic() ? static_cast<int64_t>(opt_.elastic->epoch()) : 0, .loss = loss,
        .local_loss = tokens ? stats.ce_sum / static_cast<double>(tokens) : 0.0, .lr = lr,
        .samples = static_cast<double>(batch.n), .tokens = static_cast<double>(tokens), .compute_s = stats.compute_s,
        .comm_s = comm_s, .wait_s = stats.wait_s, .data_s = data_s, .optimizer_s = optimizer_s, .step_s = step_s,
        .compute_cpu_s = stats.compute_cpu_s, .cpu_s = core::processCpuSeconds() - cpu0,
        .minor_faults = static_cast<double>(core::minorFaults() - faults0),
        .peak_rss_bytes = static_cast<double>(core::peakResidentBytes()),
        .state_bytes = static_cast<double>(flat_->bytes() + adam_->bytes() +
                                           (params_shard_ ? params_shard_->unitBytes() : 0)),
        .tensor_peak_bytes = model::tensorMemoryTracked() ? static_cast<double>(model::tensorMemory().peak)
                                                          : report::kMissing,
        .tokens_per_s = static_cast<double>(batch.n * T_) / step_s, .grad_norm = grad_norm, .slowdown = me_.slowdown,
        .share = static_cast<double>(old_shares[static_cast<size_t>(share_index_)]), .commit_s = commit_s_,
        .stage = pp_ ? stage_ : -1, .micro_batches = static_cast<double>(stats.micro_batches)});
    // The next record's peak covers the steps since this one.
    core::resetPeakResident();
    model::resetTensorMemoryPeak();
    if (split()) ARCH_RETURN_IF_ERROR(writeSplitMetrics(stats));
    else writeMoeMetrics();
  }
  if (first_step_after_change_) {
    first_step_after_change_ = false;
    if (failure_at_ > 0 && records_recovery_) {
      event("recovered", {.detail = fmt::format("first step completed {:.2f} s after the failure in step {}",
                                                wallSeconds() - failure_at_, failed_step_ + 1),
                          .recovery_s = wallSeconds() - failure_at_});
    }
    failure_at_ = 0;
  }
  // Test hook: a silent divergence of one replica.
  if (corrupt_hook_.first == rank_ && corrupt_hook_.second == step_) {
    torch::NoGradGuard ng;
    flat_->params().narrow(0, 0, std::min<int64_t>(64, flat_->params().numel())).add_(1e-2);
    ARCH_LOG_WARN("test hook: perturbed this replica's parameters after step {}", step_);
  }
  return core::okStatus();
}

// Every rank holds every MoE layer: rank 0's own routing statistics.
void Trainer::writeMoeMetrics() {
  if (rank_ != 0 || mcfg_.moe.num_experts <= 0) return;
  for (const auto& st : net_->moeStats()) {
    metrics_.write(report::MoeRecord{.step = step_, .rank = rank_, .layer = static_cast<int>(st.layer),
                                     .tokens_per_expert = {st.tokens_per_expert.begin(), st.tokens_per_expert.end()},
                                     .dropped = static_cast<double>(st.dropped),
                                     .capacity = static_cast<double>(st.capacity), .aux_loss = st.aux_loss});
  }
}

// The first pipelined span's record from every inner-group rank's
// (schedule begin, end, busy seconds). Per pipeline of the span with ranks
// in the inner group: window = first start .. last end over its stages
// (each stage's tensor-parallel rank 0: the group runs in lockstep);
// bubble = 1 - busy_s / window. Averaged over pipelines per stage.
void Trainer::writePipelineRecord(const std::vector<double>& timing, int64_t micro_batches) {
  const parallel::ParallelLayout* span = nullptr;
  for (const auto& s : job_lay_.spans) {
    if (s.stages > 1) {
      span = &s;
      break;
    }
  }
  if (!span) return;
  auto indexOf = [&](int r) {
    const auto it = std::find(grad_ranks_.begin(), grad_ranks_.end(), r);
    return it == grad_ranks_.end() ? -1 : static_cast<int>(it - grad_ranks_.begin());
  };
  const int stages = span->stages;
  std::vector<std::vector<size_t>> pipes;  // per pipeline: each stage's timing index
  for (int d = span->replica_base; d < span->replica_base + span->replicas; ++d) {
    std::vector<size_t> at;
    for (int s = 0; s < stages; ++s) {
      const int i = indexOf(span->firstRankOf(d) + s * span->tp);
      if (i >= 0) at.push_back(static_cast<size_t>(i));
    }
    if (static_cast<int>(at.size()) == stages) pipes.push_back(std::move(at));
  }
  if (pipes.empty()) return;
  const double n = static_cast<double>(pipes.size());
  std::vector<double> busy(static_cast<size_t>(stages), 0.0), bubble(static_cast<size_t>(stages), 0.0);
  double window_mean = 0;
  for (const auto& at : pipes) {
    double lo = 1e300, hi = 0;
    for (size_t r : at) {
      lo = std::min(lo, timing[r * 3]);
      hi = std::max(hi, timing[r * 3 + 1]);
    }
    const double window = std::max(1e-9, (hi - lo) * 1e-6);
    window_mean += window / n;
    for (size_t s = 0; s < at.size(); ++s) {
      const double b = timing[at[s] * 3 + 2];
      busy[s] += b / n;
      bubble[s] += std::max(0.0, 1.0 - b / window) / n;
    }
  }
  double mean = 0;
  for (double b : bubble) mean += b / stages;
  metrics_.write(report::PipelineRecord{.step = step_, .stages = stages, .micro_batches = micro_batches,
                                        .stage_layers = span->stage_layers, .busy_s = busy, .bubble = bubble,
                                        .bubble_mean = mean, .window_s = window_mean,
                                        .bubble_theory = parallel::oneFOneBBubble(stages, micro_batches)});
}

// The global indices of the MoE layers, in order.
std::vector<int64_t> Trainer::moeLayerIds() const {
  std::vector<int64_t> out;
  for (int64_t l = 0; l < mcfg_.n_layers; ++l) {
    if (model::isMoeLayer(mcfg_, l)) out.push_back(l);
  }
  return out;
}

// Split layouts (collective over the inner group, every rank calls it):
// per-stage busy time and bubble from every rank's schedule window, and the
// routing statistics summed over every rank's tokens (each MoE layer is
// seen by the ranks of one stage only; the others add zeros).
core::Status Trainer::writeSplitMetrics(const parallel::StepStats& stats) {
  if (job_lay_.anyPipeline()) {
    std::vector<double> timing(grad_ranks_.size() * 3, 0.0);
    double mine[3] = {static_cast<double>(stats.sched_begin_us), static_cast<double>(stats.sched_end_us),
                      stats.compute_s};
    ARCH_RETURN_IF_ERROR(grad_dp_->allgather(mine, timing));
    if (rank_ == 0) writePipelineRecord(timing, stats.micro_batches);
  }
  if (mcfg_.moe.num_experts <= 0) return core::okStatus();
  const int64_t E = mcfg_.moe.num_experts;
  const std::vector<int64_t> moe_layers = moeLayerIds();
  const size_t width = static_cast<size_t>(2 * E + 1);
  std::vector<double> st(moe_layers.size() * width, 0.0);
  // A tensor-parallel group routes the same tokens (its rank 0 counts them),
  // or under sequence parallelism a block each (every rank counts its own;
  // the capacity, the whole sequence's, still once).
  const bool counts = tp_rank_ == 0 || routesSequenceBlocks();
  for (const auto& s : counts ? net_->moeStats() : std::vector<model::MoeLayerStats>{}) {
    const size_t k = static_cast<size_t>(std::find(moe_layers.begin(), moe_layers.end(), s.layer) - moe_layers.begin());
    double* row = st.data() + k * width;
    for (int64_t e = 0; e < E && e < static_cast<int64_t>(s.tokens_per_expert.size()); ++e) {
      row[e] = static_cast<double>(s.tokens_per_expert[static_cast<size_t>(e)]);
      row[E + e] = static_cast<double>(s.dropped_per_expert.empty() ? 0 : s.dropped_per_expert[static_cast<size_t>(e)]);
    }
    if (tp_rank_ == 0) row[2 * E] = static_cast<double>(s.capacity);
  }
  ARCH_RETURN_IF_ERROR(grad_dp_->allreduceSum(st));
  if (rank_ != 0) return core::okStatus();
  for (size_t k = 0; k < moe_layers.size(); ++k) {
    const double* row = st.data() + k * width;
    std::vector<double> tpe(row, row + E), dpe(row + E, row + 2 * E);
    double dropped = 0;
    for (double x : dpe) dropped += x;
    metrics_.write(report::MoeRecord{.step = step_, .rank = rank_, .layer = static_cast<int>(moe_layers[k]),
                                     .tokens_per_expert = tpe, .dropped_per_expert = dpe, .dropped = dropped,
                                     .capacity = row[2 * E], .expert_parallel = static_cast<double>(lay_.ep),
                                     .dispatch_bytes = static_cast<double>(exchange_ ? exchange_->bytesSent() : 0)});
  }
  return core::okStatus();
}

core::Status Trainer::boundaries(bool at_end) {
  const bool periodic = job_.checkpoint.every > 0 && step_ % job_.checkpoint.every == 0;
  const bool world_boundary = !outer_ || step_ % job_.strategy.inner_steps == 0 || at_end;
  // (ZeRO-3 ranks hold different slices: there are no replicas to compare.)
  if (elastic() && !split() && !flat_->sharded() && world_boundary && (step_ % integrity_every_ == 0 || at_end)) {
    ARCH_RETURN_IF_ERROR(checkIntegrity());
  }
  // Replicas must be identical (outer syncs complete) before the final evaluation.
  if (outer_ && at_end) {
    HostView params(flat_->params(), torch::kFloat32);
    ARCH_RETURN_IF_ERROR(outer_->finish(step_, params.host()).withContext("outer sync"));
    params.land();
  }
  if (at_end && job_lay_.perIsland()) ARCH_RETURN_IF_ERROR(compareIslands());
  if (tc_.eval_every > 0 && (step_ % tc_.eval_every == 0 || at_end)) {
    ScopedSpan span(&trace_, TraceRecorder::kCompute, "evaluation");
    ARCH_ASSIGN_OR_RETURN(double vl, evaluate());
    summary_.final_val_loss = vl;
    if (rank_ == 0 && opt_.write_metrics && vl >= 0) metrics_.write(report::EvalRecord{.step = step_, .val_loss = vl});
  }
  if (periodic || (at_end && job_.checkpoint.at_exit)) ARCH_RETURN_IF_ERROR(writeCheckpoint(at_end));
  if (opt_.exit_after_step >= 0 && step_ == opt_.exit_after_step) {
    // Test hook (a crash). A drain failure is what the test looks for: the
    // checkpoint before it must be the one resumed.
    if (ckpt_) {
      const core::Status st = ckpt_->drain();
      if (!st.isOk()) ARCH_LOG_WARN("checkpoint before the test exit: {}", st.message());
    }
    if (!holdsWholeCopy()) {
      // The checkpoint is assembled from several ranks' parts: everybody
      // leaves together once the writer's copy is on disk (the launcher
      // stops the rest soon after the first worker exits).
      double sync[1] = {0};
      const core::Status st = dp_->allreduceSum(sync);
      if (!st.isOk()) ARCH_LOG_WARN("test exit barrier: {}", st.message());
    }
    ARCH_LOG_WARN("test hook: exiting abruptly after step {}", step_);
    std::_Exit(3);
  }
  return core::okStatus();
}

core::Result<double> Trainer::evaluate() {
  if (!val_sampler_) return -1.0;
  flat_->syncCompute();  // the weights of the step just taken
  double acc[2] = {0, 0};
  for (int64_t i = 0; i < tc_.eval_batches; ++i) {
    auto b = val_sampler_->batchAt(i * tc_.global_batch, shares_, share_index_);
    ARCH_RETURN_IF_ERROR(parallel::guardStep("evaluation", [&] { return schedule_->evaluate(b, T_, acc[0], acc[1]); },
                                             modelCommFailure()));
  }
  if (tp_rank_ != 0) acc[0] = acc[1] = 0;  // a tensor-parallel group's loss is counted once
  ARCH_RETURN_IF_ERROR(dp_->allreduceSum(acc));
  return acc[1] > 0 ? acc[0] / acc[1] : -1.0;
}

void Trainer::event(const std::string& name, report::EventRecord e) {
  if (!opt_.write_metrics) return;
  e.event = name;
  if (e.step < 0) e.step = step_;
  if (!e.rank) e.rank = rank_;
  if (elastic() && !e.epoch) e.epoch = opt_.elastic->epoch();
  metrics_.write(std::move(e));
}

// Per-island layouts: the islands must end with the same model, element by
// element (the bridge's sums and means are built for that; a codec or a
// reduction that broke it would otherwise go unseen: no rank pairs with
// another island's by position).
core::Status Trainer::compareIslands() {
  parallel::IslandBridge* b = outer_bridge_ ? outer_bridge_.get() : bridge_.get();
  if (!b) return core::okStatus();
  HostView params(flat_->params(), torch::kFloat32);
  const std::span<const float> values(params.data<float>(), static_cast<size_t>(flat_->numel()));
  ARCH_ASSIGN_OR_RETURN(const uint64_t digest, b->compareIslands(values));
  if (rank_ == 0) ARCH_LOG_INFO("per-island layouts: every island holds the same model (digest {:016x})", digest);
  return core::okStatus();
}

}  // namespace archipelago::runtime::loop
