// The training loop for pipeline-parallel and expert-parallel jobs (see
// include/archipelago/runtime/parallel_trainer.h and docs/parallelism.md).
#include "archipelago/runtime/parallel_trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

#include <torch/torch.h>

#include "archipelago/comm/communicator.h"
#include "archipelago/core/clock.h"
#include "archipelago/core/host_memory.h"
#include "archipelago/core/log.h"
#include "archipelago/core/shares.h"
#include "archipelago/data/dataset.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/comm_dp.h"
#include "archipelago/runtime/elastic.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/metrics.h"
#include "archipelago/runtime/outer_sync.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;

namespace {

constexpr uint32_t kTagActivation = 11;
constexpr uint32_t kTagGradient = 12;
constexpr uint32_t kTagCheckpoint = 13;
constexpr uint32_t kTagEval = 14;
constexpr double kP2pTimeoutS = 600;

comm::OpOptions p2pOptions() { return comm::OpOptions::within(kP2pTimeoutS); }

[[noreturn]] void throwStatus(const core::Status& st) { throw std::runtime_error(st.toString()); }

bool isExpertTensor(const std::string& name) { return name.find(".block_sparse_moe.experts.") != std::string::npos; }

// Sends fp32 tensors (optionally codec-encoded) to neighbours on a thread of
// its own, so a stage never blocks on a send while its neighbour blocks on a
// send the other way (1F1B exchanges activations and gradients both ways).
class AsyncSender {
 public:
  explicit AsyncSender(comm::Group* group) : group_(group), thread_([this] { loop(); }) {}
  ~AsyncSender() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  // `t` is fp32 and contiguous; kept alive until sent.
  void push(torch::Tensor t, comm::CodecKind codec, int dst, uint32_t tag) {
    Item it;
    it.dst = dst;
    it.tag = tag;
    if (codec == comm::CodecKind::kNone) {
      it.tensor = std::move(t);
    } else {
      it.bytes.resize(comm::encodedSize(codec, static_cast<size_t>(t.numel())));
      comm::encode(codec, std::span<const float>(t.data_ptr<float>(), static_cast<size_t>(t.numel())), it.bytes);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(it));
    }
    cv_.notify_all();
  }
  // Waits until everything pushed is sent; the first error, if any.
  core::Status drain() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return queue_.empty() && !busy_; });
    return error_;
  }

 private:
  struct Item {
    torch::Tensor tensor;
    std::vector<uint8_t> bytes;
    int dst = 0;
    uint32_t tag = 0;
  };
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      Item it = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
      const bool skip = !error_.isOk();
      lock.unlock();
      core::Status st;
      if (!skip) {
        st = it.tensor.defined()
                 ? group_->send(it.tensor.data_ptr<float>(), static_cast<size_t>(it.tensor.numel()), comm::DType::kF32,
                                it.dst, it.tag, p2pOptions())
                 : group_->send(it.bytes.data(), it.bytes.size(), comm::DType::kU8, it.dst, it.tag, p2pOptions());
      }
      lock.lock();
      if (!st.isOk() && error_.isOk()) error_ = st.withContext("pipeline send to rank " + std::to_string(it.dst));
      busy_ = false;
      cv_.notify_all();
    }
  }
  comm::Group* group_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool busy_ = false;
  bool stop_ = false;
  core::Status error_;
  std::thread thread_;
};

// Blocking receive of `shape` fp32 values (decoded when a codec is set).
torch::Tensor recvTensor(comm::Group& g, std::vector<int64_t> shape, comm::CodecKind codec, int src, uint32_t tag) {
  torch::Tensor out = torch::empty(shape, torch::kFloat);
  const size_t n = static_cast<size_t>(out.numel());
  core::Status st;
  if (codec == comm::CodecKind::kNone) {
    st = g.recv(out.data_ptr<float>(), n, comm::DType::kF32, src, tag, p2pOptions());
  } else {
    std::vector<uint8_t> bytes(comm::encodedSize(codec, n));
    st = g.recv(bytes.data(), bytes.size(), comm::DType::kU8, src, tag, p2pOptions());
    if (st.isOk()) st = comm::decode(codec, bytes, std::span<float>(out.data_ptr<float>(), n));
  }
  if (!st.isOk()) throwStatus(st.withContext("pipeline receive from rank " + std::to_string(src)));
  return out;
}

// ExpertExchange over a comm group (the expert-parallel group).
class CommExpertExchange final : public model::ExpertExchange {
 public:
  CommExpertExchange(std::shared_ptr<comm::Group> group, std::vector<int64_t> expert_begin, comm::CodecKind codec)
      : group_(std::move(group)), eb_(std::move(expert_begin)), codec_(codec) {}
  int size() const override { return group_->size(); }
  int rank() const override { return group_->rank(); }
  const std::vector<int64_t>& expertBegin() const override { return eb_; }
  uint64_t bytesSent() const { return bytes_; }

  std::vector<int64_t> alltoallvInt64(const std::vector<int64_t>& in, const std::vector<int64_t>& send_counts,
                                      const std::vector<int64_t>& recv_counts) override {
    std::vector<size_t> sc(send_counts.begin(), send_counts.end()), rc(recv_counts.begin(), recv_counts.end());
    size_t total = 0;
    for (size_t c : rc) total += c;
    std::vector<int64_t> out(total);
    auto st = group_->alltoallv(in.data(), sc, out.data(), rc, comm::DType::kI64, comm::OpOptions::within(kP2pTimeoutS));
    if (!st.isOk()) throwStatus(st.withContext("expert all-to-all (counts)"));
    return out;
  }

  torch::Tensor alltoallvRows(const torch::Tensor& rows, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows) override {
    const int64_t dim = rows.size(1);
    torch::Tensor f = rows.to(torch::kFloat).contiguous();
    int64_t total = 0;
    for (auto r : recv_rows) total += r;
    torch::Tensor out = torch::empty({total, dim}, torch::kFloat);
    const int g = size();
    core::Status st;
    if (codec_ == comm::CodecKind::kNone) {
      std::vector<size_t> sc, rc;
      for (int j = 0; j < g; ++j) {
        sc.push_back(static_cast<size_t>(send_rows[static_cast<size_t>(j)] * dim));
        rc.push_back(static_cast<size_t>(recv_rows[static_cast<size_t>(j)] * dim));
        if (j != rank()) bytes_ += sc.back() * 4;
      }
      st = group_->alltoallv(f.data_ptr<float>(), sc, out.data_ptr<float>(), rc, comm::DType::kF32,
                             comm::OpOptions::within(kP2pTimeoutS));
    } else {
      // Each destination's block is encoded on its own (own block too, so
      // what a member computes on is what it would have received).
      std::vector<size_t> sb, rb;
      size_t sbytes = 0, rbytes = 0;
      for (int j = 0; j < g; ++j) {
        sb.push_back(comm::encodedSize(codec_, static_cast<size_t>(send_rows[static_cast<size_t>(j)] * dim)));
        rb.push_back(comm::encodedSize(codec_, static_cast<size_t>(recv_rows[static_cast<size_t>(j)] * dim)));
        sbytes += sb.back();
        rbytes += rb.back();
        if (j != rank()) bytes_ += sb.back();
      }
      std::vector<uint8_t> in(sbytes), got(rbytes);
      const float* src = f.data_ptr<float>();
      size_t off = 0;
      for (int j = 0; j < g; ++j) {
        const size_t n = static_cast<size_t>(send_rows[static_cast<size_t>(j)] * dim);
        comm::encode(codec_, std::span<const float>(src, n), std::span<uint8_t>(in.data() + off, sb[static_cast<size_t>(j)]));
        src += n;
        off += sb[static_cast<size_t>(j)];
      }
      st = group_->alltoallv(in.data(), sb, got.data(), rb, comm::DType::kU8, comm::OpOptions::within(kP2pTimeoutS));
      float* dst = out.data_ptr<float>();
      off = 0;
      for (int j = 0; j < g && st.isOk(); ++j) {
        const size_t n = static_cast<size_t>(recv_rows[static_cast<size_t>(j)] * dim);
        st = comm::decode(codec_, std::span<const uint8_t>(got.data() + off, rb[static_cast<size_t>(j)]),
                          std::span<float>(dst, n));
        dst += n;
        off += rb[static_cast<size_t>(j)];
      }
    }
    if (!st.isOk()) throwStatus(st.withContext("expert all-to-all (rows)"));
    return out.to(rows.scalar_type());
  }

