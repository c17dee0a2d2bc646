// The loop's set-up: data, model shard, optimizer, layout groups, parts,
// strategy and outputs (docs/runtime.md "The loop").
#include <algorithm>
#include <filesystem>
#include <set>

#include "archipelago/core/host_memory.h"
#include "archipelago/core/island_layout.h"
#include "archipelago/core/log.h"
#include "archipelago/core/shares.h"
#include "archipelago/model/fp8.h"
#include "archipelago/model/training.h"
#include "archipelago/plan/local_predict.h"
#include "archipelago/runtime/calibrate.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/model/tensor_memory.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

namespace fs = std::filesystem;

core::Result<std::shared_ptr<comm::Group>> GroupCache::of(const std::vector<int>& ranks, const std::string& channel) {
  if (channel.empty() && ranks == world->ranks()) return world;
  auto it = cache.find({ranks, channel});
  if (it != cache.end()) return it->second;
  ARCH_ASSIGN_OR_RETURN(auto g, world->subgroup(ranks, channel));
  cache[{ranks, channel}] = g;
  return g;
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
  workers_ = workersOf(job_);
  const bool split_job = core::splitsModel(job_);
  if (static_cast<int>(workers_.size()) != world_ && (world_ != 1 || split_job)) {
    return core::invalidArgument("the cluster spec has " + std::to_string(workers_.size()) +
                                 " workers but the communicator has " + std::to_string(world_) +
                                 (split_job ? " (strategy.pipeline_stages / expert_parallel / tensor_parallel and per-island "
                                              "layouts need one process per worker of the cluster spec)"
                                            : ""));
  }
  if (split_job && world_ == 1) {
    return core::invalidArgument("pipeline / expert / tensor parallelism needs more than one worker");
  }
  if (world_ == 1 && workers_.size() != 1) {
    // A single-process reference of a multi-worker job: island 0's device
    // kind, the job-wide dtype and threads.
    me_ = WorkerInfo{};
    me_.device = job_.cluster.islands.empty() ? "cpu" : job_.cluster.islands[0].device;
    me_.torch_device = job_.cluster.islands.empty() ? "auto" : job_.cluster.islands[0].torch_device;
    me_.dtype = job_.model.dtype;
    me_.threads = tc_.threads_per_worker;
  } else {
    me_ = workers_[static_cast<size_t>(rank_)];
  }
  bindComm();
  if (split_job && world_ > 1 && !world_group_) return core::invalidArgument("the loop needs the world comm group");
  ARCH_RETURN_IF_ERROR(setupPlacement());
  model::setComputeThreads(me_.threads);
  core::holdFreedMemory();
  model::trackTensorMemory();  // before any model state: the step records' tensor_peak_bytes
  ARCH_RETURN_IF_ERROR(setupData());
  ARCH_RETURN_IF_ERROR(setupModel());
  if (split()) ARCH_RETURN_IF_ERROR(setupSplitGroups());
  ARCH_RETURN_IF_ERROR(setupOptimizer());
  // Per-island layouts: sync sums every step's gradients across the islands
  // by name (after the optimizer: ZeRO-2's members hold their slices);
  // DiLoCo averages the pseudo-gradients so (makeOuter).
  if (job_lay_.perIsland() && job_.strategy.kind == "sync") ARCH_RETURN_IF_ERROR(setupBridge());
  ARCH_RETURN_IF_ERROR(makeParts());
  setupFp8Steps();
  if (opt_.resume && has_state_) ARCH_RETURN_IF_ERROR(resumeFromCheckpoint());
  setupOutputs();
  return setupStrategy();
}

core::Status Trainer::setupData() {
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
    else if (rank_ == 0) ARCH_LOG_WARN("no validation: {}", vs.status().message());
  }
  return core::okStatus();
}

core::Status Trainer::setupPlacement() {
  if (job_.cluster.islands.empty()) return core::invalidArgument("cluster.islands: the job has no island");
  // A launched worker checked its operators before it registered (worker.cpp).
  ARCH_ASSIGN_OR_RETURN(place_, placeWorker(job_, me_, tc_.check_ops && !elastic()));
  scaler_.emplace(tc_, place_.dtype);
  return core::okStatus();
}

