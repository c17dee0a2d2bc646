// The parts of this rank and the groups they talk over (docs/parallelism.md).
#include <algorithm>
#include <map>

#include "archipelago/core/island_layout.h"
#include "archipelago/core/log.h"
#include "archipelago/runtime/c10d_backend.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/runtime/parallel/c10d_expert_exchange.h"
#include "archipelago/runtime/parallel/c10d_tensor_parallel.h"
#include "archipelago/runtime/parallel/micro_batches.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "runtime/loop/trainer.h"

namespace archipelago::runtime::loop {

namespace {
// ZeRO's blocks by island and position: each member's rank in the
// gradient group (its index in `grad_ranks`).
std::vector<std::vector<int>> blocksOf(const std::map<int, std::vector<int>>& by_island, const std::vector<int>& grad_ranks) {
  std::vector<std::vector<int>> out;
  for (const auto& [island, ranks] : by_island) {
    out.emplace_back();
    for (int r : ranks) {
      out.back().push_back(static_cast<int>(std::find(grad_ranks.begin(), grad_ranks.end(), r) - grad_ranks.begin()));
    }
  }
  return out;
}
}  // namespace

// Pipeline / expert / tensor-parallel layouts: the same-stage ranks of the
// inner group (at the same tensor-parallel rank) share the replicated
// tensors, those of them in one member slot the experts; stage neighbours
// exchange activations, an expert group token rows, a tensor-parallel group
// partial sums.
core::Status Trainer::setupSplitGroups() {
  groups_.world = world_group_;
  // The session's island group is the inner group's object (one group object per rank set).
  if (elastic() && opt_.elastic->inner() && grad_ranks_ == opt_.elastic->innerRanks()) {
    groups_.cache[{grad_ranks_, ""}] = opt_.elastic->innerGroup();
  }
  const bool diloco = job_.strategy.kind != "sync";
  ARCH_ASSIGN_OR_RETURN(auto codec, comm::parseCodec(job_.strategy.codec));
  const bool hierarchical = !diloco && (job_.strategy.allreduce == "hierarchical" ||
                                        (job_.strategy.allreduce == "auto" && job_.cluster.islands.size() > 1));
  auto islandOf = [&](int r) { return workers_[static_cast<size_t>(r)].island_index; };
  const int member = lay_.epMemberOf(rank_);
  const std::vector<int> stage_ranks = sameStageRanks();
  const std::vector<int> expert_ranks = sameExpertRanks();
  if (stage_ranks.size() > 1) {
    ARCH_ASSIGN_OR_RETURN(auto g, groups_.of(stage_ranks));
    stage_dp_ = std::make_unique<GroupDp>(g, hierarchical, codec, 0);
  }
  if (tp_) {
    std::vector<int> tp_ranks;
    for (int t = 0; t < lay_.tp; ++t) tp_ranks.push_back(rank_ - tp_rank_ + t);
    ARCH_ASSIGN_OR_RETURN(auto tpg, groups_.of(tp_ranks));
    if (job_.strategy.island_collectives == "c10d") {
      parallel::C10dTensorParallelOptions o;
      ARCH_ASSIGN_OR_RETURN(o.group, groups_.of(tp_ranks, "c10d rendezvous"));
      o.host = opt_.host;
      o.device = place_.device;
      o.timeout_s = c10dTimeoutSeconds();
      ARCH_ASSIGN_OR_RETURN(tp_comm_, parallel::makeC10dTensorParallel(o));
      if (rank_ == 0) ARCH_LOG_INFO("tensor-parallel collectives: c10d {} in groups of {}", *c10dLibraryFor(o.device), lay_.tp);
    } else {
      tp_comm_ = std::make_shared<parallel::CommTensorParallel>(tpg);
    }
    const bool sequence = job_.strategy.sequence_parallel;
    ARCH_RETURN_IF_ERROR(parallel::guardStep("tensor parallelism", [&] {
      net_->setTensorParallel(tp_comm_, sequence);
      return core::okStatus();
    }));
    tensor_ = std::make_unique<parallel::TensorParallel>(
        *flat_, tpg, parallel::replicatedSegments(mcfg_, flat_->segments(), {tp_rank_, lay_.tp}), sequence);
    if (sequence && zeroInUse() == 3 && stage_ranks.size() > 1) {
      // ZeRO-3 sums the norms' slices over the stage's ranks of every TP rank.
      std::vector<int> ranks;
      for (int r : grad_ranks_) {
        if (lay_.holds(r) && lay_.stageOf(r) == stage_) ranks.push_back(r);
      }
      ARCH_ASSIGN_OR_RETURN(tp_stage_group_, groups_.of(ranks));
    }
  }
  if (pp_) {
    // Stage neighbours at the same tensor-parallel rank.
    if (stage_ > 0 && islandOf(rank_ - lay_.tp) != islandOf(rank_)) prev_codec_ = codec;
    if (stage_ + 1 < lay_.stages && islandOf(rank_ + lay_.tp) != islandOf(rank_)) next_codec_ = codec;
  }
  if (ep_) {
    // Member j of expert group g: stage_ of pipeline g * ep + j.
    std::vector<int> ep_ranks;
    const int g0 = lay_.replica_base + lay_.epGroupOf(rank_) * lay_.ep;
    for (int j = 0; j < lay_.ep; ++j) ep_ranks.push_back(lay_.firstRankOf(g0 + j) + stage_ * lay_.tp + tp_rank_);
    // Its own channel: with one expert group per stage its ranks are the
    // stage's, whose ZeRO-3 gathers run on another thread meanwhile.
    ARCH_ASSIGN_OR_RETURN(auto epg, groups_.of(ep_ranks, "expert exchange"));
    if (job_.strategy.island_collectives == "c10d") {
      parallel::C10dExpertExchangeOptions o{.group = epg, .expert_begin = lay_.expert_begin, .host = opt_.host,
                                            .device = place_.device, .timeout_s = c10dTimeoutSeconds()};
      ARCH_ASSIGN_OR_RETURN(exchange_, parallel::makeC10dExpertExchange(o));
      if (rank_ == 0) ARCH_LOG_INFO("expert all-to-all: c10d {} in groups of {}", *c10dLibraryFor(o.device), lay_.ep);
    } else {
      ARCH_ASSIGN_OR_RETURN(auto dcodec, comm::parseCodec(job_.strategy.dispatch_codec));
      exchange_ = std::make_shared<parallel::CommExpertExchange>(epg, lay_.expert_begin, dcodec);
    }
    net_->setExpertExchange(exchange_);
    if (expert_ranks.size() > 1) {
      ARCH_ASSIGN_OR_RETURN(auto eg, groups_.of(expert_ranks));
      expert_dp_ = std::make_unique<GroupDp>(eg, hierarchical, codec, 0);
    }
  }
  for (int r = 0; r < world_; ++r) {
    if (lay_.holds(r) && lay_.stageOf(r) == stage_ && lay_.epMemberOf(r) == member && lay_.tpRankOf(r) == tp_rank_) {
      outer_ranks_.push_back(r);
    }
  }
  for (int r : outer_ranks_) {
    if (islandOf(r) == me_.island_index) {
      outer_counts_tokens_ = r == rank_;
      break;
    }
  }
  return core::okStatus();
}

// Per-island layouts: the first replica of every island (with expert
// parallelism its first expert group) forms the bridge that sums the
// islands' gradients by tensor name; the island's other replicas take the
// result from their bridge member (rank 0 of their same-position ranks).
// ZeRO-2: each replica holds the island's sum of its optimizer slice only,
// so every rank is a member, holding its slice, and nothing is passed on.
core::Status Trainer::setupBridge() {
  // Job-wide (every rank must agree on the members): an island of one replica holds its whole buffer.
  const parallel::OptimizerPiece& piece = optim_->pieces().front();
  const bool slices = zeroInUse() == 2;
  std::vector<int> ranks, islands;
  for (const auto& span : job_lay_.spans) {
    const int end = slices ? span.base + span.replicas * span.stages * span.tp
                           : span.endRankOf(span.replica_base + span.ep - 1);
    for (int r = span.firstRankOf(span.replica_base); r < end; ++r) {
      ranks.push_back(r);
      islands.push_back(workers_[static_cast<size_t>(r)].island_index);
    }
  }
  std::shared_ptr<comm::Group> bridge;
  if (std::find(ranks.begin(), ranks.end(), rank_) != ranks.end()) {
    ARCH_ASSIGN_OR_RETURN(bridge, groups_.of(ranks));
  }
  ARCH_ASSIGN_OR_RETURN(bridge_, parallel::IslandBridge::create(*flat_, *shard_map_, std::move(bridge), std::move(islands),
                                                                slices ? nullptr : ep_ ? expert_dp_.get() : stage_dp_.get(),
                                                                slices ? piece.begin : 0, slices ? piece.end : -1));
  ARCH_ASSIGN_OR_RETURN(const comm::CodecKind codec, comm::parseCodec(job_.strategy.codec));
  ARCH_RETURN_IF_ERROR(bridge_->setCodec(codec, job_.strategy.error_feedback));
  if (rank_ == 0) {
    ARCH_LOG_INFO("per-island layouts ({}): gradients summed across islands by tensor name, {} elements sent by rank 0 "
                  "per step", core::describeIslandLayouts(job_), bridge_->sentPerStep());
  }
  return core::okStatus();
}

// A c10d collective cannot be interrupted: its own timeout bounds how long
// a peer that stopped without closing holds the others (a 4 MB bucket takes
// milliseconds, a slow link's cross-island leg is not in it).
double Trainer::c10dTimeoutSeconds() const { return std::max(20.0, 10 * job_.strategy.failure_timeout); }

core::Status Trainer::setupIslandBackend(const std::vector<int>& ranks, DpComm* group) {
  if (job_.strategy.island_collectives != "c10d" || ranks.size() < 2 || !group) return core::okStatus();
  // Built by the whole gradient group at once: a joiner, or a job already
  // short of a member, goes through comm like the others did since.
  if (elastic() && (opt_.elastic->joined() || static_cast<int>(alive_.size()) != world_)) return core::okStatus();
  if (!world_group_) return core::invalidArgument("strategy.island_collectives: c10d needs the world comm group");
  if (!groups_.world) groups_.world = world_group_;
  std::map<int, std::vector<int>> by_island;  // island index -> its ranks of the group
  for (int r : ranks) by_island[workers_[static_cast<size_t>(r)].island_index].push_back(r);
  const std::vector<int>& mine = by_island[me_.island_index];
  C10dBackendOptions o;
  o.position = static_cast<int>(std::find(mine.begin(), mine.end(), rank_) - mine.begin());
  o.island_size = static_cast<int>(mine.size());
  o.islands = static_cast<int>(by_island.size());
  o.host = opt_.host;
  o.device = place_.device;
  o.dtype = tc_.reduce_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  o.timeout_s = c10dTimeoutSeconds();
  ARCH_ASSIGN_OR_RETURN(o.island_group, groups_.of(mine, "c10d rendezvous"));
  o.blocks = blocksOf(by_island, ranks);
  if (o.islands > 1) {
    std::vector<int> cross;
    for (const auto& [island, ranks] : by_island) {
      if (ranks.size() != mine.size()) {
        return core::invalidArgument("strategy.island_collectives: c10d needs islands with equal worker counts in the "
                                     "gradient group (island " + std::to_string(island) + " has " +
                                     std::to_string(ranks.size()) + ", this one " + std::to_string(mine.size()) + ")");
      }
      cross.push_back(ranks[static_cast<size_t>(o.position)]);
    }
    ARCH_ASSIGN_OR_RETURN(auto codec, comm::parseCodec(job_.strategy.codec));
    ARCH_ASSIGN_OR_RETURN(auto cg, groups_.of(cross, "c10d cross-island"));
    // The strait codec as on the world group's hierarchical allreduce (several islands here).
    const bool hierarchical = job_.strategy.allreduce == "hierarchical" || job_.strategy.allreduce == "auto";
    island_crosses_.push_back(std::make_unique<GroupDp>(cg, hierarchical, codec, 0));
    o.cross = island_crosses_.back().get();
  }
  ARCH_ASSIGN_OR_RETURN(auto made, makeC10dBackend(o));
  IslandBackend* backend = island_backends_.emplace_back(std::move(made)).get();
  // The data part's buckets, or the experts' gradients (their own group).
  if (data_ && group == data_->group()) {
    data_->setBackend(backend);
    if (rank_ == ranks.front()) ARCH_LOG_INFO("gradient buckets: {}", backend->describe());
  }
  if (experts_ && group == experts_->group()) {
    experts_->setBackend(backend);
    if (rank_ == ranks.front()) ARCH_LOG_INFO("expert gradients: {}", backend->describe());
  }
  // ZeRO's gathers and reduce-scatters over the group: block r is its rank
  // r, island i's part of it the cross group's rank i.
  const auto island_rank = std::distance(by_island.begin(), by_island.find(me_.island_index));
  const auto my_block = std::find(ranks.begin(), ranks.end(), rank_) - ranks.begin();
  if (optim_->stage() >= 1 && my_block == group->rank() && (!o.cross || o.cross->rank() == island_rank)) {
    optim_->setBackend(group, backend);
    if (params_shard_) params_shard_->setBackend(group, backend);
    if (rank_ == ranks.front()) ARCH_LOG_INFO("ZeRO-{} collectives: {}", optim_->stage(), backend->describe());
  }
  return core::okStatus();
}

// ZeRO-3: the sharded parameters gather, free and reduce unit by unit
// around the model's layers, with every member (everybody, or a stage's
// replicas) running the same passes; with expert parallelism the experts
// over their own group, and every member of an expert group the agreed
// micro-batch count (runSchedule).
core::Status Trainer::makeShardedParts() {
  std::vector<bool> norm_segments;  // TP: slices on every rank, the replicated tensors on TP rank 0
  if (tensor_) {
    for (bool whole : tensor_->replicated()) norm_segments.push_back(tp_rank_ == 0 || !whole);
  }
  std::vector<parallel::ShardGroup> groups;
  for (const auto& p : optim_->pieces()) {
    groups.push_back({p.dp, p.sharded() ? p.offsets : std::vector<int64_t>{p.begin, p.end}});
  }
  params_shard_ =
      std::make_unique<parallel::ShardedParameters>(*flat_, std::move(groups), unit_cut_, std::move(norm_segments));
  if (tensor_ && tp_stage_group_) tensor_->setShardGroup(tp_stage_group_);
  net_->setLayerHooks(params_shard_.get());
  const int64_t agreed = ep_ ? parallel::expertMicroCount(shares_, tc_.micro_batch, lay_.stages) : 0;
  if (pp_) {
    auto pipe = makePipeline();
    pipe->setPassHooks(params_shard_.get());
    pipe->setAgreedCount(agreed);
    schedule_ = std::move(pipe);
  } else {
    auto mb = std::make_unique<parallel::MicroBatchSchedule>(net_, tc_.micro_batch, me_.slowdown);
    mb->setPassHooks(params_shard_.get());
    mb->setAgreedCount(agreed);
    schedule_ = std::move(mb);
  }
  return split() ? setupSplitBackends() : setupIslandBackend(grad_ranks_, grad_dp_);
}

core::Status Trainer::makeParts() {
  parallel::DataParallelOptions dopt;
  dopt.bucket_bytes = static_cast<int64_t>(job_.strategy.bucket_bytes);
  dopt.reduce_dtype = tc_.reduce_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  if (optim_->stage() == 3) return makeShardedParts();
  if (!split()) {
    // Every rank holds everything: buckets overlap with backward (a group of
    // more than one rank now or after a membership change to overlap with).
    dopt.overlap = elastic() ? world_ > 1 : grad_dp_->size() > 1;
    if (optim_->stage() == 2) {
      // The optimizer's group is the gradient group here (sync, no inner group).
      dopt.shard_offsets = optim_->pieces()[0].offsets;
    }
    data_ = std::make_unique<parallel::DataParallel>(*flat_, grad_dp_, dopt);
    auto mb = std::make_unique<parallel::MicroBatchSchedule>(net_, tc_.micro_batch, me_.slowdown);
    mb->onFinalBackward([this] { data_->beforeFinalBackward(); });
    schedule_ = std::move(mb);
    return setupIslandBackend(grad_ranks_, grad_dp_);
  }
  // Stages and expert groups talk during backward: reductions after it. The
  // replicated tensors count in the global norm from the inner group's first
  // pipeline, the experts from its first expert group.
  const int d = replica_ - job_lay_.replicaOf(grad_ranks_.front());
  int first_expert_seg = -1;
  for (size_t i = 0; ep_ && i < flat_->segments().size(); ++i) {
    if (parallel::isExpertTensor(flat_->segments()[i].name)) {
      first_expert_seg = static_cast<int>(i);
      break;
    }
  }
  dopt.seg_end = first_expert_seg;
  dopt.overlap = false;
  dopt.replicated_norm = false;
  dopt.norm_owner = d == 0;
  // ZeRO-2: gradients reduce-scattered to the optimizer's slices, the dense
  // ones over the stage group, the experts over the ranks holding them; each
  // rank's slices of the summed gradients count in the norm.
  const bool zero2 = optim_->stage() == 2;
  const parallel::OptimizerPiece& dense_piece = optim_->pieces().front();
  if (zero2 && dense_piece.sharded()) {
    dopt.shard_offsets = dense_piece.offsets;
    // Per-island layouts: every island holds the job's sum after the bridge; the first one's slices count.
    dopt.norm_owner = !job_lay_.perIsland() || lay_.base == job_lay_.of(grad_ranks_.front()).base;
  }
  // Tensor parallelism: slices count on every rank of the group, the
  // replicated tensors on its rank 0.
  if (tensor_) {
    for (bool whole : tensor_->replicated()) dopt.norm_segments.push_back(tp_rank_ == 0 || !whole);
  }
  data_ = std::make_unique<parallel::DataParallel>(*flat_, stage_dp_.get(), dopt);
  // The experts count in the norm from the first expert group, or (ZeRO-2)
  // each holder its slice, and (TP: the MoE layers are replicated in the
  // group) from its TP rank 0.
  if (ep_) {
    const parallel::OptimizerPiece& expert_piece = optim_->pieces().back();
    const bool sharded = zero2 && expert_piece.sharded();
    experts_ = std::make_unique<parallel::ExpertParallel>(*flat_, n_dense_, expert_dp_.get(),
                                                          (sharded || d < lay_.ep) && tp_rank_ == 0, exchange_,
                                                          sharded ? expert_piece.offsets : std::vector<int64_t>{});
  }
  const int64_t agreed = ep_ ? parallel::expertMicroCount(shares_, tc_.micro_batch, lay_.stages) : 0;
  if (!pp_) {
    auto mb = std::make_unique<parallel::MicroBatchSchedule>(net_, tc_.micro_batch, me_.slowdown);
    mb->setAgreedCount(agreed);
    schedule_ = std::move(mb);
  } else {
    auto pipe = makePipeline();
    pipe->setAgreedCount(agreed);
    schedule_ = std::move(pipe);
  }
  return setupSplitBackends();
}

// A split layout's c10d backends: the stage group's (its buckets and
// ZeRO), and with expert parallelism the expert group's (the experts'
// gradients and ZeRO). With per-island layouts both lie inside the island;
// the bridge across islands stays on comm.
core::Status Trainer::setupSplitBackends() {
  ARCH_RETURN_IF_ERROR(setupIslandBackend(sameStageRanks(), stage_dp_.get()));
  return ep_ ? setupIslandBackend(sameExpertRanks(), expert_dp_.get()) : core::okStatus();
}

std::unique_ptr<parallel::PipelineParallel> Trainer::makePipeline() {
  parallel::PipelineOptions po;
  po.stage = stage_;
  po.stages = lay_.stages;
  po.rank = rank_;
  po.prev_rank = rank_ - lay_.tp;
  po.next_rank = rank_ + lay_.tp;
  po.seq_parts = net_->sequenceParallel() ? lay_.tp : 1;
  po.micro_batch = tc_.micro_batch;
  po.recompute = tc_.recompute;
  po.dim = mcfg_.dim;
  po.dtype = place_.compute;  // activations cross in fp32; each stage casts to its own dtype
  po.prev_codec = prev_codec_;
  po.next_codec = next_codec_;
  po.slowdown = me_.slowdown;
  return std::make_unique<parallel::PipelineParallel>(net_, groups_.world, po);
}

}  // namespace archipelago::runtime::loop