 private:
  std::shared_ptr<comm::Group> group_;
  std::vector<int64_t> eb_;
  comm::CodecKind codec_;
  uint64_t bytes_ = 0;
};

torch::Tensor idsTensor(const std::vector<int64_t>& v, int64_t offset_rows, int64_t n, int64_t t) {
  return torch::from_blob(const_cast<int64_t*>(v.data()) + offset_rows * t, {n, t}, torch::kInt64).clone();
}

// [begin, end) of micro-batch i when n samples are cut into m near-equal parts.
std::pair<int64_t, int64_t> microRange(int64_t n, int64_t m, int64_t i) { return {n * i / m, n * (i + 1) / m}; }

// Micro-batches per step: ceil(n / micro_batch); without train.micro_batch,
// 2 per stage (a pipeline needs m >> p for a small bubble), at most n.
int64_t microCount(int64_t n, int64_t micro_batch, int stages) {
  if (n <= 0) return 0;
  if (micro_batch > 0) return (n + micro_batch - 1) / micro_batch;
  return std::min<int64_t>(n, stages > 1 ? 2 * stages : 1);
}

struct Groups {
  std::shared_ptr<comm::Group> world;
  std::map<std::vector<int>, std::shared_ptr<comm::Group>> cache;
  // The group of exactly these ranks; the same object for the same set (two
  // group objects over one rank set would share wire tags).
  core::Result<std::shared_ptr<comm::Group>> of(const std::vector<int>& ranks) {
    if (ranks == world->ranks()) return world;
    auto it = cache.find(ranks);
    if (it != cache.end()) return it->second;
    ARCH_ASSIGN_OR_RETURN(auto g, world->subgroup(ranks));
    cache[ranks] = g;
    return g;
  }
};

class Impl {
 public:
  explicit Impl(const TrainerOptions& opt) : opt_(opt) {}
  core::Result<TrainSummary> run();

 private:
  core::Status setup();
  core::Status resume();
  core::Result<CheckpointState> snapshot(int64_t step);
  core::Status pipelineStep(const data::Batch& batch, double total_samples, double& ce, double& aux, int64_t& tokens);
  core::Status expertStep(const data::Batch& batch, double total_samples, double& ce, double& aux, int64_t& tokens);
  core::Result<double> evaluate();
  core::Status makeOuter();
  void emulateSlowdown(double compute_s, const char* what, int64_t rows = -1);

  const TrainerOptions& opt_;
  core::JobConfig job_;
  core::ModelConfig mcfg_;  // resolved
  ParallelLayout lay_;
  LocalDp local_, local_island_;
  DpComm* dp_ = nullptr;
  // The inner (synchronous) group of a step: the world, or with DiLoCo this
  // rank's island (whole pipelines / expert groups, see parallelLayout).
  bool diloco_ = false;
  std::vector<int> scope_;         // its ranks, ascending
  int scope_first_replica_ = 0;    // its first pipeline
  int64_t scope_samples_ = 0;      // samples its pipelines take per step
  DpComm* step_dp_ = nullptr;      // over scope_
  std::unique_ptr<CommDp> island_dp_;
  // DiLoCo: the ranks holding the same tensors (same stage, same expert
  // member) in every island run the outer step on them.
  std::unique_ptr<OuterSync> outer_;
  std::vector<int> outer_ranks_;
  bool outer_counts_tokens_ = false;  // the first of outer_ranks_ on this island reports the island's tokens
  NamedTensors resume_outer_tensors_;
  nlohmann::json resume_outer_json_;
  int rank_ = 0, world_ = 1;
  WorkerInfo me_;
  std::vector<WorkerInfo> workers_;
  bool pp_ = false, ep_ = false;
  int stage_ = 0, replica_ = 0;
  int64_t T_ = 0;

  std::unique_ptr<data::PreparedDataset> ds_;
  std::optional<data::Sampler> train_sampler_, val_sampler_;
  model::Transformer net_{nullptr};
  std::optional<FlatParams> flat_;
  int64_t n_dense_ = 0;  // EP: flat [0, n_dense_) replicated, [n_dense_, end) this member's experts
  std::unique_ptr<FlatAdamW> adam_;
  std::vector<int64_t> shares_;  // per pipeline (PP) or per rank (EP)
  int share_index_ = 0;

  Groups groups_;
  std::unique_ptr<CommDp> stage_dp_;   // same-stage ranks of all pipelines in scope_ (replicated tensors)
  std::unique_ptr<CommDp> expert_dp_;  // EP: same-stage ranks in scope_ holding the same experts
  std::shared_ptr<CommExpertExchange> exchange_;
  std::unique_ptr<AsyncSender> sender_;
  comm::CodecKind prev_codec_ = comm::CodecKind::kNone, next_codec_ = comm::CodecKind::kNone;

  MetricsSink metrics_;
  TraceRecorder trace_;
  int64_t step_ = 0;
  int64_t micro_ = 0;       // micro-batches of the last step
  double busy_s_ = 0;       // compute (incl. emulated slowdown) of the last step
  std::map<std::pair<std::string, int64_t>, double> fastest_op_s_;  // (op, rows) -> fastest host time seen
  int64_t sched_begin_us_ = 0, sched_end_us_ = 0;
};

