// One training step of the loop: the schedule part's forward/backward, the
// reductions, the global norm and the optimizer, the outer sync, the
// control values every rank must agree on, metrics, and what is due at the
// step's boundary (replica check, evaluation, checkpoint).
#include <algorithm>
#include <cmath>
#include <set>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/core/shares.h"
#include "archipelago/model/layers.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/runtime/host_view.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "archipelago/runtime/parallel/micro_batches.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

double Trainer::groupSamples() const {
  // The inner group's pipelines' shares (a rank is a pipeline of one stage).
  std::set<int> seen;
  int64_t n = 0;
  for (int r : grad_ranks_) {
    const int d = job_lay_.replicaOf(r);
    if (seen.insert(d).second && static_cast<size_t>(d) < shares_.size()) n += shares_[static_cast<size_t>(d)];
  }
  return static_cast<double>(n);
}

core::Status Trainer::runSchedule(const data::Batch& batch, double group_samples, parallel::StepStats& stats) {
  parallel::StepInput in;
  in.batch = &batch;
  in.seq_len = T_;
  in.group_samples = group_samples;
  in.loss_scale = scaler_->scale();
  in.trace = &trace_;
  if (params_shard_ && ep_) {
    // Every member runs the count the expert groups agreed on.
    in.passes = parallel::expertMicroCount(shares_, tc_.micro_batch, lay_.stages);
  } else if (params_shard_) {
    // Every member runs as many micro-batches as the largest share needs.
    for (int64_t s : shares_) {
      const int64_t n = pp_ ? parallel::pipelineMicroCount(s, tc_.micro_batch, lay_.stages) : parallel::microCount(s, tc_.micro_batch);
      in.passes = std::max(in.passes, n);
    }
  }
  return parallel::guardStep("step " + std::to_string(step_ + 1), [&] { return schedule_->forwardBackward(in, stats); },
                             modelCommFailure());
}

std::vector<const core::Status*> Trainer::modelCommFailure() const {
  // Read by guardStep after the body threw.
  std::vector<const core::Status*> out;
  if (params_shard_) out.push_back(&params_shard_->failure());
  if (exchange_) out.push_back(&exchange_->failure());
  if (tp_comm_) out.push_back(&tp_comm_->failure());
  return out;
}

core::Status Trainer::trainStep() {
  const auto step_t0 = core::Clock::now();
  const double cpu0 = core::processCpuSeconds();
  const int64_t faults0 = core::minorFaults();
  const int64_t step = step_;
  double comm_s = 0, data_s = 0, optimizer_s = 0;

  flat_->zeroGrad();
  // The compute copy from the masters, whatever changed them since the last
  // step (the optimizer, an outer step, a rollback, a resume, a peer's state).
  flat_->syncCompute();
  data::Batch batch;
  {
    ScopedSpan span(&trace_, TraceRecorder::kData, "batch", &data_s);
    batch = train_sampler_->nextBatch(shares_, share_index_);
  }
  parallel::StepStats stats;
  fp8BeginStep();
  ARCH_RETURN_IF_ERROR(runSchedule(batch, groupSamples(), stats));
  comm_s += stats.wait_s;  // blocked inside the schedule (pipeline receives and send drains) is communication
  double grad_norm = 0;
  ARCH_RETURN_IF_ERROR(reduceAndStep(step, stats, comm_s, optimizer_s, grad_norm));
  ARCH_RETURN_IF_ERROR(fp8EndStep());
  double ctrl[5] = {0, 0, 0, 0, 0};
  ARCH_RETURN_IF_ERROR(controlValues(step, stats, ctrl, comm_s));
  const double loss = ctrl[1] > 0 ? ctrl[0] / ctrl[1] : 0.0;
  ++step_;
  summary_.losses.push_back(loss);

  // The first steps after a start or a membership change are not a speed:
  // a fresh process's heap is still growing (measured: a worker's second
  // step took 2x the CPU time of its fourth). Counted, they moved shares
  // of two equal workers from 8/8 to 9/7 for up to 20 steps.
  if (batch.n > 0 && step_ > warm_from_ + core::kRebalanceWarmupSteps) rebalancer_->observe(stats.compute_s, batch.n);
  const std::vector<int64_t> old_shares = shares_;
  ARCH_RETURN_IF_ERROR(rebalance());
  const double step_s = core::secondsSince(step_t0);
  ARCH_RETURN_IF_ERROR(afterStep(stats, batch, loss, learningRate(tc_, step), grad_norm, old_shares, step_s, cpu0,
                                 faults0, comm_s, data_s, optimizer_s));
  epoch_pending_ = ctrl[3] > 0;
  stop_now_ = ctrl[4] > 0;
  return boundaries(step_ == tc_.steps || stop_now_);
}

