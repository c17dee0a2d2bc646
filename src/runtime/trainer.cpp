#include "archipelago/runtime/trainer.h"

#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <mutex>
#include <set>
#include <thread>

#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/hash.h"
#include "archipelago/core/host_memory.h"
#include "archipelago/core/log.h"
#include "archipelago/core/shares.h"
#include "archipelago/data/dataset.h"
#include "archipelago/model/training.h"
#include "archipelago/model/transformer.h"
#include "archipelago/plan/local_predict.h"
#include "archipelago/runtime/calibrate.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/metrics.h"
#include "archipelago/runtime/outer_sync.h"
#include "archipelago/runtime/parallel_trainer.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;

namespace {
// CPU seconds of this thread or process (CLOCK_THREAD_CPUTIME_ID /
// CLOCK_PROCESS_CPUTIME_ID): with the wall time, how much of a phase ran
// and how much waited for a core (metrics; the local step prediction).
double cpuSeconds(clockid_t clock) {
  timespec ts{};
  ::clock_gettime(clock, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
// Minor page faults of this process so far (a fresh page touched: a
// growing heap, or memory the allocator returned and takes back).
int64_t minorFaults() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_minflt;
}
}  // namespace

namespace {

// Gradient buckets: contiguous ranges of the flat gradient buffer, formed
// from the last parameter backwards (the order backward produces gradients).
// A bucket's allreduce starts as soon as every parameter in it has its final
// gradient and every earlier bucket has started, so all ranks issue the
// same collectives in the same order even if their backward order differs.
class GradientBucketer {
 public:
  // `overlap`: start bucket reductions from gradient-ready hooks (needs a
  // group of more than one rank, now or after a membership change).
  GradientBucketer(FlatParams& flat, DpComm* dp, int64_t bucket_bytes, bool overlap) : flat_(flat), dp_(dp) {
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
    if (!overlap) return;  // nothing to overlap with
    std::vector<torch::Tensor> params;
    for (const auto& seg : segs) params.push_back(seg.param);
    hooks_ = std::make_unique<model::GradReadyHooks>(params, [this](size_t i) { onGradReady(i); });
  }

  size_t bucketCount() const { return buckets_.size(); }
  // The gradient group of the next steps (a new epoch's group).
  void setDp(DpComm* dp) {
    std::lock_guard<std::mutex> lock(mu_);
    dp_ = dp;
  }

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
  // period_mean: outer-step strategies (core::SpeedEstimate).
  Rebalancer(int64_t interval, bool period_mean) : interval_(interval), mine_(period_mean) {}
  void observe(double compute_s, int64_t samples) { mine_.observe(compute_s, samples); }
  bool due(int64_t step) const { return interval_ > 0 && step > 0 && step % interval_ == 0; }
  // Shares by slot: the members of `dp` (the ranks `members`, in group
  // order) split the global batch; every other slot gets 0. `current` (by
  // slot) is kept unless the new split is predicted clearly faster
  // (core::rebalancedShares, which the planner's replay uses too).
  core::Result<std::vector<int64_t>> shares(DpComm* dp, int64_t global_batch, const std::vector<int>& members,
                                            int slots, const std::vector<int64_t>& current) {
    std::vector<double> all(static_cast<size_t>(dp->size()));
    const double m = mine_.value();
    mine_.endPeriod();
    ARCH_RETURN_IF_ERROR(dp->allgather(std::span<const double>(&m, 1), all));
    std::vector<int64_t> cur;
    for (size_t i = 0; i < members.size(); ++i) {
      const auto slot = static_cast<size_t>(members[i]);
      cur.push_back(slot < current.size() ? current[slot] : 0);
    }
    ARCH_ASSIGN_OR_RETURN(auto sh, core::rebalancedShares(cur, all, global_batch));
    if (sh == cur) return current;
    std::vector<int64_t> out(static_cast<size_t>(slots), 0);
    for (size_t i = 0; i < members.size() && i < sh.size(); ++i) out[static_cast<size_t>(members[i])] = sh[i];
    return out;
  }