// The layout, this rank's shard of the model, and its flat buffers (expert
// tensors last, so the replicated ones are one contiguous range).
core::Status Trainer::setupModel() {
  ARCH_ASSIGN_OR_RETURN(mcfg_, model::resolveModelConfig(job_.model));
  lay_.world = world_;
  lay_.replicas = world_;
  job_lay_.spans = {lay_};
  if (core::splitsModel(job_)) {
    ARCH_ASSIGN_OR_RETURN(job_lay_, parallel::jobLayout(job_));
    lay_ = job_lay_.of(rank_);
  }
  pp_ = lay_.stages > 1;
  ep_ = lay_.ep > 1;
  tp_ = lay_.tp > 1;
  stage_ = lay_.stageOf(rank_);
  replica_ = lay_.replicaOf(rank_);
  tp_rank_ = lay_.tpRankOf(rank_);
  share_index_ = replica_;
  model::ModelShard shard;
  if (pp_) {
    shard.layer_begin = lay_.layerBegin(stage_);
    shard.layer_end = shard.layer_begin + lay_.stage_layers[static_cast<size_t>(stage_)];
  }
  if (ep_) {
    const auto member = static_cast<size_t>(lay_.epMemberOf(rank_));
    shard.expert_begin = lay_.expert_begin[member];
    shard.expert_end = lay_.expert_begin[member + 1];
  }
  shard.tp = {tp_rank_, lay_.tp};
  ARCH_RETURN_IF_ERROR(model::checkTensorParallel(mcfg_, lay_.tp));
  ARCH_ASSIGN_OR_RETURN(net_, model::buildModel(mcfg_, static_cast<uint64_t>(tc_.seed), shard));
  if (!place_.device.is_cpu()) net_->to(place_.device);
  if (place_.dtype == "fp8") {
    ARCH_ASSIGN_OR_RETURN(const model::Fp8Options fo, model::parseFp8Options(tc_.fp8_recipe, tc_.fp8_amax_history));
    const int64_t n = model::setFp8(*net_, fo);
    ARCH_LOG_INFO("fp8: {} linear layers, {} scaling, {}", n, model::fp8RecipeName(fo.recipe),
                  model::fp8Backend(place_.device, fo.recipe));
  }
  auto named = net_->namedParameters();
  if (ep_) std::stable_partition(named.begin(), named.end(), [](const auto& p) { return !parallel::isExpertTensor(p.first); });
  bindFlat(named);
  n_dense_ = flat_->numel();
  for (const auto& seg : flat_->segments()) {
    if (ep_ && parallel::isExpertTensor(seg.name)) {
      n_dense_ = seg.offset;
      break;
    }
  }
  std::map<std::string, model::TensorSlice> slices;
  for (const auto& seg : flat_->segments()) {
    if (auto sl = model::tensorSlice(mcfg_, seg.name, shard.tp); sl.sliced()) slices[seg.name] = sl;
  }
  ARCH_ASSIGN_OR_RETURN(auto map, ShardMap::build(model::parameterLayout(mcfg_), flat_->segments(), slices));
  shard_map_.emplace(std::move(map));
  std::set<std::string> params;
  for (const auto& seg : flat_->segments()) params.insert(seg.name);
  for (auto& [name, t] : net_->namedTensors()) {
    if (!params.count(name)) buffers_.push_back({name, t});
  }
  return core::okStatus();
}

