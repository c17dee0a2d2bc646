// The one training loop (docs/runtime.md "The loop"): internal to the
// runtime; the public entry point is runTrainer (runtime/trainer.h).
//
// One Trainer per worker process owns the data, the model shard, the flat
// parameters and the optimizer, metrics, evaluation, checkpoints, the outer
// sync (DiLoCo / streaming) and elasticity. Parallelism comes as parts
// (runtime/parallel/part.h): a schedule (micro-batches, or 1F1B pipeline
// stages) runs forward/backward, data-parallel and expert parts reduce the
// gradients of the tensors they cover and contribute to the global norm.
//
// State that must be identical on every replica: flat parameters (+ model
// buffers), optimizer state, step, sampler position, outer-sync state. With
// an ElasticSession the loop also keeps the last committed step's copy of
// that state in memory, so a step that a failure interrupts is abandoned
// and retried in the next epoch. Layouts that split the model (pipeline
// stages, expert groups) cannot shrink: a failure there stops the worker
// for a restart from the newest checkpoint (docs/parallelism.md "Failures").
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/cpu_time.h"
#include "archipelago/core/hash.h"
#include "archipelago/data/dataset.h"
#include "archipelago/model/fp8.h"
#include "archipelago/model/transformer.h"
#include "archipelago/plan/worker_memory.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/dp_comm_group.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/island_backend.h"
#include "archipelago/runtime/loss_scaler.h"
#include "archipelago/runtime/placement.h"
#include "archipelago/report/metrics.h"
#include "archipelago/runtime/trace.h"
#include "archipelago/runtime/outer_sync.h"
#include "archipelago/runtime/shard_map.h"
#include "archipelago/runtime/parallel/data_parallel.h"
#include "archipelago/runtime/parallel/sharded_params.h"
#include "archipelago/runtime/parallel/expert.h"
#include "archipelago/runtime/parallel/island_bridge.h"
#include "archipelago/runtime/parallel/layout.h"
#include "archipelago/runtime/parallel/optimizer_shard.h"
#include "archipelago/runtime/parallel/part.h"
#include "archipelago/runtime/parallel/pipeline.h"
#include "archipelago/runtime/parallel/tensor_parallel.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/loop/rebalancer.h"

namespace archipelago::runtime::loop {

double wallSeconds();
void hashTensor(core::Sha256& h, const torch::Tensor& t);
// Test hook of the integrity tests: ARCHIPELAGO_TEST_CORRUPT_PARAMS=RANK:STEP
// perturbs that rank's parameters right after that step (a silent
// divergence the replica check must find and repair).
std::pair<int, int64_t> corruptParamsHook();

// A failure the membership can answer (a peer lost, cut off, too slow, or
// a corrupted frame): the codes the comm layer gives them. Anything else (a
// bad input, a bug, a device error) is not retried in another epoch.
bool isPeerFailure(const core::Status& st);

// Groups over rank sets of the world, one object per set and channel (two
// group objects over one rank set and channel would share wire tags;
// comm::Group::subgroup).
struct GroupCache {
  std::shared_ptr<comm::Group> world;
  std::map<std::pair<std::vector<int>, std::string>, std::shared_ptr<comm::Group>> cache;
  core::Result<std::shared_ptr<comm::Group>> of(const std::vector<int>& ranks, const std::string& channel = "");
};

// What a rank holds of the checkpointed state: per kind ("weight",
// "exp_avg", "exp_avg_sq", "outer.anchor", "outer.momentum") pieces of the
// single-process layout with 1-D views of their values, and its buffers.
struct HeldState {
  struct Entry {
    std::string kind;
    ShardPiece piece;
    torch::Tensor values;
  };
  std::vector<Entry> entries;
  NamedTensors buffers;
};

class Trainer {
 public:
  explicit Trainer(const TrainerOptions& opt) : opt_(opt), job_(opt.job), tc_(job_.train) {}
  core::Result<TrainSummary> run();