 private:
  int64_t interval_;
  core::SpeedEstimate mine_;
};

}  // namespace

namespace {

// Test hook of the integrity tests: ARCHIPELAGO_TEST_CORRUPT_PARAMS=RANK:STEP
// perturbs that rank's parameters right after that step (a silent
// divergence the replica check must find and repair).
std::pair<int, int64_t> corruptParamsHook() {
  const char* v = std::getenv("ARCHIPELAGO_TEST_CORRUPT_PARAMS");
  if (!v || !*v) return {-1, -1};
  int r = -1;
  long long s = -1;
  if (std::sscanf(v, "%d:%lld", &r, &s) != 2) return {-1, -1};
  return {r, static_cast<int64_t>(s)};
}

void hashTensor(core::Sha256& h, const torch::Tensor& t) {
  torch::Tensor c = t.contiguous();
  h.update(c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
}

// The trainer of one worker (one process). State that must be identical on
// every replica: flat parameters (+ model buffers), optimizer state, step,
// sampler position, outer-sync state. With an ElasticSession it also keeps
// the last committed step's copy of that state in memory, so a step that a
// failure interrupts is abandoned and retried in the next epoch.
class Trainer {
 public:
  explicit Trainer(const TrainerOptions& opt) : opt_(opt), job_(opt.job), tc_(job_.train) {}
  core::Result<TrainSummary> run();

 private:
  // ---- set-up ----
  core::Status setup();
  core::Status resumeFromCheckpoint();
  void bindComm();
  core::Status makeOuter(const NamedTensors* tensors, const nlohmann::json* state);
  // After a membership change: the strategy again, from the committed outer state.
  core::Status rebuildOuterFromCommit();
  core::Result<std::vector<int64_t>> initialShares() const;
  void predict();

  // ---- one step ----
  core::Status trainStep();
  core::Result<CheckpointState> snapshot(int64_t step);
  // DiLoCo / streaming checkpoints: the rank parts the writer's checkpoint
  // lists, and this rank's part cut from its snapshot (docs/runtime.md).
  nlohmann::json rankParts() const;
  CheckpointState rankPart(CheckpointState full) const;
  // The state of this rank's island and its residuals from the checkpoint's
  // rank parts, over what the writer's files hold (no-op for sync jobs).
  core::Status applyRankParts(const std::string& ckpt_dir, CheckpointState& ck);
  core::Result<double> evaluate();
  core::Status writeCheckpoint(bool at_end);

  // ---- elasticity ----
  bool elastic() const { return opt_.elastic != nullptr; }
  bool amWriter() const { return alive_.empty() || alive_.front() == rank_; }
  // Copies the replica state as the new rollback point; refresh_outer also
  // re-reads the outer sync's tensors (otherwise only when they may change).
  void commit(bool refresh_outer = false);
  void rollback();
  core::Status recover(const core::Status& cause);
  core::Status syncReplicas(const std::string& why);
  core::Status checkIntegrity();
  core::Status transferState(comm::Group& g, int donor, const std::vector<int>& receivers);
  std::string serializeState();
  core::Status applyState(const std::string& blob);
  core::Sha256Digest stateDigest(bool params_only);
  void event(const std::string& name, nlohmann::json fields);
  core::Status saveAndStop(const core::Status& why);
  core::Status enterNextEpoch(core::Status cause, const std::string& why, const std::function<void()>& on_epoch);

  TrainerOptions opt_;
  core::JobConfig job_;
  const core::TrainConfig& tc_;
  LocalDp local_;
  DpComm* dp_ = nullptr;       // world (alive ranks)
  DpComm* grad_dp_ = nullptr;  // gradient group (world or island)
  std::shared_ptr<comm::Group> world_group_;
  std::vector<int> alive_;       // slots alive in this epoch, ascending
  std::vector<int> grad_ranks_;  // slots whose samples make up one gradient
  int rank_ = 0;
  int world_ = 1;                // slots of the cluster spec (1: single process)
  std::vector<WorkerInfo> workers_;
  WorkerInfo me_;
  int64_t T_ = 0;

  std::unique_ptr<data::PreparedDataset> ds_;
  std::optional<data::Sampler> train_sampler_, val_sampler_;
  model::Transformer net_{nullptr};
  std::optional<FlatParams> flat_;
  std::vector<std::pair<std::string, torch::Tensor>> buffers_;  // model tensors that are not parameters
  std::unique_ptr<FlatAdamW> adam_;
  int64_t shard_begin_ = 0, shard_end_ = 0;
  std::vector<int64_t> shard_offsets_;
  std::vector<int64_t> shares_;
  std::unique_ptr<OuterSync> outer_;
  bool exact_outer_ = true;  // outer state can be committed per step (nothing in flight between steps)
  std::vector<Fragment> outer_frags_;
  std::unique_ptr<GradientBucketer> bucketer_;
  std::unique_ptr<Rebalancer> rebalancer_;

  MetricsSink metrics_;
  TraceRecorder trace_;
  std::unique_ptr<CheckpointWriter> ckpt_;
  std::string job_yaml_;
  double predicted_step_s_ = 0;

  int64_t start_step_ = 0;
  int64_t step_ = 0;
  bool has_state_ = true;  // false for a joiner until a peer sent the state
  bool stop_now_ = false;
  bool epoch_pending_ = false;
  TrainSummary summary_;
  double step_time_sum_ = 0;
  int64_t steps_timed_ = 0;
  int64_t integrity_every_ = 0;
  std::pair<int, int64_t> corrupt_hook_{-1, -1};

  // The last committed step (elastic runs).
  struct Commit {
    int64_t step = -1;
    int64_t position = 0;
    int64_t adam_t = 0;
    std::vector<int64_t> shares;
    size_t losses = 0;
    torch::Tensor params, m, v;
    std::vector<torch::Tensor> buffers;
    NamedTensors outer_tensors;
    nlohmann::json outer_json;
    bool outer_valid = false;
  } commit_;
  // Recovery bookkeeping for events.
  double commit_s_ = 0;         // time the last commit() took (the elastic bookkeeping per step)
  double failure_at_ = 0;       // wall seconds the step failed
  int64_t failed_step_ = -1;
  bool first_step_after_change_ = false;
  int64_t warm_from_ = 0;  // step of the last start or membership change (the rebalancer's warm-up counts from it)
};

double wallSeconds() { return static_cast<double>(core::wallMicros()) / 1e6; }

core::Result<std::vector<int64_t>> Trainer::initialShares() const {
  if (world_ == 1) return std::vector<int64_t>{tc_.global_batch};
  std::vector<double> w;
  for (int r : alive_) w.push_back(core::initialShareWeight(tc_, workers_[static_cast<size_t>(r)]));
  ARCH_ASSIGN_OR_RETURN(auto sh, core::sharesFromWeights(w, tc_.global_batch));
  std::vector<int64_t> out(static_cast<size_t>(world_), 0);
  for (size_t i = 0; i < alive_.size(); ++i) out[static_cast<size_t>(alive_[i])] = sh[i];
  return out;
}

void Trainer::bindComm() {
  if (elastic()) {
    ElasticSession& e = *opt_.elastic;
    dp_ = e.dp();
    grad_dp_ = e.inner() ? static_cast<DpComm*>(e.inner()) : dp_;
    world_group_ = e.worldGroup();
    alive_ = e.alive();
    grad_ranks_ = e.inner() ? e.innerRanks() : alive_;
  } else {
    dp_ = opt_.dp ? opt_.dp : &local_;
    grad_dp_ = opt_.inner ? opt_.inner : dp_;
    world_group_ = opt_.world_group;
    alive_.clear();
    for (int r = 0; r < dp_->size(); ++r) alive_.push_back(r);
    grad_ranks_ = opt_.inner_ranks.empty() ? alive_ : opt_.inner_ranks;
  }
  if (bucketer_) bucketer_->setDp(grad_dp_);
}

core::Status Trainer::setup() {
  if (elastic()) {
    rank_ = opt_.elastic->rank();
    world_ = opt_.elastic->slots();
  } else {
    DpComm* dp = opt_.dp ? opt_.dp : &local_;
    rank_ = dp->rank();
    world_ = dp->size();
  }
  workers_ = workersOf(job_.cluster);
  if (static_cast<int>(workers_.size()) != world_ && world_ != 1) {
    return core::invalidArgument("the cluster spec has " + std::to_string(workers_.size()) +
                                 " workers but the communicator has " + std::to_string(world_));
  }
  me_ = world_ == 1 && workers_.size() != 1 ? WorkerInfo{} : workers_[static_cast<size_t>(rank_)];
  bindComm();
  model::setComputeThreads(tc_.threads_per_worker);
  core::holdFreedMemory();

  // ---- data ----
  ARCH_ASSIGN_OR_RETURN(ds_, data::PreparedDataset::open(job_.data.dir));
  if (job_.model.vocab_size == 0) job_.model.vocab_size = ds_->vocabSize();
  if (job_.model.vocab_size < ds_->vocabSize()) {
    return core::invalidArgument("model.vocab_size is " + std::to_string(job_.model.vocab_size) +
                                 " but the data in '" + job_.data.dir + "' uses " + std::to_string(ds_->vocabSize()) +
                                 " token ids; set model.vocab_size: 0 to take it from the data");
  }
  T_ = job_.data.seq_len;
  ARCH_ASSIGN_OR_RETURN(auto ts, ds_->trainSampler(static_cast<uint64_t>(job_.data.seed), T_));
  train_sampler_.emplace(std::move(ts));
  if (tc_.eval_every > 0) {
    auto vs = ds_->valSampler(T_);
    if (vs.isOk()) val_sampler_.emplace(std::move(vs).value());
    else ARCH_LOG_WARN("no validation: {}", vs.status().message());
  }

  // ---- model and optimizer ----
  ARCH_ASSIGN_OR_RETURN(net_, model::buildModel(job_.model, static_cast<uint64_t>(tc_.seed)));
  flat_.emplace(FlatParams::bind(net_->namedParameters()));
  {
    std::set<std::string> params;
    for (const auto& seg : flat_->segments()) params.insert(seg.name);
    for (auto& [name, t] : net_->namedTensors()) {
      if (!params.count(name)) buffers_.push_back({name, t});
    }
  }
  shard_begin_ = 0;
  shard_end_ = flat_->numel();
  if (tc_.shard_optimizer && world_ > 1 && opt_.inner) {
    ARCH_LOG_WARN("train.shard_optimizer is ignored with strategy {} (optimizer state stays per island)", job_.strategy.kind);
  } else if (tc_.shard_optimizer && world_ > 1 && elastic()) {
    ARCH_LOG_WARN("train.shard_optimizer: optimizer shards cannot survive a lost worker; a failure restarts the job "
                  "from its newest checkpoint instead of continuing elastically");
    for (int r = 0; r <= world_; ++r) shard_offsets_.push_back(flat_->numel() * r / world_);
  } else if (tc_.shard_optimizer && world_ > 1) {
    for (int r = 0; r <= world_; ++r) shard_offsets_.push_back(flat_->numel() * r / world_);
  }
  if (!shard_offsets_.empty()) {
    shard_begin_ = shard_offsets_[static_cast<size_t>(rank_)];
    shard_end_ = shard_offsets_[static_cast<size_t>(rank_) + 1];
  }
  adam_ = std::make_unique<FlatAdamW>(tc_, shard_begin_, shard_end_);
  ARCH_ASSIGN_OR_RETURN(shares_, initialShares());

  if (opt_.resume && has_state_) ARCH_RETURN_IF_ERROR(resumeFromCheckpoint());

  // ---- strategy ----
  if (job_.strategy.kind != "sync") {
    const auto& s = job_.strategy;
    exact_outer_ = !(s.kind == "streaming" && s.overlap_steps > 0);
    std::vector<int64_t> offsets;
    for (const auto& seg : flat_->segments()) offsets.push_back(seg.offset);
    auto fr = fragmentSchedule(flat_->numel(), s.kind == "streaming" ? s.fragments : 1, s.inner_steps, offsets);
    if (fr.isOk()) outer_frags_ = *fr;
    if (!has_state_) {
      // A joiner's outer sync is built after the state arrived.
    } else if (opt_.resume) {
      ARCH_ASSIGN_OR_RETURN(auto latest, latestValidCheckpoint(opt_.run_dir));
      ARCH_ASSIGN_OR_RETURN(auto ck, loadCheckpoint(latest));
      ARCH_RETURN_IF_ERROR(applyRankParts(latest, ck));
      NamedTensors outer_tensors;
      for (const auto& [name, t] : ck.optimizer) {
        if (name.rfind("outer.", 0) == 0) outer_tensors.push_back({name.substr(6), t});
      }
      nlohmann::json st = ck.extra.value("outer", nlohmann::json());
      ARCH_RETURN_IF_ERROR(makeOuter(&outer_tensors, &st));
    } else {
      ARCH_RETURN_IF_ERROR(makeOuter(nullptr, nullptr));
    }
  }

  // ---- run directory outputs ----
  trace_.setProcess(rank_, "rank " + std::to_string(rank_) + " (" + me_.island + ", " + me_.device + ")");
  if (opt_.write_metrics) {
    std::error_code ec;
    fs::create_directories(fs::path(opt_.run_dir) / "trace", ec);
    ARCH_RETURN_IF_ERROR(metrics_.open((fs::path(opt_.run_dir) / "metrics.jsonl").string()));
  }
  job_yaml_ = core::dumpJobYaml(job_);
  bucketer_ = std::make_unique<GradientBucketer>(*flat_, grad_dp_, static_cast<int64_t>(job_.strategy.bucket_bytes),
                                                 elastic() ? world_ > 1 : grad_dp_->size() > 1);
  // Shares are re-derived every 5 steps; with DiLoCo/streaming at outer-step
  // boundaries only (the speed allgather crosses the straits).
  rebalancer_ = std::make_unique<Rebalancer>(
      core::rebalanceInterval(tc_.rebalance, world_, outer_ != nullptr, job_.strategy.inner_steps), outer_ != nullptr);
  integrity_every_ = job_.checkpoint.every > 0 ? job_.checkpoint.every : 50;
  corrupt_hook_ = corruptParamsHook();
  if (elastic()) {
    commit_.params = torch::empty_like(flat_->params());
    commit_.m = torch::empty_like(adam_->expAvg());
    commit_.v = torch::empty_like(adam_->expAvgSq());
    for (auto& [name, t] : buffers_) commit_.buffers.push_back(torch::empty_like(t));
  }
  return core::okStatus();
}

core::Status Trainer::resumeFromCheckpoint() {
  std::vector<std::pair<std::string, std::string>> refused;
  auto latest = latestValidCheckpoint(opt_.run_dir, &refused);
  if (!latest.isOk()) return latest.status().withContext("cannot resume");
  ARCH_ASSIGN_OR_RETURN(auto ck, loadCheckpoint(*latest));
  ARCH_RETURN_IF_ERROR(applyRankParts(*latest, ck));
  std::map<std::string, torch::Tensor> by_name(ck.weights.begin(), ck.weights.end());
  torch::NoGradGuard ng;
  for (const auto& seg : flat_->segments()) {
    auto it = by_name.find(seg.name);
    if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + seg.name + "'");
    if (it->second.sizes().vec() != seg.shape) {
      return core::dataLoss("checkpoint " + *latest + " tensor '" + seg.name + "' has another shape than the model");
    }
    flat_->params().narrow(0, seg.offset, seg.numel).copy_(it->second.reshape({-1}));
  }
  std::map<std::string, torch::Tensor> opt_by_name(ck.optimizer.begin(), ck.optimizer.end());
  if (!opt_by_name.count("exp_avg") || !opt_by_name.count("exp_avg_sq") ||
      opt_by_name["exp_avg"].numel() != flat_->numel()) {
    return core::dataLoss("checkpoint " + *latest + " optimizer state does not match the model");
  }
  adam_->expAvg().copy_(opt_by_name["exp_avg"].narrow(0, shard_begin_, shard_end_ - shard_begin_));
  adam_->expAvgSq().copy_(opt_by_name["exp_avg_sq"].narrow(0, shard_begin_, shard_end_ - shard_begin_));
  adam_->setStepCount(ck.optimizer_step);
  for (auto& [name, t] : buffers_) {
    auto it = by_name.find(name);
    if (it != by_name.end() && it->second.sizes() == t.sizes()) t.copy_(it->second);
  }
  train_sampler_->setPosition(ck.data_position);
  // The checkpoint's shares only if it was taken with the same membership.
  if (ck.shares.size() == shares_.size() && std::all_of(ck.shares.begin(), ck.shares.end(), [](int64_t x) { return x > 0; }) &&
      static_cast<int>(alive_.size()) == world_) {
    shares_ = ck.shares;
  }
  start_step_ = ck.step;
  if (rank_ == 0) {
    ARCH_LOG_INFO("resumed from {} (step {}, data position {}){}", *latest, ck.step, ck.data_position,
                  refused.empty() ? "" : fmt::format("; refused {} newer checkpoint(s)", refused.size()));
  }
  return core::okStatus();
}

core::Status Trainer::applyRankParts(const std::string& ckpt_dir, CheckpointState& ck) {
  if (!ck.extra.is_object() || !ck.extra.contains("parts")) return core::okStatus();
  const auto parts = ck.extra["parts"];
  std::map<int, CheckpointState> loaded;
  auto part = [&](int r) -> core::Result<CheckpointState*> {
    if (!loaded.count(r)) {
      ARCH_ASSIGN_OR_RETURN(auto p, loadCheckpointPart(ckpt_dir, r));
      loaded[r] = std::move(p);
    }
    return &loaded[r];
  };
  for (const auto& p : parts) {
    const int r = p.value("rank", -1);
    if (p.value("island_state", false) && p.value("island", std::string()) == me_.island) {
      // This island's weights and moments between outer steps.
      ARCH_ASSIGN_OR_RETURN(CheckpointState* isl, part(r));
      NamedTensors weights;
      std::map<std::string, torch::Tensor> moments;
      for (const auto& [name, t] : isl->optimizer) {
        if (name.rfind("model.", 0) == 0) weights.push_back({name.substr(6), t});
        else if (name == "exp_avg" || name == "exp_avg_sq") moments[name] = t;
      }
      if (weights.size() != ck.weights.size() || moments.size() != 2) {
        return core::dataLoss("checkpoint " + ckpt_dir + ": the part of rank " + std::to_string(r) +
                              " does not hold island '" + me_.island + "''s whole state");
      }
      ck.weights = std::move(weights);
      for (auto& [name, t] : ck.optimizer) {
        if (moments.count(name)) t = moments[name];
      }
      ck.optimizer_step = isl->optimizer_step;
    }
    if (r == rank_) {
      ARCH_ASSIGN_OR_RETURN(CheckpointState* mine, part(r));
      for (const auto& [name, t] : mine->optimizer) {
        if (name.rfind("outer.ef.", 0) == 0) ck.optimizer.push_back({name, t});
      }
      if (mine->extra.is_object() && mine->extra.contains("outer")) ck.extra["outer"] = mine->extra["outer"];
    }
  }
  return core::okStatus();
}

core::Status Trainer::makeOuter(const NamedTensors* tensors, const nlohmann::json* state) {
  outer_.reset();
  OuterContext ctx;
  ctx.job = &job_;
  ctx.rank = rank_;
  ctx.world = world_;
  for (const auto& w : workers_) ctx.island_of_rank.push_back(w.island_index);
  ctx.world_group = world_group_;
  ctx.run_dir = opt_.run_dir;
  for (const auto& seg : flat_->segments()) ctx.segment_offsets.push_back(seg.offset);
  ARCH_ASSIGN_OR_RETURN(outer_, makeOuterSync(ctx, flat_->params()));
  if (tensors && state) ARCH_RETURN_IF_ERROR(outer_->restore(*tensors, *state));
  return core::okStatus();
}

void Trainer::predict() {
  // Rank 0 at the start of a job only (a joiner must not keep the others waiting).
  if (rank_ != 0 || !has_state_ || (elastic() && opt_.elastic->joined())) return;
  const int64_t rows = std::max<int64_t>(1, *std::max_element(shares_.begin(), shares_.end())) * T_;
  const std::string kind = me_.device.empty() ? "cpu" : me_.device;
  auto profile = calibrateLocalMatmuls(job_.model, rows, kind);
  {
    // The job's own model parts at the smallest and largest micro-batch the workers run.
    std::vector<int64_t> sizes;
    for (int64_t s : shares_) sizes.push_back(job_.train.micro_batch > 0 ? std::min(job_.train.micro_batch, s) : s);
    const auto [lo, hi] = std::minmax_element(sizes.begin(), sizes.end());
    const core::Status st = calibrateLocalModel(job_, {*lo, *hi == *lo ? std::max<int64_t>(1, *hi / 2) : *hi}, kind, profile);
    if (!st.isOk()) ARCH_LOG_WARN("model calibration: {}", st.message());
  }
  if (elastic()) {
    // Every worker's per-step commit (the rollback copy, before its compute);
    // the loop commits this same state again before the first step.
    std::vector<double> t;
    for (int i = 0; i < 5; ++i) {
      const auto w0 = core::Clock::now();
      const double c0 = cpuSeconds(CLOCK_THREAD_CPUTIME_ID);
      commit();
      t.push_back(tc_.threads_per_worker == 1 ? cpuSeconds(CLOCK_THREAD_CPUTIME_ID) - c0 : core::secondsSince(w0));
    }
    std::sort(t.begin(), t.end());
    profile.device(kind).step_overhead_s = t[t.size() / 2];
  }
  (void)profile.save((fs::path(opt_.run_dir) / "calibration.json").string());
  auto catalog = plan::DeviceCatalog::builtin();
  auto pred = catalog.isOk() ? plan::predictStepTime(job_, job_.model.vocab_size, *catalog, &profile)
                             : core::Result<plan::StepPrediction>(catalog.status());
  if (pred.isOk()) {
    predicted_step_s_ = pred->total_s;
    ARCH_LOG_INFO("planner prediction: {:.3f}s/step ({})", pred->total_s, pred->detail);
    if (opt_.write_metrics) {
      metrics_.write({{"kind", "prediction"}, {"predicted_step_s", pred->total_s}, {"compute_s", pred->compute_s},
                      {"comm_s", pred->comm_s}, {"detail", pred->detail}});
    }
  } else {
    ARCH_LOG_WARN("no planner prediction: {}", pred.status().message());
  }
}

core::Result<CheckpointState> Trainer::snapshot(int64_t step) {
  CheckpointState s;
  s.step = step;
  s.data_position = train_sampler_->position();
  s.shares = shares_;
  s.optimizer_step = adam_->stepCount();
  s.job_yaml = job_yaml_;
  s.model = job_.model;
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& w : workers_) {
    const bool alive = std::find(alive_.begin(), alive_.end(), w.rank) != alive_.end();
    ranks.push_back({{"rank", w.rank}, {"island", w.island}, {"slowdown", w.slowdown}, {"alive", alive}});
  }
  s.membership = {{"world", world_}, {"epoch", elastic() ? opt_.elastic->epoch() : 0}, {"ranks", ranks}};
  torch::Tensor m = torch::zeros({flat_->numel()});
  torch::Tensor v = torch::zeros({flat_->numel()});
  m.narrow(0, shard_begin_, shard_end_ - shard_begin_).copy_(adam_->expAvg());
  v.narrow(0, shard_begin_, shard_end_ - shard_begin_).copy_(adam_->expAvgSq());
  if (!shard_offsets_.empty()) {
    ARCH_RETURN_IF_ERROR(dp_->allgatherSlices(std::span<float>(m.data_ptr<float>(), static_cast<size_t>(m.numel())), shard_offsets_));
    ARCH_RETURN_IF_ERROR(dp_->allgatherSlices(std::span<float>(v.data_ptr<float>(), static_cast<size_t>(v.numel())), shard_offsets_));
  }
  s.optimizer = {{"exp_avg", m}, {"exp_avg_sq", v}};
  if (outer_) {
    for (const auto& [name, t] : outer_->stateTensors()) s.optimizer.push_back({"outer." + name, t.detach().clone()});
    s.extra["outer"] = outer_->stateJson();
    s.extra["parts"] = rankParts();
  }
  for (auto& [name, t] : net_->namedTensors()) s.weights.push_back({name, t.detach().clone()});
  return s;
}

nlohmann::json Trainer::rankParts() const {
  // Every rank but the writer holds residuals of its own; the first alive
  // rank of every island other than the writer's also holds that island's
  // weights and moments (the island's ranks agree on them).
  std::vector<int> ranks = alive_;
  if (ranks.empty()) for (int r = 0; r < world_; ++r) ranks.push_back(r);
  const int writer = ranks.front();
  const int writer_island = workers_[static_cast<size_t>(writer)].island_index;
  std::set<int> led;
  nlohmann::json parts = nlohmann::json::array();
  for (int r : ranks) {
    if (r == writer) continue;
    const int island = workers_[static_cast<size_t>(r)].island_index;
    const bool leads = island != writer_island && led.insert(island).second;
    parts.push_back({{"rank", r}, {"island", workers_[static_cast<size_t>(r)].island}, {"island_state", leads}});
  }
  return parts;
}

CheckpointState Trainer::rankPart(CheckpointState full) const {
  CheckpointState part;
  part.step = full.step;
  part.part_rank = rank_;
  part.optimizer_step = full.optimizer_step;
  bool leads = false;
  for (const auto& p : full.extra.value("parts", nlohmann::json::array())) {
    if (p.value("rank", -1) == rank_) leads = p.value("island_state", false);
  }
  // The outer sync's counters (tokens this island trained since each
  // fragment's last sync) are the island's own too.
  part.extra = {{"island", me_.island}, {"island_state", leads}, {"outer", full.extra.value("outer", nlohmann::json())}};
  const std::string mine = "outer.ef.r" + std::to_string(rank_) + ".";
  for (auto& [name, t] : full.optimizer) {
    if (name.rfind(mine, 0) == 0 || (leads && (name == "exp_avg" || name == "exp_avg_sq"))) {
      part.optimizer.push_back({name, std::move(t)});
    }
  }
  if (leads) {
    for (auto& [name, t] : full.weights) part.optimizer.push_back({"model." + name, std::move(t)});
  }
  return part;
}

core::Result<double> Trainer::evaluate() {
  if (!val_sampler_) return -1.0;
  torch::NoGradGuard ng;
  double acc[2] = {0, 0};
  for (int64_t i = 0; i < tc_.eval_batches; ++i) {
    auto b = val_sampler_->batchAt(i * tc_.global_batch, shares_, rank_);
    if (b.n == 0) continue;
    auto out = net_->lossAndStats(toTensor(b.input, b.n, T_), toTensor(b.target, b.n, T_));
    acc[0] += out.ce_sum.item<double>();
    acc[1] += static_cast<double>(out.tokens);
  }
  ARCH_RETURN_IF_ERROR(dp_->allreduceSum(acc));
  return acc[1] > 0 ? acc[0] / acc[1] : -1.0;
}

core::Status Trainer::writeCheckpoint(bool at_end) {
  const auto c0 = core::Clock::now();
  ARCH_ASSIGN_OR_RETURN(auto snap, snapshot(step_));
  if (!amWriter() && outer_) {
    // DiLoCo / streaming: this rank's part of the checkpoint (docs/runtime.md).
    if (!ckpt_) ckpt_ = std::make_unique<CheckpointWriter>(opt_.run_dir, job_.checkpoint.keep_last);
    ckpt_->submit(rankPart(std::move(snap)));
    if (!job_.checkpoint.async || at_end) ARCH_RETURN_IF_ERROR(ckpt_->drain());
  } else if (amWriter()) {
    const double stall = core::secondsSince(c0);
    if (!ckpt_) ckpt_ = std::make_unique<CheckpointWriter>(opt_.run_dir, job_.checkpoint.keep_last);
    ckpt_->submit(std::move(snap));
    if (!job_.checkpoint.async || at_end) ARCH_RETURN_IF_ERROR(ckpt_->drain());
    if (opt_.write_metrics) {
      metrics_.write({{"kind", "event"}, {"event", "checkpoint"}, {"step", step_}, {"stall_s", stall},
                      {"detail", checkpointDirName(step_)}});
    }
  }
  return core::okStatus();
}

void Trainer::event(const std::string& name, nlohmann::json fields) {
  if (!opt_.write_metrics) return;
  fields["kind"] = "event";
  fields["event"] = name;
  if (!fields.contains("step")) fields["step"] = step_;
  if (!fields.contains("rank")) fields["rank"] = rank_;
  if (elastic() && !fields.contains("epoch")) fields["epoch"] = opt_.elastic->epoch();
  metrics_.write(std::move(fields));
}

// ---- one training step --------------------------------------------------------

core::Status Trainer::trainStep() {
  const auto step_t0 = core::Clock::now();
  const double step_cpu0 = cpuSeconds(CLOCK_PROCESS_CPUTIME_ID);
  const int64_t step_faults0 = minorFaults();
  const data::ShareRange mine = data::shareRange(shares_, rank_);
  const int64_t mb = tc_.micro_batch > 0 ? tc_.micro_batch : std::max<int64_t>(1, mine.count);
  int64_t group_samples = 0;
  for (int r : grad_ranks_) group_samples += shares_[static_cast<size_t>(r)];
  const double group_tokens = static_cast<double>(std::max<int64_t>(1, group_samples) * T_);
  double compute_s = 0, comm_s = 0, data_s = 0, optimizer_s = 0;
  const int64_t step = step_;

  flat_->zeroGrad();
  double ce_sum = 0, aux_sum = 0;
  int64_t tokens = 0;
  data::Batch batch;
  {
    ScopedSpan span(&trace_, TraceRecorder::kData, "batch", &data_s);
    batch = train_sampler_->nextBatch(shares_, rank_);
  }
  const auto compute_t0 = core::Clock::now();
  const double compute_cpu0 = cpuSeconds(CLOCK_THREAD_CPUTIME_ID);
  {
    ScopedSpan span(&trace_, TraceRecorder::kCompute, "forward+backward");
    if (batch.n == 0) bucketer_->arm();
    for (int64_t off = 0; off < batch.n; off += mb) {
      const int64_t n = std::min(mb, batch.n - off);
      auto input = torch::from_blob(batch.input.data() + off * T_, {n, T_}, torch::kInt64);
      auto target = torch::from_blob(batch.target.data() + off * T_, {n, T_}, torch::kInt64);
      auto out = net_->lossAndStats(input, target);
      auto loss = out.ce_sum / group_tokens;
      if (out.aux_loss.defined()) {
        loss = loss + out.aux_loss * (static_cast<double>(n) / static_cast<double>(group_samples));
        aux_sum += out.aux_loss.item<double>() * static_cast<double>(n);
      }
      if (off + mb >= batch.n) bucketer_->arm();
      loss.backward();
      ce_sum += out.ce_sum.item<double>();
      tokens += out.tokens;
    }
  }
  compute_s = core::secondsSince(compute_t0);
  const double compute_cpu_s = cpuSeconds(CLOCK_THREAD_CPUTIME_ID) - compute_cpu0;
  if (me_.slowdown > 1.0) {
    // EMULATION: a device `slowdown` times slower takes that much longer.
    const double extra = (me_.slowdown - 1.0) * compute_s;
    ScopedSpan span(&trace_, TraceRecorder::kCompute, "emulated slowdown");
    std::this_thread::sleep_for(std::chrono::duration<double>(extra));
    compute_s += extra;
  }
  {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "gradient allreduce wait", &comm_s);
    ARCH_RETURN_IF_ERROR(bucketer_->finish().withContext("step " + std::to_string(step)));
  }

