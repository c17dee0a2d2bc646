#include "archipelago/runtime/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"
#include "archipelago/data/dataset.h"
#include "archipelago/model/training.h"
#include "archipelago/model/transformer.h"
#include "archipelago/plan/local_predict.h"
#include "archipelago/runtime/calibrate.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/metrics.h"
#include "archipelago/runtime/outer_sync.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;

std::vector<WorkerInfo> workersOf(const core::ClusterSpec& cluster) {
  std::vector<WorkerInfo> out;
  int rank = 0;
  for (size_t i = 0; i < cluster.islands.size(); ++i) {
    const auto& is = cluster.islands[i];
    for (int64_t k = 0; k < is.count; ++k) {
      WorkerInfo w;
      w.rank = rank++;
      w.island = is.name;
      w.island_index = static_cast<int>(i);
      w.local_index = static_cast<int>(k);
      w.device = is.device;
      w.slowdown = is.slowdownOf(k);
      out.push_back(w);
    }
  }
  return out;
}

namespace {

// Gradient buckets: contiguous ranges of the flat gradient buffer, formed
// from the last parameter backwards (the order backward produces gradients).
// A bucket's allreduce starts as soon as every parameter in it has its final
// gradient and every earlier bucket has started, so all ranks issue the
// same collectives in the same order even if their backward order differs.
class GradientBucketer {
 public:
  GradientBucketer(FlatParams& flat, DpComm* dp, int64_t bucket_bytes) : flat_(flat), dp_(dp) {
    const auto& segs = flat.segments();
    const int64_t cap = std::max<int64_t>(1, bucket_bytes / 4);
    int64_t end = flat.numel();
    Bucket cur;
    cur.end = end;
    for (int i = static_cast<int>(segs.size()) - 1; i >= 0; --i) {
      cur.segments.push_back(i);
      cur.begin = segs[static_cast<size_t>(i)].offset;
      if (cur.end - cur.begin >= cap || i == 0) {
        buckets_.push_back(std::move(cur));
        cur = Bucket{};
        cur.end = segs[static_cast<size_t>(i)].offset;
      }
    }
    seg_bucket_.assign(segs.size(), 0);
    for (size_t b = 0; b < buckets_.size(); ++b) {
      for (int s : buckets_[b].segments) seg_bucket_[static_cast<size_t>(s)] = static_cast<int>(b);
    }
    if (dp_->size() <= 1) return;  // nothing to overlap with
    std::vector<torch::Tensor> params;
    for (const auto& seg : segs) params.push_back(seg.param);
    hooks_ = std::make_unique<model::GradReadyHooks>(params, [this](size_t i) { onGradReady(i); });
  }

  size_t bucketCount() const { return buckets_.size(); }

  // Called before the backward pass whose gradients are final (the last
  // micro-batch of a step).
  void arm() {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = true;
    next_launch_ = 0;
    for (auto& b : buckets_) {
      b.ready = 0;
      b.op.reset();
    }
  }

  // After backward: launches what has not started and waits for everything.
  core::Status finish() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      armed_ = false;
      while (next_launch_ < buckets_.size()) launch(next_launch_++);
    }
    core::Status first;
    for (auto& b : buckets_) {
      if (!b.op) continue;
      core::Status st = b.op->wait();
      if (!st.isOk() && first.isOk()) first = st;
      b.op.reset();
    }
    return first;
  }

 private:
  struct Bucket {
    int64_t begin = 0;
    int64_t end = 0;
    std::vector<int> segments;
    size_t ready = 0;
    std::unique_ptr<PendingReduce> op;
  };

  void onGradReady(size_t seg) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!armed_) return;
    auto& b = buckets_[static_cast<size_t>(seg_bucket_[seg])];
    ++b.ready;
    while (next_launch_ < buckets_.size() && buckets_[next_launch_].ready >= buckets_[next_launch_].segments.size()) {
      launch(next_launch_++);
    }
  }

  void launch(size_t b) {
    auto& bk = buckets_[b];
    float* base = flat_.grads().data_ptr<float>();
    bk.op = dp_->allreduceSumAsync(std::span<float>(base + bk.begin, static_cast<size_t>(bk.end - bk.begin)));
  }

  FlatParams& flat_;
  DpComm* dp_;
  std::mutex mu_;
  bool armed_ = false;
  size_t next_launch_ = 0;
  std::vector<Bucket> buckets_;
  std::vector<int> seg_bucket_;
  std::unique_ptr<model::GradReadyHooks> hooks_;
};