core::Status Impl::setup() {
  // Worker processes hand over an elastic session: its current epoch's
  // groups. A pipeline/expert split does not survive a lost rank (no
  // elastic recovery here): a failure ends the run, resume continues it.
  DpComm* dp = opt_.dp;
  std::shared_ptr<comm::Group> world_group = opt_.world_group;
  if (opt_.elastic) {
    dp = opt_.elastic->dp();
    world_group = opt_.elastic->worldGroup();
  }
  dp_ = dp ? dp : &local_;
  rank_ = dp_->rank();
  world_ = dp_->size();
  job_ = opt_.job;
  workers_ = workersOf(job_.cluster);
  if (static_cast<int>(workers_.size()) != world_) {
    return core::invalidArgument("strategy.pipeline_stages / strategy.expert_parallel need one process per worker of "
                                 "the cluster spec (" + std::to_string(workers_.size()) + "), got a world of " +
                                 std::to_string(world_));
  }
  if (world_ > 1 && !world_group) return core::invalidArgument("the parallel trainer needs the world comm group");
  me_ = workers_[static_cast<size_t>(rank_)];
  model::setComputeThreads(job_.train.threads_per_worker);
  core::holdFreedMemory();

  ARCH_ASSIGN_OR_RETURN(ds_, data::PreparedDataset::open(job_.data.dir));
  if (job_.model.vocab_size == 0) job_.model.vocab_size = ds_->vocabSize();
  T_ = job_.data.seq_len;
  ARCH_ASSIGN_OR_RETURN(auto ts, ds_->trainSampler(static_cast<uint64_t>(job_.data.seed), T_));
  train_sampler_.emplace(std::move(ts));
  if (job_.train.eval_every > 0) {
    auto vs = ds_->valSampler(T_);
    if (vs.isOk()) val_sampler_.emplace(std::move(vs).value());
  }
  ARCH_ASSIGN_OR_RETURN(mcfg_, model::resolveModelConfig(job_.model));
  ARCH_ASSIGN_OR_RETURN(lay_, parallelLayout(job_));
  pp_ = lay_.stages > 1;
  ep_ = lay_.ep > 1;
  stage_ = lay_.stageOf(rank_);
  replica_ = lay_.replicaOf(rank_);

  model::ModelShard shard;
  if (pp_) {
    shard.layer_begin = lay_.layerBegin(stage_);
    shard.layer_end = shard.layer_begin + lay_.stage_layers[static_cast<size_t>(stage_)];
  }
  const int member = lay_.epMemberOf(rank_);
  if (ep_) {
    shard.expert_begin = lay_.expert_begin[static_cast<size_t>(member)];
    shard.expert_end = lay_.expert_begin[static_cast<size_t>(member) + 1];
  }
  ARCH_ASSIGN_OR_RETURN(net_, model::buildModel(mcfg_, static_cast<uint64_t>(job_.train.seed), shard));

  auto named = net_->namedParameters();
  if (ep_) std::stable_partition(named.begin(), named.end(), [](const auto& p) { return !isExpertTensor(p.first); });
  flat_.emplace(FlatParams::bind(named));
  n_dense_ = flat_->numel();
  for (const auto& seg : flat_->segments()) {
    if (ep_ && isExpertTensor(seg.name)) {
      n_dense_ = seg.offset;
      break;
    }
  }
  adam_ = std::make_unique<FlatAdamW>(job_.train, 0, flat_->numel());

  // Shares: per pipeline (its ranks' speeds summed) or per rank.
  std::vector<double> w;
  const int slots = pp_ ? lay_.replicas : world_;
  for (int i = 0; i < slots; ++i) {
    double x = 0;
    const int r0 = pp_ ? i * lay_.stages : i, r1 = pp_ ? r0 + lay_.stages : i + 1;
    for (int r = r0; r < r1; ++r) x += core::initialShareWeight(job_.train, workers_[static_cast<size_t>(r)]);
    w.push_back(x);
  }
  ARCH_ASSIGN_OR_RETURN(shares_, core::sharesFromWeights(w, job_.train.global_batch));
  share_index_ = pp_ ? replica_ : rank_;

  // The inner group: the world, or with DiLoCo the island (whole blocks of
  // stages x expert_parallel ranks, checked by parallelLayout).
  diloco_ = job_.strategy.kind != "sync";
  for (int r = 0; r < world_; ++r) {
    if (!diloco_ || workers_[static_cast<size_t>(r)].island_index == me_.island_index) scope_.push_back(r);
  }
  scope_first_replica_ = lay_.replicaOf(scope_.front());
  for (int d = scope_first_replica_; d <= lay_.replicaOf(scope_.back()); ++d) scope_samples_ += shares_[static_cast<size_t>(d)];
  for (int r = 0; r < world_; ++r) {
    if (lay_.stageOf(r) == stage_ && lay_.epMemberOf(r) == member) outer_ranks_.push_back(r);
  }
  for (int r : outer_ranks_) {
    if (workers_[static_cast<size_t>(r)].island_index == me_.island_index) {
      outer_counts_tokens_ = r == rank_;
      break;
    }
  }
  step_dp_ = dp_;

  // Groups.
  if (world_ > 1) {
    groups_.world = world_group;
    ARCH_ASSIGN_OR_RETURN(auto codec, comm::parseCodec(job_.strategy.codec));
    const bool hierarchical = !diloco_ && (job_.strategy.allreduce == "hierarchical" ||
                                           (job_.strategy.allreduce == "auto" && job_.cluster.islands.size() > 1));
    auto islandOf = [&](int r) { return workers_[static_cast<size_t>(r)].island_index; };
    if (diloco_) {
      if (scope_.size() == 1) {
        step_dp_ = &local_island_;
      } else if (opt_.elastic && opt_.elastic->inner() && opt_.elastic->innerRanks() == scope_) {
        // The session's island group (one group object per rank set).
        groups_.cache[scope_] = opt_.elastic->innerGroup();
        step_dp_ = opt_.elastic->inner();
      } else {
        ARCH_ASSIGN_OR_RETURN(auto ig, groups_.of(scope_));
        island_dp_ = std::make_unique<CommDp>(ig, false, comm::CodecKind::kNone, 0);
        step_dp_ = island_dp_.get();
      }
    }
    {
      std::vector<int> ranks;
      for (int r : scope_) {
        if (lay_.stageOf(r) == stage_) ranks.push_back(r);
      }
      if (ranks.size() > 1) {
        ARCH_ASSIGN_OR_RETURN(auto g, groups_.of(ranks));
        stage_dp_ = std::make_unique<CommDp>(g, hierarchical, codec, 0);
      }
    }
    if (pp_) {
      if (stage_ > 0 && islandOf(rank_ - 1) != islandOf(rank_)) prev_codec_ = codec;
      if (stage_ + 1 < lay_.stages && islandOf(rank_ + 1) != islandOf(rank_)) next_codec_ = codec;
      sender_ = std::make_unique<AsyncSender>(groups_.world.get());
    }
    if (ep_) {
      // Member j of expert group g: stage_ of pipeline g * ep + j.
      std::vector<int> ep_ranks, expert_ranks;
      const int g0 = lay_.epGroupOf(rank_) * lay_.ep;
      for (int j = 0; j < lay_.ep; ++j) ep_ranks.push_back((g0 + j) * lay_.stages + stage_);
      for (int r : scope_) {
        if (lay_.stageOf(r) == stage_ && lay_.epMemberOf(r) == member) expert_ranks.push_back(r);
      }
      ARCH_ASSIGN_OR_RETURN(auto epg, groups_.of(ep_ranks));
      ARCH_ASSIGN_OR_RETURN(auto dcodec, comm::parseCodec(job_.strategy.dispatch_codec));
      exchange_ = std::make_shared<CommExpertExchange>(epg, lay_.expert_begin, dcodec);
      net_->setExpertExchange(exchange_);
      if (expert_ranks.size() > 1) {
        ARCH_ASSIGN_OR_RETURN(auto eg, groups_.of(expert_ranks));
        expert_dp_ = std::make_unique<CommDp>(eg, hierarchical, codec, 0);
      }
    }
  } else if (ep_ || pp_) {
    return core::invalidArgument("pipeline / expert parallelism needs more than one worker");
  }
  if (job_.train.rebalance && rank_ == 0) {
    ARCH_LOG_INFO("train.rebalance is not applied with pipeline/expert parallelism: shares stay as derived from speed");
  }
  return core::okStatus();
}