  // Router-bias balancing uses the expert load of the gradient group.
  if (job_.model.moe.num_experts > 0 && job_.model.moe.balance == "router_bias") {
    torch::Tensor load = net_->routerLoad().to(torch::kFloat64).contiguous();
    ARCH_RETURN_IF_ERROR(grad_dp_->allreduceSum(std::span<double>(load.data_ptr<double>(), static_cast<size_t>(load.numel()))));
    net_->updateRouterBias(load.to(torch::kInt64));
  }

  double grad_norm = 0;
  const double lr = learningRate(tc_, step);
  {
    ScopedSpan span(&trace_, TraceRecorder::kCompute, "optimizer", &optimizer_s);
    torch::NoGradGuard ng;
    grad_norm = flat_->grads().norm().item<double>();
    if (tc_.grad_clip > 0 && grad_norm > tc_.grad_clip) flat_->grads().mul_(tc_.grad_clip / (grad_norm + 1e-6));
    auto p = flat_->params().narrow(0, shard_begin_, shard_end_ - shard_begin_);
    adam_->step(p, flat_->grads().narrow(0, shard_begin_, shard_end_ - shard_begin_),
                flat_->decayMask().narrow(0, shard_begin_, shard_end_ - shard_begin_), lr);
  }
  if (!shard_offsets_.empty()) {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "parameter allgather", &comm_s);
    ARCH_RETURN_IF_ERROR(dp_->allgatherSlices(
        std::span<float>(flat_->params().data_ptr<float>(), static_cast<size_t>(flat_->numel())), shard_offsets_));
  }

  // Control values: loss, tokens, aux, stop request, "a newer epoch is
  // published". They cross the straits only where the world must agree:
  // every step for sync; for DiLoCo/streaming at outer-step boundaries
  // (every inner_steps) and at the end, so the strait is not crossed every
  // inner step. In between the loss is the island's, a stop request waits
  // for the boundary, and a new epoch is entered island by island. Without
  // elasticity the boundary's values ride along with the outer exchange
  // (fragment 0 is due there) instead of an allreduce of their own: DiLoCo
  // gets them in the same step, streaming overlap_steps later.
  const bool want_stop = opt_.stop && opt_.stop->load();
  const bool pending = elastic() && opt_.elastic->newEpochPending();
  double ctrl[5] = {ce_sum, static_cast<double>(tokens), aux_sum, pending ? 1.0 : 0.0, want_stop ? 1.0 : 0.0};
  const bool outer_boundary = outer_ && (step + 1) % job_.strategy.inner_steps == 0;
  const bool carried = outer_boundary && !elastic() && step + 1 < tc_.steps;
  if (carried) {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "control allreduce", &comm_s);
    ARCH_RETURN_IF_ERROR(grad_dp_->allreduceSum(std::span<double>(ctrl, 5)));
    outer_->attachControl(std::span<const double>(ctrl, 5));
    ctrl[4] = 0;  // the island's; the world's arrives with the outer result
  }
  if (outer_) {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "outer sync", &comm_s);
    ARCH_RETURN_IF_ERROR(outer_->afterInnerStep(step + 1, flat_->params(), tokens).withContext("outer sync"));
  }
  {
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
  }
  const double loss = ctrl[1] > 0 ? ctrl[0] / ctrl[1] : 0.0;
  ++step_;
  summary_.losses.push_back(loss);

  // The first steps after a start or a membership change are not a speed:
  // a fresh process's heap is still growing (measured: a worker's second
  // step took 2x the CPU time of its fourth). Counted, they moved shares
  // of two equal workers from 8/8 to 9/7 for up to 20 steps.
  if (batch.n > 0 && step_ > warm_from_ + core::kRebalanceWarmupSteps) {
    rebalancer_->observe(compute_s, batch.n);
  }
  std::vector<int64_t> old_shares = shares_;
  if (rebalancer_->due(step_)) {
    ARCH_ASSIGN_OR_RETURN(auto ns, rebalancer_->shares(dp_, tc_.global_batch, alive_, world_, shares_));
    if (ns != shares_) {
      shares_ = ns;
      if (amWriter() && opt_.write_metrics) {
        metrics_.write({{"kind", "event"}, {"event", "rebalance"}, {"step", step_},
                        {"detail", fmt::format("shares [{}] -> [{}]", fmt::join(old_shares, ","), fmt::join(shares_, ","))}});
      }
    }
  }

  const double step_s = core::secondsSince(step_t0);
  if (step_ > start_step_ + 1 && !first_step_after_change_) {  // warm-up and recovery steps are not typical
    step_time_sum_ += step_s;
    ++steps_timed_;
  }
  if (opt_.write_metrics && (step_ % tc_.log_every == 0 || step_ == tc_.steps || first_step_after_change_)) {
    metrics_.write({{"kind", "step"}, {"step", step_}, {"rank", rank_}, {"island", me_.island},
                    {"epoch", elastic() ? opt_.elastic->epoch() : 0},
                    {"loss", loss}, {"local_loss", tokens ? ce_sum / static_cast<double>(tokens) : 0.0},
                    {"lr", lr}, {"samples", batch.n}, {"tokens", tokens}, {"compute_s", compute_s},
                    {"comm_s", comm_s}, {"data_s", data_s}, {"optimizer_s", optimizer_s}, {"step_s", step_s},
                    {"compute_cpu_s", compute_cpu_s}, {"cpu_s", cpuSeconds(CLOCK_PROCESS_CPUTIME_ID) - step_cpu0},
                    {"minor_faults", minorFaults() - step_faults0},
                    {"tokens_per_s", static_cast<double>(tokens) / step_s}, {"grad_norm", grad_norm},
                    {"slowdown", me_.slowdown}, {"share", old_shares[static_cast<size_t>(rank_)]},
                    {"commit_s", commit_s_}});
    if (rank_ == 0 && job_.model.moe.num_experts > 0) {
      for (const auto& st : net_->moeStats()) {
        metrics_.write({{"kind", "moe"}, {"step", step_}, {"rank", rank_}, {"layer", st.layer},
                        {"tokens_per_expert", st.tokens_per_expert}, {"dropped", st.dropped},
                        {"capacity", st.capacity}, {"aux_loss", st.aux_loss}});
      }
    }
  }
  if (first_step_after_change_) {
    first_step_after_change_ = false;
    if (failure_at_ > 0 && amWriter()) {
      event("recovered", {{"detail", fmt::format("first step completed {:.2f} s after the failure in step {}",
                                                 wallSeconds() - failure_at_, failed_step_ + 1)},
                          {"recovery_s", wallSeconds() - failure_at_}});
    }
    failure_at_ = 0;
  }

  // Test hook: a silent divergence of one replica.
  if (corrupt_hook_.first == rank_ && corrupt_hook_.second == step_) {
    torch::NoGradGuard ng;
    flat_->params().narrow(0, 0, std::min<int64_t>(64, flat_->numel())).add_(1e-2);
    ARCH_LOG_WARN("test hook: perturbed this replica's parameters after step {}", step_);
  }

  epoch_pending_ = ctrl[3] > 0;
  stop_now_ = ctrl[4] > 0;
  const bool periodic = job_.checkpoint.every > 0 && step_ % job_.checkpoint.every == 0;
  const bool at_end = step_ == tc_.steps || stop_now_;
  const bool world_boundary = !outer_ || step_ % job_.strategy.inner_steps == 0 || at_end;
  if (elastic() && world_boundary && (step_ % integrity_every_ == 0 || at_end)) ARCH_RETURN_IF_ERROR(checkIntegrity());
  // Replicas must be identical (outer syncs complete) before the final evaluation.
  if (outer_ && at_end) ARCH_RETURN_IF_ERROR(outer_->finish(step_, flat_->params()));
  if (tc_.eval_every > 0 && (step_ % tc_.eval_every == 0 || at_end)) {
    ScopedSpan span(&trace_, TraceRecorder::kCompute, "evaluation");
    ARCH_ASSIGN_OR_RETURN(double vl, evaluate());
    summary_.final_val_loss = vl;
    if (rank_ == 0 && opt_.write_metrics && vl >= 0) metrics_.write({{"kind", "eval"}, {"step", step_}, {"val_loss", vl}});
  }
  if (periodic || (at_end && job_.checkpoint.at_exit)) ARCH_RETURN_IF_ERROR(writeCheckpoint(at_end));
  if (opt_.exit_after_step >= 0 && step_ == opt_.exit_after_step) {
    if (ckpt_) (void)ckpt_->drain();
    ARCH_LOG_WARN("test hook: exiting abruptly after step {}", step_);
    std::_Exit(3);
  }
  return core::okStatus();
}