// Gradients summed by the parts, the global norm, clipping, AdamW on this
// rank's range, and (ZeRO-1) the updated parameters gathered.
core::Status Trainer::reduceAndStep(int64_t step, parallel::StepStats& stats, double& comm_s, double& optimizer_s,
                                    double& grad_norm) {
  {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "gradient allreduce wait", &comm_s);
    // Sequence parallelism's sum over the TP group comes before the
    // replicas' sum, or after ZeRO-3's (tensor_parallel.h).
    const std::string at = "step " + std::to_string(step + 1);
    if (tensor_ && !tensor_->afterReplicas()) ARCH_RETURN_IF_ERROR(tensor_->reduceGradients(stats).withContext(at));
    ARCH_RETURN_IF_ERROR(densePart().reduceGradients(stats).withContext(at));
    if (tensor_ && tensor_->afterReplicas()) ARCH_RETURN_IF_ERROR(tensor_->reduceGradients(stats).withContext(at));
    if (experts_) {
      flat_->upcastGrads(n_dense_, flat_->numel());  // the expert part reduces the fp32 gradients
      ARCH_RETURN_IF_ERROR(experts_->reduceGradients(stats).withContext(at));
    }
    // Per-island layouts: each island's sums of everything its ranks hold, then across the islands.
    if (bridge_) ARCH_RETURN_IF_ERROR(bridge_->reduceGradients(stats).withContext(at));
  }
  if (scaler_->enabled()) {
    torch::NoGradGuard ng;
    flat_->grads().div_(scaler_->scale());  // exact: the scale is a power of two
  }
  ARCH_RETURN_IF_ERROR(routerBias());
  // Each distinct gradient counted once: a replicated part's norm is local,
  // split parts' shares are summed over the inner group.
  const parallel::NormShare dense = densePart().gradNormSquared();
  double sq = dense.sum_sq + (experts_ ? experts_->gradNormSquared().sum_sq : 0.0);
  if (!dense.replicated || experts_) {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "gradient norm allreduce", &comm_s);
    ARCH_RETURN_IF_ERROR(grad_dp_->allreduceSum(std::span<double>(&sq, 1)));
  }
  grad_norm = std::sqrt(sq);
  if (!scaler_->update(std::isfinite(grad_norm))) {
    // Every rank saw the same norm: all skip this update and keep their weights.
    if (amWriter()) event("loss_scale", report::EventRecord{.step = step + 1,
                                            .detail = fmt::format("gradient overflow: step skipped, loss scale now {}",
                                                                  scaler_->scale())});
    return core::okStatus();
  }
  const double lr = learningRate(tc_, step);
  {
    ScopedSpan span(&trace_, TraceRecorder::kCompute, "optimizer", &optimizer_s);
    torch::NoGradGuard ng;
    if (tc_.grad_clip > 0 && grad_norm > tc_.grad_clip) flat_->grads().mul_(tc_.grad_clip / (grad_norm + 1e-6));
    optim_->step(*adam_, lr);
  }
  if (optim_->sharded()) {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "parameter allgather", &comm_s);
    ARCH_RETURN_IF_ERROR(optim_->gatherParameters(stats));
  }
  return core::okStatus();
}

// Router-bias balancing with the load of every rank that shares the router
// (the replicated tensors' group; under sequence parallelism the TP group's
// ranks each routed a block of the sequence, so theirs is summed first).
core::Status Trainer::routerBias() {
  if (mcfg_.moe.num_experts <= 0 || mcfg_.moe.balance != "router_bias") return core::okStatus();
  if (job_lay_.perIsland()) return routerBiasAcrossIslands();
  torch::Tensor load = net_->routerLoad().to(torch::kCPU, torch::kFloat64).contiguous();
  if (load.numel() == 0) return core::okStatus();
  if (routesSequenceBlocks()) {
    ARCH_RETURN_IF_ERROR(parallel::guardStep("router load over the tensor-parallel group", [&] {
      tp_comm_->allreduceSum(load);
      return core::okStatus();
    }, {&tp_comm_->failure()}));
  }
  DpComm* g = split() ? stage_dp_.get() : grad_dp_;
  if (g) ARCH_RETURN_IF_ERROR(g->allreduceSum(std::span<double>(load.data_ptr<double>(), static_cast<size_t>(load.numel()))));
  net_->updateRouterBias(load.to(torch::kInt64));
  return core::okStatus();
}

// Per-island layouts: a router's layer sits on another stage, TP rank and
// replica in every island, so the loads meet by layer: every rank puts its
// layers' rows into a [MoE layers, E] table (one TP rank per group when its
// ranks route the same tokens, every one under sequence parallelism), one
// sum over the gradient group (the job under sync, the island under
// DiLoCo), and each takes its layers' rows.
core::Status Trainer::routerBiasAcrossIslands() {
  const int64_t E = mcfg_.moe.num_experts;
  const std::vector<int64_t> moe_layers = moeLayerIds();
  const auto rowOf = [&](int64_t layer) {
    return std::find(moe_layers.begin(), moe_layers.end(), layer) - moe_layers.begin();
  };
  torch::Tensor mine = net_->routerLoad().to(torch::kCPU, torch::kFloat64);
  const auto stats = net_->moeStats();
  std::vector<double> table(moe_layers.size() * static_cast<size_t>(E), 0.0);
  if (tp_rank_ == 0 || routesSequenceBlocks()) {
    for (size_t i = 0; i < stats.size(); ++i) {
      auto row = mine[static_cast<int64_t>(i)].contiguous();
      std::copy_n(row.data_ptr<double>(), E, table.data() + rowOf(stats[i].layer) * E);
    }
  }
  ARCH_RETURN_IF_ERROR(grad_dp_->allreduceSum(table).withContext("router load across islands"));
  torch::Tensor total = torch::zeros({static_cast<int64_t>(stats.size()), E}, torch::kInt64);
  for (size_t i = 0; i < stats.size(); ++i) {
    for (int64_t e = 0; e < E; ++e) {
      total[static_cast<int64_t>(i)][e] = static_cast<int64_t>(std::llround(table[static_cast<size_t>(rowOf(stats[i].layer) * E + e)]));
    }
  }
  net_->updateRouterBias(total);
  return core::okStatus();
}