// The flat buffers over `named`: whole, or under ZeRO-3 this rank's slices
// (over everybody, or over a stage's replicas; with one replica there is
// nothing to shard: setupOptimizer warns); with expert parallelism the
// experts over the ranks holding the same ones. The slices are the
// optimizer's (OptimizerShard over optimizerRanges()).
void Trainer::bindFlat(const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  const std::vector<int> peers = split() ? sameStageRanks() : std::vector<int>{};
  if (zeroInUse() != 3 || (split() && peers.size() <= 1)) {
    flat_.emplace(FlatParams::bind(named, place_.compute));
    return;
  }
  std::vector<std::pair<std::string, int64_t>> numels;
  int64_t n_dense = 0, total = 0;
  for (const auto& [name, t] : named) {
    numels.push_back({name, t.numel()});
    if (!ep_ || !parallel::isExpertTensor(name)) n_dense += t.numel();
    total += t.numel();
  }
  unit_cut_ = parallel::cutUnits(numels);
  auto sliceOf = [&](int64_t lo, int64_t hi, const std::vector<int>& ranks) -> FlatSlice {
    if (ranks.size() <= 1) return {lo, hi};
    const auto offsets = parallel::OptimizerShard::sliceOffsets(lo, hi, static_cast<int>(ranks.size()));
    const auto r = static_cast<size_t>(std::find(ranks.begin(), ranks.end(), rank_) - ranks.begin());
    return {offsets[r], offsets[r + 1]};
  };
  std::vector<FlatSlice> slices;
  if (!split()) {
    const auto offsets = parallel::OptimizerShard::sliceOffsets(total, dp_->size());
    slices.push_back({offsets[static_cast<size_t>(dp_->rank())], offsets[static_cast<size_t>(dp_->rank()) + 1]});
  } else {
    slices.push_back(sliceOf(0, n_dense, peers));
    if (ep_) slices.push_back(sliceOf(n_dense, total, sameExpertRanks()));
  }
  flat_.emplace(FlatParams::bindSharded(named, place_.compute, {slices, unit_cut_.offsets}));
}

int Trainer::zeroInUse() const {
  const int zero = static_cast<int>(core::zeroStage(tc_));
  if (zero < 1 || world_ <= 1 || opt_.inner) return 0;
  return zero;
}

std::vector<int> Trainer::sameStageRanks() const {
  std::vector<int> out;
  for (int r : grad_ranks_) {
    if (lay_.holds(r) && lay_.stageOf(r) == stage_ && lay_.tpRankOf(r) == tp_rank_) out.push_back(r);
  }
  return out;
}

std::vector<int> Trainer::sameExpertRanks() const {
  std::vector<int> out;
  for (int r : sameStageRanks()) {
    if (lay_.epMemberOf(r) == lay_.epMemberOf(rank_)) out.push_back(r);
  }
  return out;
}

// The ranks that shard the state: everybody, or (pipeline / tensor
// parallelism) the ranks holding this rank's tensors. Null: nobody to shard with.
DpComm* Trainer::zeroGroup() const {
  if (!split()) return dp_;
  return stage_dp_ ? stage_dp_.get() : nullptr;
}

// The ranges the optimizer state is sharded over (train.zero >= 1): the
// whole buffer over zeroGroup(), or with expert parallelism the dense
// tensors over it and the experts over the ranks holding the same experts.
std::vector<parallel::OptimizerRange> Trainer::optimizerRanges() const {
  if (!ep_) return {{0, flat_->numel(), zeroGroup()}};
  return {{0, n_dense_, zeroGroup()}, {n_dense_, flat_->numel(), expert_dp_.get()}};
}

// AdamW over the whole flat buffer, or this rank's slices of it (ZeRO-1/2/3),
// and the initial batch shares.
core::Status Trainer::setupOptimizer() {
  const int zero = zeroInUse();
  const auto ranges = optimizerRanges();
  const bool shard = zero >= 1 && std::any_of(ranges.begin(), ranges.end(), [](const auto& r) { return r.dp != nullptr; });
  if (zero >= 1 && !shard && rank_ == 0) {
    ARCH_LOG_WARN("train.zero: no other rank holds this rank's tensors (one replica): nothing to shard");
  } else if (core::zeroStage(tc_) >= 1 && world_ > 1 && opt_.inner) {
    ARCH_LOG_WARN("train.zero is ignored with strategy {} (optimizer state stays per island)", job_.strategy.kind);
  } else if (shard && elastic()) {
    ARCH_LOG_WARN("train.zero: sharded state cannot survive a lost worker; a failure restarts the job "
                  "from its newest checkpoint instead of continuing elastically");
  }
  optim_ = shard ? std::make_unique<parallel::OptimizerShard>(*flat_, ranges, zero)
                 : std::make_unique<parallel::OptimizerShard>(*flat_);
  adam_ = std::make_unique<FlatAdamW>(tc_, optim_->size(), flat_->device());
  ARCH_ASSIGN_OR_RETURN(shares_, initialShares());
  return core::okStatus();
}