torch::Tensor toTensor(const std::vector<int64_t>& v, int64_t n, int64_t t) {
  return torch::from_blob(const_cast<int64_t*>(v.data()), {n, t}, torch::kInt64).clone();
}

// Measures speed per rank and turns it into integer batch shares. Every rank
// runs the same computation on the same allgathered numbers, so all ranks
// agree on the shares without a leader.
class Rebalancer {
 public:
  Rebalancer(int world, int64_t interval) : interval_(interval), ema_(static_cast<size_t>(world), 0.0) {}
  void observe(double seconds_per_sample) {
    mine_ = mine_ == 0 ? seconds_per_sample : 0.7 * mine_ + 0.3 * seconds_per_sample;
  }
  bool due(int64_t step) const { return interval_ > 0 && step > 0 && step % interval_ == 0; }
  double mine() const { return mine_; }
  core::Result<std::vector<int64_t>> shares(DpComm* dp, int64_t global_batch) {
    std::vector<double> all(static_cast<size_t>(dp->size()));
    double m = mine_;
    ARCH_RETURN_IF_ERROR(dp->allgather(std::span<const double>(&m, 1), all));
    std::vector<double> weights;
    for (double s : all) weights.push_back(s > 0 ? 1.0 / s : 1.0);
    return data::sharesFromWeights(weights, global_batch);
  }

 private:
  int64_t interval_;
  double mine_ = 0;
  std::vector<double> ema_;
};

}  // namespace