core::Status Impl::resume() {
  auto latest = latestValidCheckpoint(opt_.run_dir);
  if (!latest.isOk()) return latest.status().withContext("cannot resume");
  ARCH_ASSIGN_OR_RETURN(auto ck, loadCheckpoint(*latest));
  std::map<std::string, torch::Tensor> by_name(ck.weights.begin(), ck.weights.end());
  std::map<std::string, torch::Tensor> opt_by_name(ck.optimizer.begin(), ck.optimizer.end());
  // Offsets of the single-process flat layout (what the checkpoint holds).
  std::map<std::string, int64_t> full_offset;
  int64_t total = 0;
  for (const auto& [name, shape] : model::parameterLayout(mcfg_)) {
    full_offset[name] = total;
    int64_t n = 1;
    for (auto d : shape) n *= d;
    total += n;
  }
  if (!opt_by_name.count("exp_avg") || !opt_by_name.count("exp_avg_sq") || opt_by_name["exp_avg"].numel() != total) {
    return core::dataLoss("checkpoint " + *latest + " optimizer state does not match the model");
  }
  torch::NoGradGuard ng;
  std::set<std::string> trained;
  for (const auto& seg : flat_->segments()) {
    trained.insert(seg.name);
    auto it = by_name.find(seg.name);
    if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + seg.name + "'");
    if (it->second.sizes().vec() != seg.shape) {
      return core::dataLoss("checkpoint " + *latest + " tensor '" + seg.name + "' has another shape than the model");
    }
    flat_->params().narrow(0, seg.offset, seg.numel).copy_(it->second.reshape({-1}));
    const int64_t fo = full_offset.at(seg.name);
    adam_->expAvg().narrow(0, seg.offset, seg.numel).copy_(opt_by_name["exp_avg"].narrow(0, fo, seg.numel));
    adam_->expAvgSq().narrow(0, seg.offset, seg.numel).copy_(opt_by_name["exp_avg_sq"].narrow(0, fo, seg.numel));
  }
  for (auto& [name, t] : net_->namedTensors()) {
    if (trained.count(name)) continue;
    auto it = by_name.find(name);
    if (it == by_name.end()) return core::dataLoss("checkpoint " + *latest + " lacks tensor '" + name + "'");
    t.copy_(it->second);
  }
  adam_->setStepCount(ck.optimizer_step);
  step_ = ck.step;
  train_sampler_->setPosition(ck.data_position);
  if (ck.shares.size() == shares_.size()) shares_ = ck.shares;
  if (diloco_) {
    // The outer state, by name like the weights. Progress since a
    // fragment's last sync is in the parameters (anchor - params is the next
    // pseudo-gradient); the token counters restart on every rank alike, so
    // all ranks keep weighting the islands the same way.
    const nlohmann::json st = ck.extra.value("outer", nlohmann::json());
    if (!opt_by_name.count("outer.anchor") || !opt_by_name.count("outer.momentum") || !st.is_object() ||
        st.value("kind", "") != job_.strategy.kind || opt_by_name["outer.anchor"].numel() != total) {
      return core::failedPrecondition("checkpoint " + *latest + " has no " + job_.strategy.kind +
                                      " outer state of this model (written by another strategy.kind?); resume "
                                      "with the strategy it was written with");
    }
    if (ck.step % job_.strategy.inner_steps != 0 && rank_ == 0) {
      ARCH_LOG_INFO("resuming inside an outer round (step {}, inner_steps {}): the first round after the resume "
                    "weights the islands by the tokens since the resume", ck.step, job_.strategy.inner_steps);
    }
    torch::Tensor a = torch::empty({flat_->numel()}, torch::kFloat), mo = torch::empty({flat_->numel()}, torch::kFloat);
    for (const auto& seg : flat_->segments()) {
      const int64_t fo = full_offset.at(seg.name);
      a.narrow(0, seg.offset, seg.numel).copy_(opt_by_name["outer.anchor"].narrow(0, fo, seg.numel));
      mo.narrow(0, seg.offset, seg.numel).copy_(opt_by_name["outer.momentum"].narrow(0, fo, seg.numel));
    }
    resume_outer_tensors_ = {{"anchor", a}, {"momentum", mo}};
    resume_outer_json_ = st;
    resume_outer_json_["numel"] = flat_->numel();
    resume_outer_json_["cum_tokens"] = 0;
    resume_outer_json_["last_tokens"] = std::vector<int64_t>(st.value("last_tokens", std::vector<int64_t>{0}).size(), 0);
  }
  if (rank_ == 0) ARCH_LOG_INFO("resumed from {} at step {} (resharded by tensor name)", *latest, step_);
  return core::okStatus();
}

// Rank 0 assembles the single-process layout from the ranks that together
// hold one copy of the model (the first pipeline, or the first expert group).
core::Result<CheckpointState> Impl::snapshot(int64_t step) {
  // Ranks [0, stages x ep): the first expert group's pipelines; the first
  // pipeline sends everything, the others only their experts.
  const int holders = lay_.stages * lay_.ep;
  NamedTensors outer_state;
  if (outer_) outer_state = outer_->stateTensors();
  std::map<std::string, torch::Tensor> outer_by(outer_state.begin(), outer_state.end());
  std::map<std::string, torch::Tensor> oa, om;  // outer anchor and momentum by tensor name
  std::map<std::string, torch::Tensor> w, m, v;
  auto collectLocal = [&](bool only_experts, std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                          nlohmann::json& header) {
    std::set<std::string> trained;
    for (const auto& seg : flat_->segments()) {
      trained.insert(seg.name);
      if (only_experts && !isExpertTensor(seg.name)) continue;
      header.push_back(nlohmann::json{{"name", seg.name}, {"shape", seg.shape}, {"trained", true}, {"outer", outer_ != nullptr}});
      tensors.push_back({seg.name, flat_->params().narrow(0, seg.offset, seg.numel)});
      tensors.push_back({"m", adam_->expAvg().narrow(0, seg.offset, seg.numel)});
      tensors.push_back({"v", adam_->expAvgSq().narrow(0, seg.offset, seg.numel)});
      if (outer_) {
        tensors.push_back({"a", outer_by.at("anchor").narrow(0, seg.offset, seg.numel)});
        tensors.push_back({"o", outer_by.at("momentum").narrow(0, seg.offset, seg.numel)});
      }
    }
    for (auto& [name, t] : net_->namedTensors()) {
      if (trained.count(name) || only_experts) continue;
      header.push_back(nlohmann::json{{"name", name}, {"shape", t.sizes().vec()}, {"trained", false}});
      tensors.push_back({name, t.detach().to(torch::kFloat).reshape({-1})});
    }
  };
  auto absorb = [&](const nlohmann::json& header, const torch::Tensor& data) {
    int64_t off = 0;
    for (const auto& h : header) {
      const std::string name = h["name"].get<std::string>();
      const auto shape = h["shape"].get<std::vector<int64_t>>();
      int64_t n = 1;
      for (auto d : shape) n *= d;
      w[name] = data.narrow(0, off, n).reshape(shape).clone();
      off += n;
      if (h["trained"].get<bool>()) {
        m[name] = data.narrow(0, off, n).clone();
        off += n;
        v[name] = data.narrow(0, off, n).clone();
        off += n;
      }
      if (h.value("outer", false)) {
        oa[name] = data.narrow(0, off, n).clone();
        off += n;
        om[name] = data.narrow(0, off, n).clone();
        off += n;
      }
    }
  };
  if (rank_ < holders) {
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    nlohmann::json header = nlohmann::json::array();
    collectLocal(replica_ > 0, tensors, header);
    std::vector<torch::Tensor> parts;
    for (auto& [n, t] : tensors) parts.push_back(t.detach().reshape({-1}).to(torch::kFloat));
    torch::Tensor data = parts.empty() ? torch::zeros({0}) : torch::cat(parts).contiguous();
    if (rank_ == 0) {
      absorb(header, data);
      for (int r = 1; r < holders; ++r) {
        int64_t sizes[2] = {0, 0};
        auto& g = *groups_.world;
        ARCH_RETURN_IF_ERROR(g.recv(sizes, 2, comm::DType::kI64, r, kTagCheckpoint, p2pOptions()));
        std::string text(static_cast<size_t>(sizes[0]), '\0');
        ARCH_RETURN_IF_ERROR(g.recv(text.data(), text.size(), comm::DType::kU8, r, kTagCheckpoint, p2pOptions()));
        torch::Tensor d = torch::empty({sizes[1]}, torch::kFloat);
        ARCH_RETURN_IF_ERROR(g.recv(d.data_ptr<float>(), static_cast<size_t>(sizes[1]), comm::DType::kF32, r,
                                    kTagCheckpoint, p2pOptions()));
        absorb(nlohmann::json::parse(text), d);
      }
    } else {
      const std::string text = header.dump();
      int64_t sizes[2] = {static_cast<int64_t>(text.size()), data.numel()};
      auto& g = *groups_.world;
      ARCH_RETURN_IF_ERROR(g.send(sizes, 2, comm::DType::kI64, 0, kTagCheckpoint, p2pOptions()));
      ARCH_RETURN_IF_ERROR(g.send(text.data(), text.size(), comm::DType::kU8, 0, kTagCheckpoint, p2pOptions()));
      ARCH_RETURN_IF_ERROR(g.send(data.data_ptr<float>(), static_cast<size_t>(data.numel()), comm::DType::kF32, 0,
                                  kTagCheckpoint, p2pOptions()));
    }
  }
  CheckpointState s;
  if (rank_ != 0) return s;
  s.step = step;
  s.data_position = train_sampler_->position();
  s.shares = shares_;
  s.optimizer_step = adam_->stepCount();
  s.job_yaml = core::dumpJobYaml(job_);
  s.model = job_.model;
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& wk : workers_) ranks.push_back({{"rank", wk.rank}, {"island", wk.island}, {"slowdown", wk.slowdown}});
  s.membership = {{"world", world_}, {"epoch", 0}, {"ranks", ranks}};
  s.extra["parallel"] = {{"pipeline_stages", lay_.stages}, {"stage_layers", lay_.stage_layers},
                         {"expert_parallel", lay_.ep}, {"expert_begin", lay_.expert_begin}};
  std::vector<torch::Tensor> mm, vv, aa, oo;
  for (const auto& [name, shape] : model::parameterLayout(mcfg_)) {
    if (!w.count(name) || !m.count(name)) return core::internalError("checkpoint assembly lacks tensor '" + name + "'");
    s.weights.push_back({name, w[name]});
    mm.push_back(m[name]);
    vv.push_back(v[name]);
    w.erase(name);
    if (outer_) {
      if (!oa.count(name)) return core::internalError("checkpoint assembly lacks the outer state of '" + name + "'");
      aa.push_back(oa[name]);
      oo.push_back(om[name]);
    }
  }
  // Persistent buffers (router biases) after the parameters, in layer order.
  for (int64_t l = 0; l < mcfg_.n_layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    for (auto& [name, t] : w) {
      if (name.rfind(prefix, 0) == 0) s.weights.push_back({name, t});
    }
  }
  s.optimizer = {{"exp_avg", torch::cat(mm)}, {"exp_avg_sq", torch::cat(vv)}};
  if (outer_) {
    // The DiLoCo outer state in the single-process layout too (what the
    // data-parallel trainer writes: anchor and momentum in full-model order).
    s.optimizer.push_back({"outer.anchor", torch::cat(aa)});
    s.optimizer.push_back({"outer.momentum", torch::cat(oo)});
    nlohmann::json st = outer_->stateJson();
    st["numel"] = s.optimizer[2].second.numel();
    s.extra["outer"] = st;
  }
  return s;
}