// Control values: loss, tokens, aux, "a newer epoch is published", stop
// request. They cross the straits only where the world must agree: every
// step for sync; for DiLoCo/streaming at outer-step boundaries (every
// inner_steps) and at the end, so the strait is not crossed every inner
// step. In between the loss is the island's, a stop request waits for the
// boundary, and a new epoch is entered island by island. Without
// elasticity the boundary's values of a data-parallel layout ride along
// with the outer exchange (fragment 0 is due there) instead of an allreduce
// of their own: DiLoCo gets them in the same step, streaming overlap_steps
// later. (A split layout's outer groups hold one stage each: not the world.)
core::Status Trainer::controlValues(int64_t step, const parallel::StepStats& stats, double (&ctrl)[5], double& comm_s) {
  const bool want_stop = opt_.stop && opt_.stop->load();
  const bool pending = elastic() && opt_.elastic->newEpochPending();
  // A tensor-parallel group computes one loss: its rank 0 counts it.
  const bool counts = tp_rank_ == 0;
  ctrl[0] = counts ? stats.ce_sum : 0.0;
  ctrl[1] = counts ? static_cast<double>(stats.tokens) : 0.0;
  ctrl[2] = counts ? stats.aux_sum : 0.0;
  ctrl[3] = pending ? 1.0 : 0.0;
  ctrl[4] = want_stop ? 1.0 : 0.0;
  const bool outer_boundary = outer_ && (step + 1) % job_.strategy.inner_steps == 0;
  const bool carried = outer_boundary && !elastic() && !split() && step + 1 < tc_.steps;
  if (carried) {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "control allreduce", &comm_s);
    ARCH_RETURN_IF_ERROR(grad_dp_->allreduceSum(std::span<double>(ctrl, 5)));
    outer_->attachControl(std::span<const double>(ctrl, 5));
    ctrl[4] = 0;  // the island's; the world's arrives with the outer result
  }
  if (outer_) {
    // Split layouts: the island's tokens, reported once per island in every outer group.
    const int64_t tokens = !split() ? stats.tokens
                                    : (outer_counts_tokens_ ? static_cast<int64_t>(groupSamples()) * T_ : 0);
    ScopedSpan span(&trace_, TraceRecorder::kComm, "outer sync", &comm_s);
    if (outer_->touchesParams(step + 1)) {
      HostView params(flat_->params(), torch::kFloat32);  // no copy on the CPU
      ARCH_RETURN_IF_ERROR(outer_->afterInnerStep(step + 1, params.host(), tokens).withContext("outer sync"));
      params.land();
    } else {
      ARCH_RETURN_IF_ERROR(outer_->afterInnerStep(step + 1, flat_->params(), tokens).withContext("outer sync"));
    }
  }
  ScopedSpan span(&trace_, TraceRecorder::kComm, "control allreduce", &comm_s);
  const bool world_boundary = !outer_ || outer_boundary || step + 1 == tc_.steps;
  if (carried) {
    // island sums above
  } else if (world_boundary) {
    ARCH_RETURN_IF_ERROR(dp_->allreduceSum(std::span<double>(ctrl, 5)));
  } else {
    ARCH_RETURN_IF_ERROR(grad_dp_->allreduceSum(std::span<double>(ctrl, elastic() ? 4 : 3)));
    ctrl[4] = 0;
  }
  if (auto c = outer_ ? outer_->takeControl() : std::nullopt; c && c->sums.size() == 5) {
    ctrl[4] = c->sums[4];  // every rank takes it at the same step
    if (c->sent_step == step + 1) std::copy(c->sums.begin(), c->sums.begin() + 3, ctrl);  // the world's loss of this step
  }
  return core::okStatus();
}

core::Status Trainer::rebalance() {
  if (!rebalancer_->due(step_)) return core::okStatus();
  const std::vector<int64_t> old_shares = shares_;
  ARCH_ASSIGN_OR_RETURN(auto ns, rebalancer_->shares(dp_, tc_.global_batch, alive_, world_, shares_));
  if (ns == shares_) return core::okStatus();
  shares_ = ns;
  if (amWriter() && opt_.write_metrics) {
    metrics_.write(report::EventRecord{
        .event = "rebalance", .step = step_,
        .detail = fmt::format("shares [{}] -> [{}]", fmt::join(old_shares, ","), fmt::join(shares_, ","))});
  }
  return core::okStatus();
}

}  // namespace archipelago::runtime::loop