// ---- elasticity -------------------------------------------------------------------

void Trainer::commit(bool refresh_outer) {
  torch::NoGradGuard ng;
  commit_.step = step_;
  commit_.position = train_sampler_->position();
  commit_.adam_t = adam_->stepCount();
  commit_.shares = shares_;
  commit_.losses = summary_.losses.size();
  commit_.params.copy_(flat_->params());
  commit_.m.copy_(adam_->expAvg());
  commit_.v.copy_(adam_->expAvgSq());
  for (size_t i = 0; i < buffers_.size(); ++i) commit_.buffers[i].copy_(buffers_[i].second);
  if (outer_ && exact_outer_) {
    // Anchor and momentum change only in steps where a fragment is due;
    // nothing is in flight between steps (overlap 0), so this never waits.
    commit_.outer_json = outer_->stateJson();
    if (refresh_outer || !commit_.outer_valid ||
        !fragmentsDue(outer_frags_, step_ + 1, job_.strategy.inner_steps).empty()) {
      commit_.outer_tensors.clear();
      for (const auto& [name, t] : outer_->stateTensors()) commit_.outer_tensors.push_back({name, t.detach().clone()});
      commit_.outer_valid = true;
    }
  }
}

void Trainer::rollback() {
  torch::NoGradGuard ng;
  if (commit_.step < 0) return;
  step_ = commit_.step;
  train_sampler_->setPosition(commit_.position);
  adam_->setStepCount(commit_.adam_t);
  shares_ = commit_.shares;
  summary_.losses.resize(commit_.losses);
  flat_->params().copy_(commit_.params);
  adam_->expAvg().copy_(commit_.m);
  adam_->expAvgSq().copy_(commit_.v);
  for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].second.copy_(commit_.buffers[i]);
}