// Shares per slot (a rank, or a pipeline: its ranks' weights summed) in
// proportion to train.shares or the devices' speed; dead slots get 0.
core::Result<std::vector<int64_t>> Trainer::initialShares() const {
  if (world_ == 1) return std::vector<int64_t>{tc_.global_batch};
  std::vector<double> w;
  std::vector<int> members;
  for (int d = 0; d < job_lay_.replicas(); ++d) {
    const parallel::ParallelLayout& span = job_lay_.ofReplica(d);
    double x = 0;
    bool any = false;
    for (int r = span.firstRankOf(d); r < span.endRankOf(d); ++r) {
      if (!std::binary_search(alive_.begin(), alive_.end(), r)) continue;
      any = true;
      x += core::initialShareWeight(tc_, workers_[static_cast<size_t>(r)]);
    }
    if (!any) continue;
    w.push_back(x);
    members.push_back(d);
  }
  ARCH_ASSIGN_OR_RETURN(auto sh, core::sharesFromWeights(w, tc_.global_batch));
  std::vector<int64_t> out(static_cast<size_t>(job_lay_.replicas()), 0);
  for (size_t i = 0; i < members.size(); ++i) out[static_cast<size_t>(members[i])] = sh[i];
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
  if (data_ && !split()) data_->bind(grad_dp_);  // split layouts reduce over their stage group
  if (!island_backends_.empty()) {
    // A new epoch (the same ranks or not): the c10d group was built over
    // the old members' processes, so comm sums the buckets from now on.
    if (data_) data_->setBackend(nullptr);
    if (experts_) experts_->setBackend(nullptr);
    if (optim_) optim_->setBackend(nullptr, nullptr);
    if (params_shard_) params_shard_->setBackend(nullptr, nullptr);
    island_backends_.clear();
    island_crosses_.clear();
    ARCH_LOG_WARN("the gradient group changed: buckets go through comm from now on (strategy.island_collectives: "
                  "c10d is built once, by the whole group)");
  }
}

core::Status Trainer::setupStrategy() {
  if (job_.strategy.kind != "sync") {
    const auto& s = job_.strategy;
    exact_outer_ = !(s.kind == "streaming" && s.overlap_steps > 0);
    std::vector<int64_t> offsets;
    for (const auto& seg : flat_->segments()) offsets.push_back(seg.offset);
    auto fr = fragmentSchedule(flat_->numel(), s.kind == "streaming" ? s.fragments : 1, s.inner_steps, offsets);
    if (fr.isOk()) outer_frags_ = *fr;
    // A joiner's outer sync is built after the state arrived; a resume
    // found the outer state (resume.cpp).
    if (has_state_) {
      ARCH_RETURN_IF_ERROR(makeOuter(resume_outer_tensors_.empty() ? nullptr : &resume_outer_tensors_,
                                     resume_outer_tensors_.empty() ? nullptr : &resume_outer_json_));
    }
  }
  // Shares are re-derived every 5 steps; with DiLoCo/streaming at outer-step
  // boundaries only (the speed allgather crosses the straits). Split
  // layouts keep the shares derived from speed.
  const int64_t interval = split() ? 0 : core::rebalanceInterval(tc_.rebalance, world_, outer_ != nullptr, job_.strategy.inner_steps);
  if (split() && tc_.rebalance && rank_ == 0) {
    ARCH_LOG_INFO("train.rebalance is not applied with pipeline/expert parallelism: shares stay as derived from speed");
  }
  rebalancer_ = std::make_unique<Rebalancer>(interval, outer_ != nullptr);
  return core::okStatus();
}