core::Status Impl::makeOuter() {
  OuterContext ctx;
  ctx.job = &job_;
  ctx.rank = rank_;
  ctx.world = world_;
  for (const auto& wk : workers_) ctx.island_of_rank.push_back(wk.island_index);
  // The ranks holding this rank's tensors, in every island: the outer sync
  // builds its island and cross-island groups from them.
  if (outer_ranks_.size() > 1) {
    ARCH_ASSIGN_OR_RETURN(ctx.world_group, groups_.of(outer_ranks_));
  }
  ctx.metrics = opt_.write_metrics ? &metrics_ : nullptr;
  ctx.run_dir = opt_.run_dir;
  for (const auto& seg : flat_->segments()) ctx.segment_offsets.push_back(seg.offset);
  ARCH_ASSIGN_OR_RETURN(outer_, makeOuterSync(ctx, flat_->params()));
  if (!resume_outer_tensors_.empty()) ARCH_RETURN_IF_ERROR(outer_->restore(resume_outer_tensors_, resume_outer_json_));
  return core::okStatus();
}

void Impl::emulateSlowdown(double compute_s, const char* what, int64_t rows) {
  if (me_.slowdown <= 1.0) return;
  // EMULATION: a device `slowdown` times slower takes that much longer.
  // Pipeline operations (rows >= 0) take slowdown x the host's fastest time
  // for the same operation on as many rows (identical work: the minimum is
  // the uncontended cost), or their own time if longer: another process's
  // burst on the shared host then hides inside the emulated time instead of
  // being multiplied by the slowdown, which would turn host noise into
  // pipeline bubbles that a real device of that speed does not have.
  double extra = (me_.slowdown - 1.0) * compute_s;
  if (rows >= 0) {
    auto [it, fresh] = fastest_op_s_.try_emplace({what, rows}, compute_s);
    if (!fresh) it->second = std::min(it->second, compute_s);
    extra = std::max(0.0, me_.slowdown * it->second - compute_s);
  }
  ScopedSpan span(&trace_, TraceRecorder::kCompute, std::string("emulated slowdown ") + what);
  std::this_thread::sleep_for(std::chrono::duration<double>(extra));
}