core::Sha256Digest Trainer::stateDigest(bool params_only) {
  core::Sha256 h;
  hashTensor(h, flat_->params());
  for (auto& [name, t] : buffers_) hashTensor(h, t);
  if (!params_only) {
    hashTensor(h, adam_->expAvg());
    hashTensor(h, adam_->expAvgSq());
    const int64_t meta[3] = {step_, train_sampler_->position(), adam_->stepCount()};
    h.update(meta, sizeof(meta));
    if (commit_.outer_valid) {
      for (const auto& [name, t] : commit_.outer_tensors) {
        if (name == "anchor" || name == "momentum") hashTensor(h, t);
      }
    }
  }
  return h.finish();
}

std::string Trainer::serializeState() {
  NamedTensors ts{{"params", flat_->params()}, {"exp_avg", adam_->expAvg()}, {"exp_avg_sq", adam_->expAvgSq()}};
  for (auto& [name, t] : buffers_) ts.push_back({"buffer." + name, t});
  if (commit_.outer_valid) {
    for (const auto& [name, t] : commit_.outer_tensors) {
      if (name.rfind("ef.", 0) != 0) ts.push_back({"outer." + name, t});  // residuals are per rank
    }
  }
  nlohmann::json head{{"step", step_}, {"position", train_sampler_->position()}, {"adam_t", adam_->stepCount()},
                      {"outer", commit_.outer_valid ? commit_.outer_json : nlohmann::json()}};
  nlohmann::json list = nlohmann::json::array();
  size_t total = 0;
  for (auto& [name, t] : ts) {
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    list.push_back({{"name", name}, {"bytes", bytes}, {"numel", t.numel()}});
    total += bytes;
  }
  head["tensors"] = list;
  const std::string h = head.dump();
  std::string out;
  out.reserve(8 + h.size() + total);
  const uint64_t hl = h.size();
  out.append(reinterpret_cast<const char*>(&hl), 8);
  out += h;
  for (auto& [name, t] : ts) {
    torch::Tensor c = t.contiguous();
    out.append(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()) * c.element_size());
  }
  return out;
}