 private:
  core::Status loop();
  core::Result<TrainSummary> finish(core::Clock::time_point t_start);
  // ---- set-up (setup.cpp) ----
  core::Status setup();
  core::Status setupData();
  core::Status setupModel();
  void bindFlat(const std::vector<std::pair<std::string, torch::Tensor>>& named);
  // The worker's device and dtype (placement.h) and its loss scaler.
  core::Status setupPlacement();
  core::Status setupOptimizer();
  core::Status setupStrategy();
  void setupOutputs();
  // Pipeline / expert layouts: the groups of stage, expert group and
  // inner scope; then the parts of this rank (parts.cpp).
  core::Status setupSplitGroups();
  core::Status setupBridge();
  // strategy.island_collectives: c10d: the native backend of data_'s
  // buckets and ZeRO's collectives over `group`, the DpComm of `ranks`
  // (the gradient group, or a split layout's stage group).
  core::Status setupIslandBackend(const std::vector<int>& ranks, DpComm* group);
  core::Status setupSplitBackends();
  double c10dTimeoutSeconds() const;
  // ---- FP8 delayed scaling by step (fp8_steps.cpp) ----
  void setupFp8Steps();
  void fp8BeginStep();
  core::Status fp8EndStep();  // the step's amaxes, largest over the gradient group, entered
  void snapshotFp8(CheckpointState& s) const;
  void resumeFp8(const std::string& dir, const CheckpointState& ck);
  // Every history as one [slots, length + 1] fp32 CPU tensor (amaxes newest
  // first, then the step count), in the slots' order, which every rank
  // shares: what a commit, a state transfer and a checkpoint keep.
  torch::Tensor fp8State() const;
  void loadFp8State(const torch::Tensor& state);
  static void loadFp8Row(model::AmaxHistory& h, const torch::Tensor& row);
  core::Status makeParts();
  core::Status makeShardedParts();  // train.zero: 3
  std::unique_ptr<parallel::PipelineParallel> makePipeline();
  void bindComm();
  core::Status makeOuter(const NamedTensors* tensors, const nlohmann::json* state);
  core::Status outerByName(OuterContext& ctx);
  // After a membership change: the strategy again, from the committed outer state.
  core::Status rebuildOuterFromCommit();
  core::Result<std::vector<int64_t>> initialShares() const;
  void predict();
  // The planner's memory model for this worker, and the peak measured (memory_prediction.cpp).
  plan::WorkerLayout memoryLayout() const;
  void predictMemory();
  void noteTensorPeak();  // before the peak is reset for the next step record
  void logMemory() const;
  void logStart() const;

  // ---- one step (step.cpp) ----
  core::Status trainStep();
  core::Status runSchedule(const data::Batch& batch, double group_samples, parallel::StepStats& stats);
  core::Status reduceAndStep(int64_t step, parallel::StepStats& stats, double& comm_s, double& optimizer_s,
                             double& grad_norm);
  core::Status routerBias();
  core::Status routerBiasAcrossIslands();
  // Per-island layouts: kInternal unless every island holds the same model.
  core::Status compareIslands();
  std::vector<int64_t> moeLayerIds() const;
  // Loss, tokens, aux, "a newer epoch is published", stop request: summed
  // over the group that must agree at this step.
  core::Status controlValues(int64_t step, const parallel::StepStats& stats, double (&ctrl)[5], double& comm_s);
  core::Status rebalance();
  core::Status afterStep(const parallel::StepStats& stats, const data::Batch& batch, double loss, double lr,
                         double grad_norm, const std::vector<int64_t>& old_shares, double step_s, double cpu0,
                         int64_t faults0, double comm_s, double data_s, double optimizer_s);
  core::Status boundaries(bool at_end);
  core::Status writeSplitMetrics(const parallel::StepStats& stats);
  void writePipelineRecord(const std::vector<double>& timing, int64_t micro_batches);
  void writeMoeMetrics();
  core::Result<double> evaluate();
  void event(const std::string& name, report::EventRecord e);
  double groupSamples() const;

  // ---- checkpoints by tensor name (checkpointing.cpp, checkpoint_gather.cpp, resume.cpp) ----
  // Every rank holds a whole copy of the state (no pipeline stages, expert
  // groups or optimizer shards): the writer needs nobody's pieces.
  bool holdsWholeCopy() const { return !split() && !optim_->sharded(); }
  CheckpointState snapshotHead(int64_t step) const;
  // The writer's: the single-process state; the others': empty, or with
  // DiLoCo on a whole-copy layout their own full state (cut by rankPart).
  core::Result<CheckpointState> snapshot(int64_t step);
  core::Result<CheckpointState> assembleSnapshot(int64_t step, const AssembledState& got);
  HeldState heldState();
  void absorbHeld(const HeldState& held, AssembledState& got) const;
  core::Status gatherHeld(const HeldState& held, AssembledState& got);
  core::Status gatherFrom(comm::Group& g, int r, AssembledState& got);
  core::Status resumeFromCheckpoint();
  core::Status loadPieces(const std::string& dir, const CheckpointState& ck);
  core::Status resumeOuter(const std::string& dir, const CheckpointState& ck);
  // DiLoCo / streaming checkpoints: the rank parts the writer's checkpoint
  // lists, and this rank's part cut from its snapshot (docs/runtime.md).
  nlohmann::json rankParts() const;
  CheckpointState rankPart(CheckpointState full) const;
  // The state of this rank's island and its residuals from the checkpoint's
  // rank parts, over what the writer's files hold (no-op for sync jobs).
  core::Status applyRankParts(const std::string& ckpt_dir, CheckpointState& ck);
  core::Status writeCheckpoint(bool at_end);