// One optimizer step's forward/backward of this stage, 1F1B.
core::Status Impl::pipelineStep(const data::Batch& batch, double total_samples, double& ce, double& aux,
                                int64_t& tokens) {
  const int P = lay_.stages;
  const bool first = stage_ == 0, last = stage_ == P - 1;
  const int64_t n = batch.n;
  int64_t m = microCount(n, job_.train.micro_batch, P);
  if (ep_) {
    // The same-stage ranks of an expert group run their all-to-alls
    // together: every pipeline runs the same number of micro-batches.
    const int64_t smax = *std::max_element(shares_.begin(), shares_.end());
    const int64_t smin = *std::min_element(shares_.begin(), shares_.end());
    m = std::max<int64_t>(1, std::min(microCount(smax, job_.train.micro_batch, P), smin));
  }
  const double total_tokens = total_samples * static_cast<double>(T_);
  micro_ = m;
  struct Stash {
    torch::Tensor input;   // stage input (ids, or received activation requiring grad)
    torch::Tensor output;  // activation sent on (or the loss on the last stage)
    torch::Tensor aux;     // this stage's aux loss term (scaled), if it needs backward
  };
  std::vector<Stash> stash(static_cast<size_t>(m));
  const bool recompute = job_.train.recompute;
  auto& world = *groups_.world;

  // Forward of micro i from `input`; returns (output or loss, aux term).
  auto runForward = [&](int64_t i, const torch::Tensor& input, bool record) -> std::pair<torch::Tensor, torch::Tensor> {
    auto [b, e] = microRange(n, m, i);
    const double frac = static_cast<double>(e - b) / total_samples;
    torch::Tensor out = net_->stageForward(input);
    torch::Tensor aux_term = net_->localAuxLoss();
    if (last) {
      auto lo = net_->headLoss(out, idsTensor(batch.target, b, e - b, T_));
      if (record) {
        ce += lo.ce_sum.item<double>();
        tokens += lo.tokens;
        aux += lo.aux_loss.item<double>() * static_cast<double>(e - b);
      }
      return {lo.ce_sum / total_tokens + lo.aux_loss * frac, torch::Tensor()};
    }
    if (record) aux += aux_term.item<double>() * static_cast<double>(e - b);
    return {out, aux_term.requires_grad() ? aux_term * frac : torch::Tensor()};
  };
  // Router loads must count each micro-batch once, recomputation or not.
  auto moes = net_->moeLayers();
  auto saveLoads = [&] {
    std::vector<torch::Tensor> l;
    for (auto& mo : moes) l.push_back(mo->loadCounts().clone());
    return l;
  };
  auto restoreLoads = [&](const std::vector<torch::Tensor>& l) {
    for (size_t k = 0; k < moes.size(); ++k) moes[k]->loadCounts().copy_(l[k]);
  };

  for (const PipeOp& op : oneFOneBSchedule(stage_, P, m)) {
    auto [b, e] = microRange(n, m, op.micro);
    auto& st = stash[static_cast<size_t>(op.micro)];
    if (op.forward) {
      torch::Tensor input;
      if (first) {
        input = idsTensor(batch.input, b, e - b, T_);
      } else {
        const int64_t t0 = core::wallMicros();
        input = recvTensor(world, {e - b, T_, mcfg_.dim}, prev_codec_, rank_ - 1, kTagActivation);
        trace_.complete(TraceRecorder::kWait, "recv activation " + std::to_string(op.micro), t0, core::wallMicros() - t0);
        input = input.to(net_->device(), *model::parseDtype(mcfg_.dtype)).requires_grad_(true);
      }
      const auto c0 = core::Clock::now();
      const int64_t t0 = core::wallMicros();
      if (recompute) {
        torch::NoGradGuard ng;
        st.output = runForward(op.micro, input, true).first;
      } else {
        std::tie(st.output, st.aux) = runForward(op.micro, input, true);
      }
      st.input = input;
      const double c = core::secondsSince(c0);
      trace_.complete(TraceRecorder::kCompute, "F" + std::to_string(op.micro), t0, core::wallMicros() - t0,
                      {{"stage", stage_}, {"micro", op.micro}});
      // The output leaves after the emulated slowdown: a slower device has it later.
      emulateSlowdown(c, "F", e - b);
      if (!last) sender_->push(st.output.detach().to(torch::kFloat).contiguous(), next_codec_, rank_ + 1, kTagActivation);
      busy_s_ += core::secondsSince(c0);  // busy: compute, emulated slowdown, handing the output to the sender
      if (recompute) st.output = torch::Tensor();
    } else {
      torch::Tensor grad;
      if (!last) {
        const int64_t t0 = core::wallMicros();
        grad = recvTensor(world, {e - b, T_, mcfg_.dim}, next_codec_, rank_ + 1, kTagGradient);
        trace_.complete(TraceRecorder::kWait, "recv gradient " + std::to_string(op.micro), t0, core::wallMicros() - t0);
      }
      const auto c0 = core::Clock::now();
      const int64_t t0 = core::wallMicros();
      if (recompute) {
        auto loads = saveLoads();
        std::tie(st.output, st.aux) = runForward(op.micro, st.input, false);
        restoreLoads(loads);
      }
      if (last) {
        st.output.backward();
      } else {
        std::vector<torch::Tensor> outs{st.output}, grads{grad.to(st.output.scalar_type())};
        if (st.aux.defined()) {
          outs.push_back(st.aux);
          grads.push_back(torch::ones_like(st.aux));
        }
        torch::autograd::backward(outs, grads);
      }
      const double c = core::secondsSince(c0);
      trace_.complete(TraceRecorder::kCompute, "B" + std::to_string(op.micro), t0, core::wallMicros() - t0,
                      {{"stage", stage_}, {"micro", op.micro}});
      emulateSlowdown(c, "B", e - b);
      if (!first) sender_->push(st.input.grad().to(torch::kFloat).contiguous(), prev_codec_, rank_ - 1, kTagGradient);
      st = Stash{};
      busy_s_ += core::secondsSince(c0);
    }
  }
  {
    ScopedSpan span(&trace_, TraceRecorder::kComm, "pipeline sends drain");
    ARCH_RETURN_IF_ERROR(sender_->drain());
  }
  return core::okStatus();
}

// Data-parallel share through the expert-parallel model. Every member of an
// expert group runs the same number of micro-batches (the all-to-alls are
// collective): ceil(largest share / micro_batch), at most the smallest share.
core::Status Impl::expertStep(const data::Batch& batch, double total_samples, double& ce, double& aux,
                              int64_t& tokens) {
  const double total_tokens = total_samples * static_cast<double>(T_);
  const int64_t smax = *std::max_element(shares_.begin(), shares_.end());
  const int64_t smin = *std::min_element(shares_.begin(), shares_.end());
  const int64_t m = std::max<int64_t>(1, std::min(microCount(smax, job_.train.micro_batch, 1), smin));
  micro_ = m;
  const auto c0 = core::Clock::now();
  {
    ScopedSpan span(&trace_, TraceRecorder::kCompute, "forward+backward (expert parallel)");
    for (int64_t i = 0; i < m; ++i) {
      auto [b, e] = microRange(batch.n, m, i);
      auto out = net_->lossAndStats(idsTensor(batch.input, b, e - b, T_), idsTensor(batch.target, b, e - b, T_));
      auto loss = out.ce_sum / total_tokens + out.aux_loss * (static_cast<double>(e - b) / total_samples);
      loss.backward();
      ce += out.ce_sum.item<double>();
      tokens += out.tokens;
      aux += out.aux_loss.item<double>() * static_cast<double>(e - b);
    }
  }
  const double c = core::secondsSince(c0);
  busy_s_ = c * std::max(1.0, me_.slowdown);
  emulateSlowdown(c, "compute");
  return core::okStatus();
}

core::Result<double> Impl::evaluate() {
  if (!val_sampler_) return -1.0;
  torch::NoGradGuard ng;
  net_->eval();
  double acc[2] = {0, 0};
  auto& world = *groups_.world;
  for (int64_t i = 0; i < job_.train.eval_batches; ++i) {
    auto b = val_sampler_->batchAt(i * job_.train.global_batch, shares_, share_index_);
    if (b.n == 0) continue;
    if (!pp_) {
      auto out = net_->lossAndStats(idsTensor(b.input, 0, b.n, T_), idsTensor(b.target, 0, b.n, T_));
      acc[0] += out.ce_sum.item<double>();
      acc[1] += static_cast<double>(out.tokens);
      continue;
    }
    // Forward only, the whole share as one micro-batch, stage by stage.
    torch::Tensor x = stage_ == 0 ? idsTensor(b.input, 0, b.n, T_)
                                  : recvTensor(world, {b.n, T_, mcfg_.dim}, prev_codec_, rank_ - 1, kTagEval)
                                        .to(*model::parseDtype(mcfg_.dtype));
    torch::Tensor h = net_->stageForward(x);
    if (stage_ + 1 < lay_.stages) {
      sender_->push(h.to(torch::kFloat).contiguous(), next_codec_, rank_ + 1, kTagEval);
    } else {
      auto out = net_->headLoss(h, idsTensor(b.target, 0, b.n, T_));
      acc[0] += out.ce_sum.item<double>();
      acc[1] += static_cast<double>(out.tokens);
    }
  }
  net_->train();
  if (sender_) ARCH_RETURN_IF_ERROR(sender_->drain());
  ARCH_RETURN_IF_ERROR(dp_->allreduceSum(acc));
  return acc[1] > 0 ? acc[0] / acc[1] : -1.0;
}