core::Status Trainer::applyState(const std::string& blob) {
  if (blob.size() < 8) return core::dataLoss("state transfer: empty message");
  uint64_t hl = 0;
  std::memcpy(&hl, blob.data(), 8);
  if (8 + hl > blob.size()) return core::dataLoss("state transfer: truncated header");
  auto head = nlohmann::json::parse(blob.substr(8, hl), nullptr, false);
  if (head.is_discarded()) return core::dataLoss("state transfer: malformed header");
  size_t off = 8 + hl;
  std::map<std::string, torch::Tensor> mine{{"params", flat_->params()}, {"exp_avg", adam_->expAvg()},
                                            {"exp_avg_sq", adam_->expAvgSq()}};
  for (auto& [name, t] : buffers_) mine["buffer." + name] = t;
  NamedTensors outer_tensors;
  torch::NoGradGuard ng;
  for (const auto& e : head["tensors"]) {
    const std::string name = e["name"].get<std::string>();
    const size_t bytes = e["bytes"].get<size_t>();
    if (off + bytes > blob.size()) return core::dataLoss("state transfer: tensor '" + name + "' is truncated");
    if (name.rfind("outer.", 0) == 0) {
      torch::Tensor t = torch::empty({e["numel"].get<int64_t>()}, torch::kFloat32);
      if (static_cast<size_t>(t.numel()) * 4 != bytes) return core::dataLoss("state transfer: '" + name + "' is not fp32");
      std::memcpy(t.data_ptr(), blob.data() + off, bytes);
      outer_tensors.push_back({name.substr(6), t});
    } else {
      auto it = mine.find(name);
      if (it == mine.end() || static_cast<size_t>(it->second.numel()) * it->second.element_size() != bytes ||
          !it->second.is_contiguous()) {
        return core::dataLoss("state transfer: tensor '" + name + "' does not match this model");
      }
      std::memcpy(it->second.data_ptr(), blob.data() + off, bytes);
    }
    off += bytes;
  }
  step_ = head["step"].get<int64_t>();
  train_sampler_->setPosition(head["position"].get<int64_t>());
  adam_->setStepCount(head["adam_t"].get<int64_t>());
  if (head.contains("outer") && !head["outer"].is_null()) {
    commit_.outer_tensors = std::move(outer_tensors);
    commit_.outer_json = head["outer"];
    commit_.outer_valid = true;
  }
  has_state_ = true;
  return core::okStatus();
}