void Trainer::setupOutputs() {
  trace_.setProcess(rank_, "rank " + std::to_string(rank_) + " (" + me_.island + ", " + me_.device +
                               (pp_ ? ", stage " + std::to_string(stage_) : "") + ")");
  if (opt_.write_metrics) {
    std::error_code ec;
    fs::create_directories(fs::path(opt_.run_dir) / "trace", ec);
    const core::Status st = metrics_.open((fs::path(opt_.run_dir) / "metrics.jsonl").string());
    if (!st.isOk()) ARCH_LOG_WARN("metrics: {}", st.message());
  }
  job_yaml_ = core::dumpJobYaml(job_);
  integrity_every_ = job_.checkpoint.every > 0 ? job_.checkpoint.every : 50;
  corrupt_hook_ = corruptParamsHook();
  if (elastic() && !split()) {
    commit_.params = torch::empty_like(flat_->params());
    commit_.m = torch::empty_like(adam_->expAvg());
    commit_.v = torch::empty_like(adam_->expAvgSq());
    for (auto& [name, t] : buffers_) commit_.buffers.push_back(torch::empty_like(t));
  }
}

core::Status Trainer::makeOuter(const NamedTensors* tensors, const nlohmann::json* state) {
  outer_.reset();
  OuterContext ctx;
  ctx.job = &job_;
  ctx.rank = rank_;
  ctx.world = world_;
  for (const auto& w : workers_) ctx.island_of_rank.push_back(w.island_index);
  // Split layouts: the ranks holding this rank's tensors, in every island
  // (the outer sync builds its island and cross-island groups from them).
  if (!split()) ctx.world_group = world_group_;
  else if (outer_ranks_.size() > 1) {
    ARCH_ASSIGN_OR_RETURN(ctx.world_group, groups_.of(outer_ranks_));
  }
  if (job_lay_.perIsland()) ARCH_RETURN_IF_ERROR(outerByName(ctx));
  ctx.metrics = opt_.write_metrics && metrics_.isOpen() ? &metrics_ : nullptr;
  ctx.run_dir = opt_.run_dir;
  for (const auto& seg : flat_->segments()) ctx.segment_offsets.push_back(seg.offset);
  ARCH_ASSIGN_OR_RETURN(outer_, makeOuterSync(ctx, flat_->params()));
  if (tensors && state) ARCH_RETURN_IF_ERROR(outer_->restore(*tensors, *state));
  return core::okStatus();
}

// Per-island layouts under DiLoCo: the outer sync's cross-island exchange
// goes by tensor name, over a bridge of every rank in descending order (a
// rank list no other group of the job uses: the outer thread has it to
// itself), so every replica takes the mean straight from the other islands.
// Streaming's fragments are cut in the single-process layout (as a plain
// layout cuts its buffer), so fragment f is the same tensors everywhere; a
// rank holds its part of each as one range of its own buffer.
core::Status Trainer::outerByName(OuterContext& ctx) {
  std::vector<int64_t> boundaries;  // where each tensor starts in the single-process layout
  for (const auto& [name, shape] : shard_map_->full()) boundaries.push_back(shard_map_->fullOffset(name));
  const int64_t fragments = job_.strategy.kind == "streaming" ? job_.strategy.fragments : 1;
  ARCH_ASSIGN_OR_RETURN(const auto global, fragmentSchedule(shard_map_->fullNumel(), fragments,
                                                            job_.strategy.inner_steps, boundaries));
  std::vector<int64_t> global_cuts{0};
  for (const auto& f : global) global_cuts.push_back(f.end);
  ARCH_ASSIGN_OR_RETURN(ctx.fragment_cuts, parallel::localCuts(parallel::heldRuns(*shard_map_, flat_->numel()), global_cuts));
  if (!outer_bridge_) {
    std::vector<int> ranks, islands;
    for (int r = world_ - 1; r >= 0; --r) {
      ranks.push_back(r);
      islands.push_back(workers_[static_cast<size_t>(r)].island_index);
    }
    ARCH_ASSIGN_OR_RETURN(auto g, groups_.of(ranks));
    ARCH_ASSIGN_OR_RETURN(outer_bridge_,
                          parallel::IslandBridge::create(*flat_, *shard_map_, std::move(g), std::move(islands), nullptr));
    ARCH_ASSIGN_OR_RETURN(const comm::CodecKind codec, comm::parseCodec(job_.strategy.codec));
    ARCH_RETURN_IF_ERROR(outer_bridge_->setCodec(codec, job_.strategy.error_feedback));
    if (rank_ == 0) {
      ARCH_LOG_INFO("per-island layouts ({}): outer steps average the islands' pseudo-gradients by tensor name",
                    core::describeIslandLayouts(job_));
    }
  }
  ctx.mean_by_name = [b = outer_bridge_.get(), global_cuts](size_t f, std::span<float> delta, double tokens,
                                                           std::vector<double>& control, uint64_t& bytes_sent) {
    return b->islandMean(global_cuts[f], global_cuts[f + 1], delta, tokens, control, bytes_sent);
  };
  return core::okStatus();
}