  // ---- elasticity (replica_state.cpp, recovery.cpp) ----
  bool elastic() const { return opt_.elastic != nullptr; }
  // The layout splits the model over ranks (pipeline stages, expert groups,
  // tensor-parallel slices, or islands of different layouts).
  bool split() const { return pp_ || ep_ || tp_ || job_lay_.perIsland(); }
  // Sequence parallelism over MoE layers: each rank of the TP group routes
  // its block of the sequence (loads and routing statistics are per rank).
  bool routesSequenceBlocks() const { return tp_ && job_.strategy.sequence_parallel && mcfg_.moe.num_experts > 0; }
  // The ZeRO stage this run applies (train.zero under synchronous data
  // parallelism, over the ranks holding the same tensors).
  int zeroInUse() const;
  DpComm* zeroGroup() const;
  std::vector<parallel::OptimizerRange> optimizerRanges() const;
  // The ranks of the inner group that hold this rank's tensors (a split
  // layout: the same stage and tensor-parallel rank), this one included.
  std::vector<int> sameStageRanks() const;
  // Of those, the ranks holding this rank's experts (expert parallelism).
  std::vector<int> sameExpertRanks() const;
  // The part reducing the replicated tensors: data parallelism, or ZeRO-3's sharded parameters.
  parallel::Part& densePart() { return params_shard_ ? static_cast<parallel::Part&>(*params_shard_) : *data_; }
  // Where the failure behind an exception thrown inside the model's
  // collectives is kept (sharded parameters, expert exchange,
  // tensor-parallel group): those this layout has.
  std::vector<const core::Status*> modelCommFailure() const;
  bool amWriter() const { return alive_.empty() || alive_.front() == rank_; }
  // Whether this rank writes the records of a membership change (failure,
  // epoch, recovered): the lowest-ranked member of the new epoch that was a
  // member of the old one (`before`). Not amWriter(): when the lowest rank
  // is a joiner, it knows neither the old epoch nor the failure, and takes
  // another path (run()), so the change went unrecorded.
  bool recordsChange(const std::vector<int>& before) const;
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
  // What a digest covers: the parameters (and buffers); kReplica adds the
  // FP8 histories (what a gradient group's members must agree on after
  // every step); kWhole adds the optimizer state, the step and the outer state.
  enum class DigestOf { kParams, kReplica, kWhole };
  core::Sha256Digest stateDigest(DigestOf what);
  core::Status saveAndStop(const core::Status& why);
  // `before`: the members of the epoch this rank leaves (empty for a joiner).
  core::Status enterNextEpoch(core::Status cause, const std::string& why, const std::vector<int>& before);

  TrainerOptions opt_;
  core::JobConfig job_;
  const core::TrainConfig& tc_;
  core::ModelConfig mcfg_;       // resolved
  LocalDp local_;
  DpComm* dp_ = nullptr;         // world (alive ranks)
  DpComm* grad_dp_ = nullptr;    // the inner synchronous group: world, or with DiLoCo the island
  std::shared_ptr<comm::Group> world_group_;
  std::vector<int> alive_;       // slots alive in this epoch, ascending
  std::vector<int> grad_ranks_;  // slots of the inner group (whose samples make up one gradient)
  int rank_ = 0;
  int world_ = 1;                // slots of the cluster spec (1: single process)
  std::vector<WorkerInfo> workers_;
  WorkerInfo me_;
  DevicePlacement place_;               // device and compute dtype of this worker
  std::optional<LossScaler> scaler_;
  int64_t T_ = 0;

  // ---- layout ----
  parallel::ParallelLayout lay_;  // this rank's span; plain data parallelism: one stage, one expert member
  parallel::JobLayout job_lay_;   // every span: lay_ alone, or (per-island layouts) every island's
  bool pp_ = false, ep_ = false, tp_ = false;
  int stage_ = 0, replica_ = 0;
  int tp_rank_ = 0;               // this rank's place in its tensor-parallel group
  int share_index_ = 0;           // this rank's slot in shares_ (its pipeline with PP)
  int64_t n_dense_ = 0;           // EP: flat [0, n_dense_) replicated, [n_dense_, end) this member's experts
  GroupCache groups_;
  std::unique_ptr<GroupDp> stage_dp_;   // same-stage ranks of the inner group (replicated tensors)
  std::unique_ptr<GroupDp> expert_dp_;  // same-stage ranks of the inner group holding the same experts
  std::unique_ptr<GroupDp> island_dp_;  // the inner group when the session has none of that rank set
  LocalDp local_island_;
  std::shared_ptr<parallel::RuntimeExpertExchange> exchange_;
  std::shared_ptr<parallel::TensorParallelCollectives> tp_comm_;
  std::shared_ptr<comm::Group> tp_stage_group_;  // ZeRO-3 with SP: the stage's ranks of every TP rank
  comm::CodecKind prev_codec_ = comm::CodecKind::kNone, next_codec_ = comm::CodecKind::kNone;
  // DiLoCo on a split layout: the ranks holding the same tensors in every
  // island run the outer step on them; one of them per island counts tokens.
  std::vector<int> outer_ranks_;
  bool outer_counts_tokens_ = false;