// Sends the donor's state to the receivers (ranks of g's epoch; the donor
// first in the transfer group, so it is broadcast root 0).
core::Status Trainer::transferState(comm::Group& g, int donor, const std::vector<int>& receivers) {
  std::vector<int> members{donor};
  members.insert(members.end(), receivers.begin(), receivers.end());
  if (std::find(members.begin(), members.end(), rank_) == members.end()) return core::okStatus();
  ARCH_ASSIGN_OR_RETURN(auto t, g.subgroup(members));
  const auto o = comm::OpOptions::within(120);
  std::string blob;
  uint64_t size = 0;
  if (rank_ == donor) {
    blob = serializeState();
    size = blob.size();
  }
  ARCH_RETURN_IF_ERROR(t->broadcast(&size, 8, comm::DType::kU8, 0, o).withContext("state transfer size"));
  blob.resize(size);
  ARCH_RETURN_IF_ERROR(t->broadcast(blob.data(), size, comm::DType::kU8, 0, o).withContext("state transfer"));
  if (rank_ != donor) ARCH_RETURN_IF_ERROR(applyState(blob));
  return core::okStatus();
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
    auto d = stateDigest(false);
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
      event("join", {{"rank", r}, {"detail", fmt::format("rank {} received the live state of step {} from rank {} ({:.2f} s)",
                                                         r, newest, donor, secs)}, {"transfer_s", secs}});
    }
    if (!behind.empty()) {
      event("resync", {{"detail", fmt::format("ranks [{}] were behind ({}); state of step {} from rank {}",
                                              fmt::join(behind, ","), why, newest, donor)}});
    }
    if (!divergent.empty()) {
      event("resync", {{"detail", fmt::format("ranks [{}] held a state different from the majority of step {}; "
                                              "re-synchronised from rank {}", fmt::join(divergent, ","), newest, donor)}});
    }
  }
  if (!divergent.empty() && rank_ == donor) {
    ARCH_LOG_WARN("replicas [{}] diverged at step {}: re-synchronised from rank {}", fmt::join(divergent, ","), newest, donor);
  }
  return core::okStatus();
}