core::Result<TrainSummary> Impl::run() {
  const auto t_start = core::Clock::now();
  ARCH_RETURN_IF_ERROR(setup());
  if (opt_.resume) ARCH_RETURN_IF_ERROR(resume());
  const auto& tc = job_.train;
  const int64_t start_step = step_;

  trace_.setProcess(rank_, "rank " + std::to_string(rank_) + " (" + me_.island + ", " + me_.device +
                               (pp_ ? ", stage " + std::to_string(stage_) : "") + ")");
  if (opt_.write_metrics) {
    std::error_code ec;
    fs::create_directories(fs::path(opt_.run_dir) / "trace", ec);
    ARCH_RETURN_IF_ERROR(metrics_.open((fs::path(opt_.run_dir) / "metrics.jsonl").string()));
  }
  if (diloco_) ARCH_RETURN_IF_ERROR(makeOuter());
  std::unique_ptr<CheckpointWriter> ckpt;
  if (rank_ == 0) ckpt = std::make_unique<CheckpointWriter>(opt_.run_dir, job_.checkpoint.keep_last);
  if (rank_ == 0) {
    ARCH_LOG_INFO("parallel trainer: {} pipeline stage(s) with layers [{}] x {} replica(s), expert parallel {} "
                  "(experts per member [{}]), shares [{}], strategy {}, {} steps from step {}",
                  lay_.stages, fmt::join(lay_.stage_layers, ","), lay_.replicas, lay_.ep,
                  fmt::join(lay_.expert_begin, ","), fmt::join(shares_, ","), job_.strategy.kind, tc.steps, step_);
    if (opt_.write_metrics) {
      metrics_.write({{"kind", "parallel"}, {"pipeline_stages", lay_.stages}, {"stage_layers", lay_.stage_layers},
                      {"replicas", lay_.replicas}, {"expert_parallel", lay_.ep}, {"expert_begin", lay_.expert_begin},
                      {"shares", shares_}, {"recompute", tc.recompute}, {"strategy", job_.strategy.kind}});
    }
  }

  TrainSummary summary;
  summary.first_step = start_step;
  double step_time_sum = 0;
  int64_t steps_timed = 0;
  // Gradients are means over the inner group's samples (with DiLoCo the
  // island's; the outer step weights the islands by their tokens).
  const double total_samples = static_cast<double>(diloco_ ? scope_samples_ : tc.global_batch);
  while (step_ < tc.steps) {
    const auto step_t0 = core::Clock::now();
    double data_s = 0, comm_s = 0;
    flat_->zeroGrad();
    data::Batch batch;
    {
      ScopedSpan span(&trace_, TraceRecorder::kData, "batch", &data_s);
      batch = train_sampler_->nextBatch(shares_, share_index_);
    }
    double ce = 0, aux = 0;
    int64_t tokens = 0;
    busy_s_ = 0;
    sched_begin_us_ = core::wallMicros();
    try {
      if (pp_) ARCH_RETURN_IF_ERROR(pipelineStep(batch, total_samples, ce, aux, tokens));
      else ARCH_RETURN_IF_ERROR(expertStep(batch, total_samples, ce, aux, tokens));
    } catch (const std::exception& e) {
      return core::internalError(std::string("step ") + std::to_string(step_ + 1) + ": " + e.what());
    }
    sched_end_us_ = core::wallMicros();

    // Gradients: replicated tensors over the same-stage ranks, expert
    // tensors over the same-stage ranks holding the same experts (within
    // the island with DiLoCo).
    {
      ScopedSpan span(&trace_, TraceRecorder::kComm, "gradient allreduce", &comm_s);
      float* g = flat_->grads().data_ptr<float>();
      std::unique_ptr<PendingReduce> a, b;
      if (stage_dp_) a = stage_dp_->allreduceSumAsync(std::span<float>(g, static_cast<size_t>(n_dense_)));
      if (expert_dp_) b = expert_dp_->allreduceSumAsync(std::span<float>(g + n_dense_, static_cast<size_t>(flat_->numel() - n_dense_)));
      if (a) ARCH_RETURN_IF_ERROR(a->wait().withContext("gradient allreduce"));
      if (b) ARCH_RETURN_IF_ERROR(b->wait().withContext("expert gradient allreduce"));
    }
    // Router-bias balancing with the load of every rank that shares the router.
    if (mcfg_.moe.num_experts > 0 && mcfg_.moe.balance == "router_bias") {
      torch::Tensor load = net_->routerLoad().to(torch::kFloat64).contiguous();
      if (load.numel() > 0) {
        if (DpComm* g = stage_dp_.get()) ARCH_RETURN_IF_ERROR(g->allreduceSum(std::span<double>(load.data_ptr<double>(), static_cast<size_t>(load.numel()))));
        net_->updateRouterBias(load.to(torch::kInt64));
      }
    }
    // Global gradient norm: each distinct gradient counted once.
    double sq[1] = {0};
    {
      const double dense = flat_->grads().narrow(0, 0, n_dense_).to(torch::kFloat64).pow(2).sum().item<double>();
      const double expert = flat_->grads().narrow(0, n_dense_, flat_->numel() - n_dense_).to(torch::kFloat64).pow(2).sum().item<double>();
      // Replicated tensors from the scope's first pipeline, experts from its first expert group.
      const int d = replica_ - scope_first_replica_;
      sq[0] = (d == 0 ? dense : 0.0) + (d < lay_.ep ? expert : 0.0);
      ScopedSpan span(&trace_, TraceRecorder::kComm, "gradient norm allreduce", &comm_s);
      ARCH_RETURN_IF_ERROR(step_dp_->allreduceSum(sq));
    }
    const double grad_norm = std::sqrt(sq[0]);
    const double lr = learningRate(tc, step_);
    {
      ScopedSpan span(&trace_, TraceRecorder::kCompute, "optimizer");
      torch::NoGradGuard ng;
      if (tc.grad_clip > 0 && grad_norm > tc.grad_clip) flat_->grads().mul_(tc.grad_clip / (grad_norm + 1e-6));
      adam_->step(flat_->params(), flat_->grads(), flat_->decayMask(), lr);
    }

    if (outer_) {
      // The island's tokens, reported once per island in every outer group.
      ScopedSpan span(&trace_, TraceRecorder::kComm, "outer sync", &comm_s);
      ARCH_RETURN_IF_ERROR(outer_->afterInnerStep(step_ + 1, flat_->params(), outer_counts_tokens_ ? scope_samples_ * T_ : 0)
                               .withContext("outer sync"));
    }

    // Control values cross the straits with DiLoCo only at outer-step
    // boundaries and at the end; in between the loss is the island's.
    const bool want_stop = opt_.stop && opt_.stop->load();
    double ctrl[4] = {ce, static_cast<double>(tokens), aux, want_stop ? 1.0 : 0.0};
    {
      ScopedSpan span(&trace_, TraceRecorder::kComm, "control allreduce", &comm_s);
      const bool world_boundary = !outer_ || (step_ + 1) % job_.strategy.inner_steps == 0 || step_ + 1 == tc.steps;
      if (world_boundary) {
        ARCH_RETURN_IF_ERROR(dp_->allreduceSum(ctrl));
      } else {
        ARCH_RETURN_IF_ERROR(step_dp_->allreduceSum(std::span<double>(ctrl, 3)));
        ctrl[3] = 0;
      }
    }
    const double loss = ctrl[1] > 0 ? ctrl[0] / ctrl[1] : 0.0;
    ++step_;
    summary.losses.push_back(loss);

    const double step_s = core::secondsSince(step_t0);
    if (step_ > start_step + 1) {
      step_time_sum += step_s;
      ++steps_timed;
    }
    const bool log_now = opt_.write_metrics && (step_ % tc.log_every == 0 || step_ == tc.steps);
    // Per-stage busy time and bubble: every rank's schedule window and busy
    // time, over the inner group (with DiLoCo the island's pipelines: the
    // logged steps do not cross the straits).
    std::vector<double> timing(scope_.size() * 3, 0.0);
    const int pipes = static_cast<int>(scope_.size()) / lay_.stages;
    if (pp_ && log_now) {
      double mine[3] = {static_cast<double>(sched_begin_us_), static_cast<double>(sched_end_us_), busy_s_};
      ARCH_RETURN_IF_ERROR(step_dp_->allgather(mine, timing));
    }
    if (log_now) {
      metrics_.write({{"kind", "step"}, {"step", step_}, {"rank", rank_}, {"island", me_.island}, {"epoch", 0},
                      {"loss", loss}, {"local_loss", tokens ? ce / static_cast<double>(tokens) : 0.0}, {"lr", lr},
                      {"samples", batch.n}, {"tokens", tokens}, {"compute_s", busy_s_}, {"comm_s", comm_s},
                      {"data_s", data_s}, {"step_s", step_s},
                      {"tokens_per_s", static_cast<double>(batch.n * T_) / step_s}, {"grad_norm", grad_norm},
                      {"slowdown", me_.slowdown}, {"share", shares_[static_cast<size_t>(share_index_)]},
                      {"stage", stage_}, {"micro_batches", micro_}});
      if (rank_ == 0 && pp_) {
        // Per pipeline: window = first start .. last end over its stages;
        // bubble_s = 1 - busy_s / window. Averaged over pipelines per stage.
        std::vector<double> busy(static_cast<size_t>(lay_.stages), 0.0), bubble(static_cast<size_t>(lay_.stages), 0.0);
        double window_mean = 0;
        for (int d = 0; d < pipes; ++d) {
          double lo = 1e300, hi = 0;
          for (int s = 0; s < lay_.stages; ++s) {
            const size_t r = static_cast<size_t>(d * lay_.stages + s);
            lo = std::min(lo, timing[r * 3]);
            hi = std::max(hi, timing[r * 3 + 1]);
          }
          const double window = std::max(1e-9, (hi - lo) * 1e-6);
          window_mean += window / pipes;
          for (int s = 0; s < lay_.stages; ++s) {
            const double b = timing[static_cast<size_t>(d * lay_.stages + s) * 3 + 2];
            busy[static_cast<size_t>(s)] += b / pipes;
            bubble[static_cast<size_t>(s)] += std::max(0.0, 1.0 - b / window) / pipes;
          }
        }
        double mean = 0;
        for (double b : bubble) mean += b / lay_.stages;
        metrics_.write({{"kind", "pipeline"}, {"step", step_}, {"stages", lay_.stages}, {"micro_batches", micro_},
                        {"stage_layers", lay_.stage_layers}, {"busy_s", busy}, {"bubble", bubble},
                        {"bubble_mean", mean}, {"window_s", window_mean},
                        {"bubble_1f1b_theory", oneFOneBBubble(lay_.stages, micro_)}});
      }
      if (mcfg_.moe.num_experts > 0) {
        // Routing statistics summed over every rank's tokens (each MoE layer
        // is seen by the ranks of one stage only; the others add zeros).
        const int64_t E = mcfg_.moe.num_experts;
        std::vector<int64_t> moe_layers;
        for (int64_t l = 0; l < mcfg_.n_layers; ++l) {
          if (model::isMoeLayer(mcfg_, l)) moe_layers.push_back(l);
        }
        std::vector<double> st(moe_layers.size() * static_cast<size_t>(2 * E + 1), 0.0);
        for (const auto& s : net_->moeStats()) {
          const size_t k = static_cast<size_t>(std::find(moe_layers.begin(), moe_layers.end(), s.layer) - moe_layers.begin());
          double* row = st.data() + k * static_cast<size_t>(2 * E + 1);
          for (int64_t e = 0; e < E && e < static_cast<int64_t>(s.tokens_per_expert.size()); ++e) {
            row[e] = static_cast<double>(s.tokens_per_expert[static_cast<size_t>(e)]);
            row[E + e] = static_cast<double>(s.dropped_per_expert.empty() ? 0 : s.dropped_per_expert[static_cast<size_t>(e)]);
          }
          row[2 * E] = static_cast<double>(s.capacity);
        }
        ARCH_RETURN_IF_ERROR(step_dp_->allreduceSum(st));
        if (rank_ == 0) {
          for (size_t k = 0; k < moe_layers.size(); ++k) {
            const double* row = st.data() + k * static_cast<size_t>(2 * E + 1);
            std::vector<int64_t> tpe, dpe;
            int64_t dropped = 0;
            for (int64_t e = 0; e < E; ++e) {
              tpe.push_back(static_cast<int64_t>(row[e]));
              dpe.push_back(static_cast<int64_t>(row[E + e]));
              dropped += dpe.back();
            }
            metrics_.write({{"kind", "moe"}, {"step", step_}, {"rank", rank_}, {"layer", moe_layers[k]},
                            {"tokens_per_expert", tpe}, {"dropped_per_expert", dpe}, {"dropped", dropped},
                            {"capacity_sum", static_cast<int64_t>(row[2 * E])}, {"expert_parallel", lay_.ep},
                            {"dispatch_bytes", exchange_ ? exchange_->bytesSent() : 0}});
          }
        }
      }
    }

    const bool stop_now = ctrl[3] > 0;
    const bool periodic = job_.checkpoint.every > 0 && step_ % job_.checkpoint.every == 0;
    const bool at_end = step_ == tc.steps || stop_now;
    // Replicas must be identical (outer syncs complete) before the final evaluation.
    if (outer_ && at_end) ARCH_RETURN_IF_ERROR(outer_->finish(step_, flat_->params()).withContext("outer sync"));
    if (tc.eval_every > 0 && (step_ % tc.eval_every == 0 || at_end)) {
      ScopedSpan span(&trace_, TraceRecorder::kCompute, "evaluation");
      double vl = -1;
      try {
        ARCH_ASSIGN_OR_RETURN(vl, evaluate());
      } catch (const std::exception& e) {
        return core::internalError(std::string("evaluation: ") + e.what());
      }
      summary.final_val_loss = vl;
      if (rank_ == 0 && opt_.write_metrics && vl >= 0) metrics_.write({{"kind", "eval"}, {"step", step_}, {"val_loss", vl}});
    }
    if (periodic || (at_end && job_.checkpoint.at_exit)) {
      const auto c0 = core::Clock::now();
      ScopedSpan span(&trace_, TraceRecorder::kCheckpoint, "checkpoint gather");
      ARCH_ASSIGN_OR_RETURN(auto snap, snapshot(step_));
      if (rank_ == 0) {
        const double stall = core::secondsSince(c0);
        ckpt->submit(std::move(snap));
        if (!job_.checkpoint.async || at_end) ARCH_RETURN_IF_ERROR(ckpt->drain());
        if (opt_.write_metrics) {
          metrics_.write({{"kind", "event"}, {"event", "checkpoint"}, {"step", step_}, {"stall_s", stall},
                          {"detail", checkpointDirName(step_)}});
        }
      }
    }
    if (opt_.exit_after_step >= 0 && step_ == opt_.exit_after_step) {
      if (ckpt) (void)ckpt->drain();
      // Everybody leaves together once rank 0's checkpoint is on disk (the
      // launcher stops the rest soon after the first worker exits).
      double sync[1] = {0};
      (void)dp_->allreduceSum(sync);
      ARCH_LOG_WARN("test hook: exiting abruptly after step {}", step_);
      std::_Exit(3);
    }
    if (stop_now) {
      summary.stopped_early = step_ < tc.steps;
      if (rank_ == 0) ARCH_LOG_WARN("stop requested: stopped after step {} (checkpoint written)", step_);
      break;
    }
  }
  if (ckpt) ARCH_RETURN_IF_ERROR(ckpt->drain());
  summary.steps_done = step_;
  summary.final_loss = summary.losses.empty() ? 0 : summary.losses.back();
  summary.wall_s = core::secondsSince(t_start);
  summary.mean_step_s = steps_timed > 0 ? step_time_sum / static_cast<double>(steps_timed) : 0;
  if (opt_.write_metrics) {
    (void)trace_.writeFile((fs::path(opt_.run_dir) / "trace" / ("rank" + std::to_string(rank_) + ".json")).string());
  }
  return summary;
}

}  // namespace

core::Result<TrainSummary> runParallelTrainer(const TrainerOptions& options) {
  Impl impl(options);
  try {
    return impl.run();
  } catch (const std::exception& e) {
    return core::internalError(std::string("parallel trainer: ") + e.what());
  }
}

}  // namespace archipelago::runtime