void Trainer::predict() {
  // Rank 0 at the start of a job only (a joiner must not keep the others
  // waiting); the local replay models data-parallel layouts only.
  if (rank_ != 0 || !has_state_ || split() || (elastic() && opt_.elastic->joined())) return;
  const int64_t rows = std::max<int64_t>(1, *std::max_element(shares_.begin(), shares_.end())) * T_;
  const std::string kind = me_.device.empty() ? "cpu" : me_.device;
  // The local calibration times GEMMs and the job's model on this host's
  // CPU in fp32, with the host's load: what a CPU worker computes on. A
  // worker on an accelerator would spend minutes timing a large model on
  // the wrong device and learn nothing of its own (seen on an H200 host: a
  // 1B model never reached step 1 in 55 s): its prediction comes from the
  // device catalog alone.
  const bool on_cpu = place_.device.is_cpu();
  plan::CalibrationProfile profile;
  if (on_cpu) {
    profile = calibrateLocalMatmuls(job_.model, rows, kind);
    // The job's own model parts at the smallest and largest micro-batch the workers run.
    std::vector<int64_t> sizes;
    for (int64_t s : shares_) sizes.push_back(job_.train.micro_batch > 0 ? std::min(job_.train.micro_batch, s) : s);
    const auto [lo, hi] = std::minmax_element(sizes.begin(), sizes.end());
    const core::Status st = calibrateLocalModel(job_, {*lo, *hi == *lo ? std::max<int64_t>(1, *hi / 2) : *hi}, kind, profile);
    if (!st.isOk()) ARCH_LOG_WARN("model calibration: {}", st.message());
  } else {
    ARCH_LOG_INFO("no local calibration: rank 0 computes on {}; the prediction uses the catalog's '{}'",
                  place_.device.str(), kind);
  }
  if (elastic()) {
    // Every worker's per-step commit (the rollback copy, before its compute);
    // the loop commits this same state again before the first step.
    std::vector<double> t;
    for (int i = 0; i < 5; ++i) {
      const auto w0 = core::Clock::now();
      const double c0 = core::threadCpuSeconds();
      commit();
      t.push_back(me_.threads == 1 ? core::threadCpuSeconds() - c0 : core::secondsSince(w0));
    }
    std::sort(t.begin(), t.end());
    profile.device(kind).step_overhead_s = t[t.size() / 2];
  }
  // The calibration file is for people and later predictions; the
  // prediction below uses the profile in memory.
  if (const core::Status st = profile.save((fs::path(opt_.run_dir) / "calibration.json").string()); !st.isOk()) {
    ARCH_LOG_WARN("calibration not saved: {}", st.message());
  }
  auto catalog = plan::DeviceCatalog::builtin();
  auto pred = catalog.isOk() ? plan::predictStepTime(job_, job_.model.vocab_size, *catalog, on_cpu ? &profile : nullptr)
                             : core::Result<plan::StepPrediction>(catalog.status());
  if (pred.isOk()) {
    predicted_step_s_ = pred->total_s;
    ARCH_LOG_INFO("planner prediction: {:.3f}s/step ({})", pred->total_s, pred->detail);
    if (opt_.write_metrics) {
      metrics_.write(report::PredictionRecord{.predicted_step_s = pred->total_s, .compute_s = pred->compute_s,
                                              .comm_s = pred->comm_s, .detail = pred->detail});
    }
  } else {
    ARCH_LOG_WARN("no planner prediction: {}", pred.status().message());
  }
}

}  // namespace archipelago::runtime::loop