// Periodic replica check inside the gradient group (whose members must hold
// bit-identical parameters after every step): digests of the parameters are
// compared and a divergent replica is re-synchronised from the majority.
core::Status Trainer::checkIntegrity() {
  std::shared_ptr<comm::Group> g = opt_.elastic->innerGroup();
  if (!g || g->size() <= 1) return core::okStatus();
  auto d = stateDigest(true);
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
    event("resync", {{"detail", fmt::format("replica check after step {}: ranks [{}] diverged; re-synchronised from "
                                            "rank {}", step_, fmt::join(receivers, ","), rank_)}});
  }
  return core::okStatus();
}

core::Status Trainer::recover(const core::Status& cause) {
  ElasticSession& e = *opt_.elastic;
  const bool failure = !cause.isOk();
  if (failure) {
    failure_at_ = wallSeconds();
    failed_step_ = commit_.step;
    if (!shard_offsets_.empty()) {
      return core::failedPrecondition("a worker was lost while optimizer state is sharded (train.shard_optimizer): "
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
  ARCH_RETURN_IF_ERROR(enterNextEpoch(cause, failure ? "failure" : "membership change", [&] {
    if (failure && amWriter()) {
      std::vector<int> gone;
      for (int r : old_alive) {
        if (!e.membership().isAlive(r)) gone.push_back(r);
      }
      event("failure", {{"step", failed_step_}, {"failed_rank", gone.empty() ? suspectOf(cause) : gone.front()},
                        {"detail", cause.message().substr(0, 300)}, {"detected_at", failure_at_}});
    }
  }));
  std::vector<int> gone, joined;
  for (int r : old_alive) {
    if (!e.membership().isAlive(r)) gone.push_back(r);
  }
  for (int r : alive_) {
    if (std::find(old_alive.begin(), old_alive.end(), r) == old_alive.end()) joined.push_back(r);
  }
  if (amWriter()) {
    event("epoch", {{"detail", fmt::format("epoch {} -> {}: workers [{}]{}{}; shares [{}]", from, e.epoch(),
                                           fmt::join(alive_, ","),
                                           gone.empty() ? "" : fmt::format(", lost [{}]", fmt::join(gone, ",")),
                                           joined.empty() ? "" : fmt::format(", joined [{}]", fmt::join(joined, ",")),
                                           fmt::join(shares_, ","))},
                    {"workers", alive_}, {"rebuild_s", e.lastReconfigureSeconds()}});
  }
  ARCH_RETURN_IF_ERROR(rebuildOuterFromCommit());
  first_step_after_change_ = true;
  warm_from_ = step_;
  return core::okStatus();
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
core::Status Trainer::enterNextEpoch(core::Status cause, const std::string& why, const std::function<void()>& on_epoch) {
  for (int attempt = 0;; ++attempt) {
    ARCH_RETURN_IF_ERROR(opt_.elastic->reconfigure(cause));
    bindComm();
    ARCH_ASSIGN_OR_RETURN(shares_, initialShares());
    if (attempt == 0 && on_epoch) on_epoch();
    core::Status st = syncReplicas(why);
    if (st.isOk()) return st;
    const auto code = st.code();
    const bool comm_error = code == core::StatusCode::kUnavailable || code == core::StatusCode::kAborted ||
                            code == core::StatusCode::kDeadlineExceeded || code == core::StatusCode::kDataLoss;
    if (!comm_error || attempt >= 20) return st;
    cause = st;
  }
}

core::Status Trainer::saveAndStop(const core::Status& why) {
  // Survivors below the minimum (or without a coordinator) write what they
  // hold; the lowest alive rank writes, the launcher restarts from it.
  if (has_state_ && shard_offsets_.empty() && (amWriter() || outer_) && step_ > 0) {
    auto snap = snapshot(step_);
    if (snap.isOk()) {
      auto st = runtime::writeCheckpoint(opt_.run_dir, amWriter() ? std::move(*snap) : rankPart(std::move(*snap)),
                                         job_.checkpoint.keep_last);
      if (st.isOk()) ARCH_LOG_WARN("wrote {} before stopping", checkpointDirName(step_));
      else ARCH_LOG_WARN("could not write a checkpoint before stopping: {}", st.toString());
    }
  }
  event("stop", {{"detail", why.message().substr(0, 300)}});
  return why;
}

core::Result<TrainSummary> Trainer::run() {
  const auto t_start = core::Clock::now();
  if (elastic() && opt_.elastic->joined()) has_state_ = false;
  ARCH_RETURN_IF_ERROR(setup());
  if (!has_state_) {
    core::Status st = syncReplicas("join");
    if (!st.isOk()) {
      st = enterNextEpoch(st, "join", nullptr);
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
  if (rank_ == 0 || (elastic() && amWriter())) {
    ARCH_LOG_INFO("training {} parameters, {} steps from step {}, global batch {} x {} tokens over {} ({}), shares [{}]",
                  flat_->numel(), tc_.steps, start_step_, tc_.global_batch, T_, alive_.size(), dp_->describe(),
                  fmt::join(shares_, ","));
  }
  if (elastic()) event("started", {{"detail", fmt::format("rank {} in step at step {}", rank_, step_)}, {"pid", ::getpid()}});

  while (step_ < tc_.steps) {
    if (elastic()) {
      if (opt_.elastic->coordinatorLost()) {
        return saveAndStop(core::unavailable("the coordinator is lost; stopping with a checkpoint"));
      }
      const auto c0 = core::Clock::now();
      commit();
      commit_s_ = core::secondsSince(c0);
    }
    core::Status st = trainStep();
    if (st.isOk() && !(elastic() && epoch_pending_)) {
      if (stop_now_) break;
      continue;
    }
    if (!elastic()) return st;
    if (stop_now_ && st.isOk()) break;
    core::Status rc = recover(st);
    if (!rc.isOk()) {
      if (opt_.elastic->evicted()) return rc;
      return saveAndStop(rc);
    }
  }
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
  if (elastic()) {
    auto d = stateDigest(true);
    summary_.replica_digest = core::toHex(d);
    if (opt_.write_metrics) {
      metrics_.write({{"kind", "replica"}, {"rank", rank_}, {"step", step_}, {"digest", summary_.replica_digest}});
    }
  }
  if (opt_.write_metrics) {
    (void)trace_.writeFile((fs::path(opt_.run_dir) / "trace" / ("rank" + std::to_string(rank_) + ".json")).string());
  }
  return summary_;
}

}  // namespace

core::Result<TrainSummary> runTrainer(const TrainerOptions& opt) {
  if (opt.job.strategy.pipeline_stages > 1 || opt.job.strategy.expert_parallel > 1) return runParallelTrainer(opt);
  Trainer t(opt);
  return t.run();
}

}  // namespace archipelago::runtime