core::Result<TrainSummary> runTrainer(const TrainerOptions& opt) {
  const auto t_start = core::Clock::now();
  LocalDp local;
  DpComm* dp = opt.dp ? opt.dp : &local;
  DpComm* grad_dp = opt.inner ? opt.inner : dp;
  const int rank = dp->rank();
  const int world = dp->size();
  core::JobConfig job = opt.job;
  const auto& tc = job.train;
  const auto workers = workersOf(job.cluster);
  if (static_cast<int>(workers.size()) != world && world != 1) {
    return core::invalidArgument("the cluster spec has " + std::to_string(workers.size()) +
                                 " workers but the communicator has " + std::to_string(world));
  }
  const WorkerInfo me = world == 1 && workers.size() != 1 ? WorkerInfo{} : workers[static_cast<size_t>(rank)];

  torch::set_num_threads(static_cast<int>(tc.threads_per_worker));

  // ---- data ----
  ARCH_ASSIGN_OR_RETURN(auto ds, data::PreparedDataset::open(job.data.dir));
  if (job.model.vocab_size == 0) job.model.vocab_size = ds->vocabSize();
  if (job.model.vocab_size < ds->vocabSize()) {
    return core::invalidArgument("model.vocab_size is " + std::to_string(job.model.vocab_size) +
                                 " but the data in '" + job.data.dir + "' uses " + std::to_string(ds->vocabSize()) +
                                 " token ids; set model.vocab_size: 0 to take it from the data");
  }
  const int64_t T = job.data.seq_len;
  ARCH_ASSIGN_OR_RETURN(auto train_sampler, ds->trainSampler(static_cast<uint64_t>(job.data.seed), T));
  std::optional<data::Sampler> val_sampler;
  if (tc.eval_every > 0) {
    auto vs = ds->valSampler(T);
    if (vs.isOk()) val_sampler.emplace(std::move(vs).value());
    else ARCH_LOG_WARN("no validation: {}", vs.status().message());
  }

  // ---- model and optimizer ----
  ARCH_ASSIGN_OR_RETURN(auto net, model::buildModel(job.model, static_cast<uint64_t>(tc.seed)));
  FlatParams flat = FlatParams::bind(net->namedParameters());
  int64_t shard_begin = 0, shard_end = flat.numel();
  std::vector<int64_t> shard_offsets;
  if (tc.shard_optimizer && world > 1 && opt.inner) {
    ARCH_LOG_WARN("train.shard_optimizer is ignored with strategy {} (optimizer state stays per island)", job.strategy.kind);
  } else if (tc.shard_optimizer && world > 1) {
    for (int r = 0; r <= world; ++r) shard_offsets.push_back(flat.numel() * r / world);
    shard_begin = shard_offsets[static_cast<size_t>(rank)];
    shard_end = shard_offsets[static_cast<size_t>(rank) + 1];
  }
  FlatAdamW adam(tc, shard_begin, shard_end);

  // ---- shares ----
  std::vector<int64_t> shares;
  {
    std::vector<double> w;
    for (int r = 0; r < world; ++r) {
      if (!tc.shares.empty()) w.push_back(tc.shares[static_cast<size_t>(r)]);
      else w.push_back(world == 1 ? 1.0 : 1.0 / workers[static_cast<size_t>(r)].slowdown);
    }
    ARCH_ASSIGN_OR_RETURN(shares, data::sharesFromWeights(w, tc.global_batch));
  }

  // ---- resume ----
  int64_t start_step = 0;
  if (opt.resume) {
    std::vector<std::pair<std::string, std::string>> refused;
    auto latest = latestValidCheckpoint(opt.run_dir, &refused);
    if (!latest.isOk()) return latest.status().withContext("cannot resume");
    ARCH_ASSIGN_OR_RETURN(auto ck, loadCheckpoint(*latest));
    std::map<std::string, torch::Tensor> by_name(ck.weights.begin(), ck.weights.end());
    torch::NoGradGuard ng;
    for (const auto& seg : flat.segments()) {
      auto it = by_name.find(seg.name);
      if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + seg.name + "'");
      if (it->second.sizes().vec() != seg.shape) {
        return core::dataLoss("checkpoint " + *latest + " tensor '" + seg.name + "' has another shape than the model");
      }
      flat.params().narrow(0, seg.offset, seg.numel).copy_(it->second.reshape({-1}));
    }
    std::map<std::string, torch::Tensor> opt_by_name(ck.optimizer.begin(), ck.optimizer.end());
    if (!opt_by_name.count("exp_avg") || !opt_by_name.count("exp_avg_sq") ||
        opt_by_name["exp_avg"].numel() != flat.numel()) {
      return core::dataLoss("checkpoint " + *latest + " optimizer state does not match the model");
    }
    adam.expAvg().copy_(opt_by_name["exp_avg"].narrow(0, shard_begin, shard_end - shard_begin));
    adam.expAvgSq().copy_(opt_by_name["exp_avg_sq"].narrow(0, shard_begin, shard_end - shard_begin));
    adam.setStepCount(ck.optimizer_step);
    // Persistent non-trained state (router biases) is in the weights file too.
    std::set<std::string> trained;
    for (const auto& seg : flat.segments()) trained.insert(seg.name);
    for (auto& [name, t] : net->namedTensors()) {
      if (trained.count(name)) continue;
      auto it = by_name.find(name);
      if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + name + "'");
      t.copy_(it->second);
    }
    start_step = ck.step;
    train_sampler.setPosition(ck.data_position);
    if (static_cast<int>(ck.shares.size()) == world) shares = ck.shares;
    if (rank == 0) ARCH_LOG_INFO("resumed from {} at step {}", *latest, start_step);
  }

  // ---- cross-island strategy ----
  std::unique_ptr<OuterSync> outer;
  if (job.strategy.kind != "sync") {
    OuterContext ctx;
    ctx.job = &job;
    ctx.rank = rank;
    ctx.world = world;
    for (const auto& w : workers) ctx.island_of_rank.push_back(w.island_index);
    ctx.world_group = opt.world_group;
    ctx.run_dir = opt.run_dir;
    for (const auto& seg : flat.segments()) ctx.segment_offsets.push_back(seg.offset);
    ARCH_ASSIGN_OR_RETURN(outer, makeOuterSync(ctx, flat.params()));
  }
  if (outer && opt.resume) {
    ARCH_ASSIGN_OR_RETURN(auto latest, latestValidCheckpoint(opt.run_dir));
    ARCH_ASSIGN_OR_RETURN(auto ck, loadCheckpoint(latest));
    NamedTensors outer_tensors;
    for (const auto& [name, t] : ck.optimizer) {
      if (name.rfind("outer.", 0) == 0) outer_tensors.push_back({name.substr(6), t});
    }
    ARCH_RETURN_IF_ERROR(outer->restore(outer_tensors, ck.extra.value("outer", nlohmann::json())));
  }

  // ---- run directory outputs ----
  MetricsSink metrics;
  TraceRecorder trace;
  trace.setProcess(rank, "rank " + std::to_string(rank) + " (" + me.island + ", " + me.device + ")");
  if (opt.write_metrics) {
    std::error_code ec;
    fs::create_directories(fs::path(opt.run_dir) / "trace", ec);
    ARCH_RETURN_IF_ERROR(metrics.open((fs::path(opt.run_dir) / "metrics.jsonl").string()));
  }
  std::unique_ptr<CheckpointWriter> ckpt;
  if (rank == 0) ckpt = std::make_unique<CheckpointWriter>(opt.run_dir, job.checkpoint.keep_last);
  const std::string job_yaml = core::dumpJobYaml(job);

  GradientBucketer bucketer(flat, grad_dp, static_cast<int64_t>(job.strategy.bucket_bytes));
  // Ranks whose samples make up one gradient (all, or my island's).
  std::vector<int> grad_ranks = opt.inner_ranks;
  if (grad_ranks.empty()) {
    for (int r = 0; r < world; ++r) grad_ranks.push_back(r);
  }
  // Shares are re-derived every 5 steps; with DiLoCo/streaming at outer-step
  // boundaries only (the speed allgather crosses the straits).
  Rebalancer rebalancer(world, tc.rebalance && world > 1 ? (outer ? job.strategy.inner_steps : 5) : 0);

  auto snapshot = [&](int64_t step) -> core::Result<CheckpointState> {
    CheckpointState s;
    s.step = step;
    s.data_position = train_sampler.position();
    s.shares = shares;
    s.optimizer_step = adam.stepCount();
    s.job_yaml = job_yaml;
    s.model = job.model;
    nlohmann::json ranks = nlohmann::json::array();
    for (const auto& w : workers) ranks.push_back({{"rank", w.rank}, {"island", w.island}, {"slowdown", w.slowdown}});
    s.membership = {{"world", world}, {"epoch", 0}, {"ranks", ranks}};
    torch::Tensor m = torch::zeros({flat.numel()});
    torch::Tensor v = torch::zeros({flat.numel()});
    m.narrow(0, shard_begin, shard_end - shard_begin).copy_(adam.expAvg());
    v.narrow(0, shard_begin, shard_end - shard_begin).copy_(adam.expAvgSq());
    if (!shard_offsets.empty()) {
      ARCH_RETURN_IF_ERROR(dp->allgatherSlices(std::span<float>(m.data_ptr<float>(), static_cast<size_t>(m.numel())), shard_offsets));
      ARCH_RETURN_IF_ERROR(dp->allgatherSlices(std::span<float>(v.data_ptr<float>(), static_cast<size_t>(v.numel())), shard_offsets));
    }
    s.optimizer = {{"exp_avg", m}, {"exp_avg_sq", v}};
    if (outer) {
      for (const auto& [name, t] : outer->stateTensors()) s.optimizer.push_back({"outer." + name, t.detach().clone()});
      s.extra["outer"] = outer->stateJson();
    }
    for (auto& [name, t] : net->namedTensors()) s.weights.push_back({name, t.detach().clone()});
    return s;
  };

  auto evaluate = [&]() -> core::Result<double> {
    if (!val_sampler) return -1.0;
    torch::NoGradGuard ng;
    double acc[2] = {0, 0};
    for (int64_t i = 0; i < tc.eval_batches; ++i) {
      auto b = val_sampler->batchAt(i * tc.global_batch, shares, rank);
      if (b.n == 0) continue;
      auto out = net->lossAndStats(toTensor(b.input, b.n, T), toTensor(b.target, b.n, T));
      acc[0] += out.ce_sum.item<double>();
      acc[1] += static_cast<double>(out.tokens);
    }
    ARCH_RETURN_IF_ERROR(dp->allreduceSum(acc));
    return acc[1] > 0 ? acc[0] / acc[1] : -1.0;
  };

  // ---- the planner's prediction for this run (calibrated on this machine) ----
  double predicted_step_s = 0;
  if (rank == 0) {
    const int64_t rows = std::max<int64_t>(1, *std::max_element(shares.begin(), shares.end())) * T;
    const std::string kind = me.device.empty() ? "cpu" : me.device;
    auto profile = calibrateLocalMatmuls(job.model, rows, kind);
    {
      // The job's own model parts at the smallest and largest micro-batch the workers run.
      std::vector<int64_t> sizes;
      for (int64_t s : shares) sizes.push_back(job.train.micro_batch > 0 ? std::min(job.train.micro_batch, s) : s);
      const auto [lo, hi] = std::minmax_element(sizes.begin(), sizes.end());
      const core::Status st = calibrateLocalModel(job, {*lo, *hi == *lo ? std::max<int64_t>(1, *hi / 2) : *hi}, kind, profile);
      if (!st.isOk()) ARCH_LOG_WARN("model calibration: {}", st.message());
    }
    (void)profile.save((fs::path(opt.run_dir) / "calibration.json").string());
    auto catalog = plan::DeviceCatalog::builtin();
    auto pred = catalog.isOk() ? plan::predictStepTime(job, job.model.vocab_size, *catalog, &profile)
                               : core::Result<plan::StepPrediction>(catalog.status());
    if (pred.isOk()) {
      predicted_step_s = pred->total_s;
      ARCH_LOG_INFO("planner prediction: {:.3f}s/step ({})", pred->total_s, pred->detail);
      if (opt.write_metrics) {
        metrics.write({{"kind", "prediction"}, {"predicted_step_s", pred->total_s}, {"compute_s", pred->compute_s},
                       {"comm_s", pred->comm_s}, {"detail", pred->detail}});
      }
    } else {
      ARCH_LOG_WARN("no planner prediction: {}", pred.status().message());
    }
  }

  TrainSummary summary;
  summary.first_step = start_step;
  int64_t last_ckpt_step = opt.resume ? start_step : -1;
  double step_time_sum = 0;
  int64_t steps_timed = 0;
  int64_t step = start_step;
  if (rank == 0) {
    ARCH_LOG_INFO("training {} parameters, {} steps from step {}, global batch {} x {} tokens over {} ({}), shares [{}]",
                  flat.numel(), tc.steps, start_step, tc.global_batch, T, world, dp->describe(),
                  fmt::join(shares, ","));
  }

  while (step < tc.steps) {
    const auto step_t0 = core::Clock::now();
    const int64_t step_us0 = core::wallMicros();
    const data::ShareRange mine = data::shareRange(shares, rank);
    const int64_t mb = tc.micro_batch > 0 ? tc.micro_batch : mine.count;
    int64_t group_samples = 0;
    for (int r : grad_ranks) group_samples += shares[static_cast<size_t>(r)];
    const double group_tokens = static_cast<double>(group_samples * T);
    double compute_s = 0, comm_s = 0, data_s = 0;

    flat.zeroGrad();
    double ce_sum = 0, aux_sum = 0;
    int64_t tokens = 0;
    data::Batch batch;
    {
      ScopedSpan span(&trace, TraceRecorder::kData, "batch", &data_s);
      batch = train_sampler.nextBatch(shares, rank);
    }
    const auto compute_t0 = core::Clock::now();
    {
      ScopedSpan span(&trace, TraceRecorder::kCompute, "forward+backward");
      for (int64_t off = 0; off < batch.n; off += mb) {
        const int64_t n = std::min(mb, batch.n - off);
        auto input = torch::from_blob(batch.input.data() + off * T, {n, T}, torch::kInt64);
        auto target = torch::from_blob(batch.target.data() + off * T, {n, T}, torch::kInt64);
        auto out = net->lossAndStats(input, target);
        auto loss = out.ce_sum / group_tokens;
        if (out.aux_loss.defined()) {
          loss = loss + out.aux_loss * (static_cast<double>(n) / static_cast<double>(group_samples));
          aux_sum += out.aux_loss.item<double>() * static_cast<double>(n);
        }
        if (off + mb >= batch.n) bucketer.arm();
        loss.backward();
        ce_sum += out.ce_sum.item<double>();
        tokens += out.tokens;
      }
    }
    compute_s = core::secondsSince(compute_t0);
    if (me.slowdown > 1.0) {
      // EMULATION: a device `slowdown` times slower takes that much longer.
      const double extra = (me.slowdown - 1.0) * compute_s;
      ScopedSpan span(&trace, TraceRecorder::kCompute, "emulated slowdown");
      std::this_thread::sleep_for(std::chrono::duration<double>(extra));
      compute_s += extra;
    }
    {
      ScopedSpan span(&trace, TraceRecorder::kComm, "gradient allreduce wait", &comm_s);
      ARCH_RETURN_IF_ERROR(bucketer.finish().withContext("step " + std::to_string(step)));
    }

    // Router-bias balancing uses the expert load of the gradient group.
    if (job.model.moe.num_experts > 0 && job.model.moe.balance == "router_bias") {
      torch::Tensor load = net->routerLoad().to(torch::kFloat64).contiguous();
      ARCH_RETURN_IF_ERROR(grad_dp->allreduceSum(std::span<double>(load.data_ptr<double>(), static_cast<size_t>(load.numel()))));
      net->updateRouterBias(load.to(torch::kInt64));
    }

    double grad_norm = 0;
    const double lr = learningRate(tc, step);
    {
      ScopedSpan span(&trace, TraceRecorder::kCompute, "optimizer");
      torch::NoGradGuard ng;
      grad_norm = flat.grads().norm().item<double>();
      if (tc.grad_clip > 0 && grad_norm > tc.grad_clip) flat.grads().mul_(tc.grad_clip / (grad_norm + 1e-6));
      auto p = flat.params().narrow(0, shard_begin, shard_end - shard_begin);
      adam.step(p, flat.grads().narrow(0, shard_begin, shard_end - shard_begin),
                flat.decayMask().narrow(0, shard_begin, shard_end - shard_begin), lr);
    }
    if (!shard_offsets.empty()) {
      ScopedSpan span(&trace, TraceRecorder::kComm, "parameter allgather", &comm_s);
      ARCH_RETURN_IF_ERROR(dp->allgatherSlices(
          std::span<float>(flat.params().data_ptr<float>(), static_cast<size_t>(flat.numel())), shard_offsets));
    }

    if (outer) {
      ScopedSpan span(&trace, TraceRecorder::kComm, "outer sync", &comm_s);
      ARCH_RETURN_IF_ERROR(outer->afterInnerStep(step + 1, flat.params(), tokens).withContext("outer sync"));
    }

    // Control values: loss, tokens, aux, stop request. They cross the
    // straits only where the world must agree: every step for sync; for
    // DiLoCo/streaming at outer-step boundaries (every inner_steps) and at
    // the end, so the strait is not crossed every inner step. In between
    // the loss is the island's and a stop request waits for the boundary.
    const bool want_stop = opt.stop && opt.stop->load();
    double ctrl[4] = {ce_sum, static_cast<double>(tokens), aux_sum, want_stop ? 1.0 : 0.0};
    {
      ScopedSpan span(&trace, TraceRecorder::kComm, "control allreduce", &comm_s);
      const bool world_boundary = !outer || (step + 1) % job.strategy.inner_steps == 0 || step + 1 == tc.steps;
      if (world_boundary) {
        ARCH_RETURN_IF_ERROR(dp->allreduceSum(ctrl));
      } else {
        ARCH_RETURN_IF_ERROR(grad_dp->allreduceSum(std::span<double>(ctrl, 3)));
        ctrl[3] = 0;
      }
    }
    const double loss = ctrl[1] > 0 ? ctrl[0] / ctrl[1] : 0.0;
    ++step;
    summary.losses.push_back(loss);

    rebalancer.observe(compute_s / static_cast<double>(std::max<int64_t>(1, batch.n)));
    std::vector<int64_t> old_shares = shares;
    if (rebalancer.due(step)) {
      ARCH_ASSIGN_OR_RETURN(auto ns, rebalancer.shares(dp, tc.global_batch));
      if (ns != shares) {
        shares = ns;
        if (rank == 0 && opt.write_metrics) {
          metrics.write({{"kind", "event"}, {"event", "rebalance"}, {"step", step},
                         {"detail", fmt::format("shares [{}] -> [{}]", fmt::join(old_shares, ","), fmt::join(shares, ","))}});
        }
      }
    }

    const double step_s = core::secondsSince(step_t0);
    if (step > start_step + 1) {  // the first step includes warm-up allocations
      step_time_sum += step_s;
      ++steps_timed;
    }
    if (opt.write_metrics && (step % tc.log_every == 0 || step == tc.steps)) {
      metrics.write({{"kind", "step"}, {"step", step}, {"rank", rank}, {"island", me.island}, {"epoch", 0},
                     {"loss", loss}, {"local_loss", tokens ? ce_sum / static_cast<double>(tokens) : 0.0},
                     {"lr", lr}, {"samples", batch.n}, {"tokens", tokens}, {"compute_s", compute_s},
                     {"comm_s", comm_s}, {"data_s", data_s}, {"step_s", step_s},
                     {"tokens_per_s", static_cast<double>(tokens) / step_s}, {"grad_norm", grad_norm},
                     {"slowdown", me.slowdown}, {"share", old_shares[static_cast<size_t>(rank)]}});
      if (rank == 0 && job.model.moe.num_experts > 0) {
        for (const auto& st : net->moeStats()) {
          metrics.write({{"kind", "moe"}, {"step", step}, {"rank", rank}, {"layer", st.layer},
                         {"tokens_per_expert", st.tokens_per_expert}, {"dropped", st.dropped},
                         {"capacity", st.capacity}, {"aux_loss", st.aux_loss}});
        }
      }
    }
    (void)step_us0;

    const bool stop_now = ctrl[3] > 0;
    const bool periodic = job.checkpoint.every > 0 && step % job.checkpoint.every == 0;
    const bool at_end = step == tc.steps || stop_now;
    // Replicas must be identical (outer syncs complete) before the final evaluation.
    if (outer && at_end) ARCH_RETURN_IF_ERROR(outer->finish(step, flat.params()));
    if (tc.eval_every > 0 && (step % tc.eval_every == 0 || at_end)) {
      ScopedSpan span(&trace, TraceRecorder::kCompute, "evaluation");
      ARCH_ASSIGN_OR_RETURN(double vl, evaluate());
      summary.final_val_loss = vl;
      if (rank == 0 && opt.write_metrics && vl >= 0) metrics.write({{"kind", "eval"}, {"step", step}, {"val_loss", vl}});
    }

    if (periodic || (at_end && job.checkpoint.at_exit)) {
      const auto c0 = core::Clock::now();
      ARCH_ASSIGN_OR_RETURN(auto snap, snapshot(step));
      if (rank == 0) {
        const double stall = core::secondsSince(c0);
        ckpt->submit(std::move(snap));
        if (!job.checkpoint.async || at_end) ARCH_RETURN_IF_ERROR(ckpt->drain());
        if (opt.write_metrics) {
          metrics.write({{"kind", "event"}, {"event", "checkpoint"}, {"step", step},
                         {"stall_s", stall}, {"detail", checkpointDirName(step)}});
        }
      }
      last_ckpt_step = step;
    }
    if (opt.exit_after_step >= 0 && step == opt.exit_after_step) {
      if (ckpt) (void)ckpt->drain();
      ARCH_LOG_WARN("test hook: exiting abruptly after step {}", step);
      std::_Exit(3);
    }
    if (stop_now) {
      summary.stopped_early = step < tc.steps;
      if (rank == 0) ARCH_LOG_WARN("stop requested: stopped after step {} (checkpoint written)", step);
      break;
    }
  }
  (void)last_ckpt_step;
  if (ckpt) ARCH_RETURN_IF_ERROR(ckpt->drain());

  summary.steps_done = step;
  summary.final_loss = summary.losses.empty() ? 0 : summary.losses.back();
  summary.wall_s = core::secondsSince(t_start);
  summary.mean_step_s = steps_timed > 0 ? step_time_sum / static_cast<double>(steps_timed) : 0;
  summary.predicted_step_s = predicted_step_s;
  if (rank == 0 && predicted_step_s > 0 && summary.mean_step_s > 0) {
    ARCH_LOG_INFO("step time: predicted {:.3f}s, measured {:.3f}s ({:+.0f}%)", predicted_step_s, summary.mean_step_s,
                  100.0 * (predicted_step_s - summary.mean_step_s) / summary.mean_step_s);
  }
  if (opt.write_metrics) {
    (void)trace.writeFile((fs::path(opt.run_dir) / "trace" / ("rank" + std::to_string(rank) + ".json")).string());
  }
  return summary;
}

}  // namespace archipelago::runtime