  // ---- parts ----
  std::unique_ptr<parallel::Part> schedule_;         // micro-batches or 1F1B
  std::unique_ptr<parallel::DataParallel> data_;     // the replicated tensors
  // strategy.island_collectives: c10d, one per group this rank sums over
  // (the gradient or stage group, the expert group), of the first epoch
  // (dropped at the next epoch; comm carries on).
  std::vector<std::unique_ptr<IslandBackend>> island_backends_;
  std::vector<std::unique_ptr<DpComm>> island_crosses_;
  // FP8 delayed scaling: every history of the whole model by
  // "<linear>.input|weight|grad" (fp8_steps.cpp).
  struct Fp8Slot {
    std::string name;
    model::AmaxHistory* history;  // null: a row of fp8_shadow_
  };
  std::vector<Fp8Slot> fp8_slots_;
  std::vector<int64_t> fp8_real_, fp8_shadow_rows_;  // slot indices: with a history, without
  torch::Tensor fp8_shadow_;  // [slots without a history, length + 1] fp32, CPU, rows as fp8State()'s
  std::unique_ptr<parallel::ExpertParallel> experts_;  // EP: this member's experts
  std::unique_ptr<parallel::TensorParallel> tensor_;   // TP: the replicated tensors under SP
  std::unique_ptr<parallel::ShardedParameters> params_shard_;  // ZeRO-3 (then no data_)
  std::unique_ptr<parallel::IslandBridge> bridge_;  // per-island layouts: the sum across islands by name
  parallel::UnitCut unit_cut_;  // ZeRO-3: the units the parameters are gathered by

  std::unique_ptr<data::PreparedDataset> ds_;
  std::optional<data::Sampler> train_sampler_, val_sampler_;
  model::Transformer net_{nullptr};
  std::optional<FlatParams> flat_;
  std::vector<std::pair<std::string, torch::Tensor>> buffers_;  // model tensors that are not parameters
  std::unique_ptr<FlatAdamW> adam_;
  std::unique_ptr<parallel::OptimizerShard> optim_;  // AdamW's range: all, or this rank's ZeRO-1 slice
  std::optional<ShardMap> shard_map_;  // this rank's flat buffer as pieces of the single-process model
  std::vector<int64_t> shares_;   // per slot: rank, or pipeline with PP
  // Per-island layouts under DiLoCo: the outer sync's exchange by tensor
  // name (declared before outer_: its thread uses it until outer_ is gone).
  std::unique_ptr<parallel::IslandBridge> outer_bridge_;
  std::unique_ptr<OuterSync> outer_;
  bool exact_outer_ = true;  // outer state can be committed per step (nothing in flight between steps)
  std::vector<Fragment> outer_frags_;
  NamedTensors resume_outer_tensors_;  // the outer state a resume found
  nlohmann::json resume_outer_json_;
  std::unique_ptr<Rebalancer> rebalancer_;

  report::MetricsSink metrics_;
  TraceRecorder trace_;
  std::unique_ptr<CheckpointWriter> ckpt_;
  std::string job_yaml_;
  double predicted_step_s_ = 0;
  double predicted_tensor_bytes_ = 0;
  int64_t measured_tensor_peak_ = 0;

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
    nlohmann::json scaler;
    std::vector<int64_t> shares;
    size_t losses = 0;
    torch::Tensor params, m, v;
    std::vector<torch::Tensor> buffers;
    torch::Tensor fp8;  // fp8State()
    NamedTensors outer_tensors;
    nlohmann::json outer_json;
    bool outer_valid = false;
  } commit_;
  // Recovery bookkeeping for events.
  double commit_s_ = 0;         // time the last commit() took (the elastic bookkeeping per step)
  double failure_at_ = 0;       // wall seconds the step failed
  bool records_recovery_ = false;  // writes the "recovered" record (recordsChange)
  int64_t failed_step_ = -1;
  bool first_step_after_change_ = false;
  int64_t warm_from_ = 0;  // step of the last start or membership change (the rebalancer's warm-up counts from it)
};

}  // namespace archipelago::runtime::loop
