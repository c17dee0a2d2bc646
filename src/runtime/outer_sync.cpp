// DiLoCo and streaming DiLoCo (docs/strategies.md).
//
// Both are one mechanism: the flat parameter vector is cut into fragments
// (DiLoCo: one), each with an anchor (its value after its last outer step)
// and an outer momentum. When a fragment is due, every rank computes its
// pseudo-gradient delta = anchor - params; the islands exchange their deltas
// compressed (each island's delta counted once, weighted by the tokens the
// island processed since the fragment's last sync); every rank applies the
// same outer Nesterov step to the anchor; and the fragment's parameters are
// replaced by the new anchor plus whatever local progress was made while the
// exchange was in flight (streaming's overlap; zero for DiLoCo).
//
// Threads: the trainer's thread owns the parameters and the schedule; one
// "outer" thread (this object's core::BackgroundQueue) runs the exchanges in submission order
// (so every rank issues the same collectives in the same order on this
// object's groups) and, for the fragment it is working on, owns that
// fragment's slice of anchor / momentum and its error-feedback residual
// until the job is `ready` (the trainer's thread waits for that). The replica
// check of an outer step (a digest exchange, one more round trip over the
// straits) runs on the outer thread after `ready`, while training goes on;
// a mismatch is the queue's sticky error: it fails the next complete() or
// finish(), and the exchanges queued behind it are skipped.
//
// Groups: the inner steps use the trainer's island groups and the world
// group from other threads at the same time, and a Group's tag space is a
// hash of its member list, so this object builds its own groups with the
// members in DESCENDING rank order (never the ascending order the trainer's
// groups use): island group (same island) and cross group (the members at
// the same position of every island). Ranks at positions >= K (K = smallest
// island) hold no shard and receive the result from their island.
#include "archipelago/runtime/outer_sync.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>

#include <fmt/format.h>

#include "archipelago/comm/codec.h"
#include "archipelago/comm/communicator.h"
#include "archipelago/core/background_queue.h"
#include "archipelago/core/clock.h"
#include "archipelago/core/hash.h"
#include "archipelago/core/log.h"
#include "archipelago/report/metrics.h"

namespace archipelago::runtime {

// ---- schedule -------------------------------------------------------------------

core::Result<std::vector<Fragment>> fragmentSchedule(int64_t numel, int64_t fragments, int64_t inner_steps,
                                                     std::span<const int64_t> boundaries) {
  if (inner_steps < 1) {
    return core::invalidArgument("strategy.inner_steps is " + std::to_string(inner_steps) + "; expected >= 1");
  }
  if (fragments < 1 || fragments > numel) {
    return core::invalidArgument("strategy.fragments is " + std::to_string(fragments) + "; expected 1.." +
                                 std::to_string(numel) + " (the number of parameters)");
  }
  std::vector<int64_t> b;
  for (int64_t x : boundaries) {
    if (x > 0 && x < numel) b.push_back(x);
  }
  std::sort(b.begin(), b.end());
  b.erase(std::unique(b.begin(), b.end()), b.end());
  std::vector<int64_t> cuts{0};
  for (int64_t f = 1; f < fragments; ++f) {
    const int64_t ideal = numel * f / fragments;
    // Room the remaining fragments need: every piece keeps >= 1 parameter.
    const int64_t lo = cuts.back() + 1, hi = numel - (fragments - f);
    int64_t cut = std::clamp(ideal, lo, hi);
    auto it = std::lower_bound(b.begin(), b.end(), ideal);
    int64_t best = -1;
    for (auto c : {it, it == b.begin() ? b.end() : it - 1}) {
      if (c == b.end() || *c < lo || *c > hi) continue;
      if (best < 0 || std::llabs(*c - ideal) < std::llabs(best - ideal)) best = *c;
    }
    // A tensor boundary is used if it is within half a fragment of the ideal cut.
    if (best >= 0 && std::llabs(best - ideal) * 2 * fragments <= numel) cut = best;
    cuts.push_back(cut);
  }
  cuts.push_back(numel);
  std::vector<Fragment> out;
  for (int64_t f = 0; f < fragments; ++f) {
    out.push_back({cuts[static_cast<size_t>(f)], cuts[static_cast<size_t>(f) + 1], (f * inner_steps) / fragments});
  }
  return out;
}

std::vector<int> fragmentsDue(const std::vector<Fragment>& fragments, int64_t step, int64_t inner_steps) {
  std::vector<int> due;
  if (step < 1 || inner_steps < 1) return due;
  for (size_t f = 0; f < fragments.size(); ++f) {
    const int64_t d = step - fragments[f].offset;
    if (d >= 0 && d % inner_steps == 0) due.push_back(static_cast<int>(f));
  }
  return due;
}

core::Status compareReplicaDigests(const std::vector<std::string>& digests, const std::string& what) {
  std::map<std::string, std::vector<int>> by;
  for (size_t r = 0; r < digests.size(); ++r) by[digests[r]].push_back(static_cast<int>(r));
  if (by.size() <= 1) return core::okStatus();
  std::string msg = "replicas are not bit-identical after " + what + ":";
  for (const auto& [d, ranks] : by) msg += fmt::format(" ranks [{}] have sha256 {}...;", fmt::join(ranks, ","), d.substr(0, 16));
  return core::dataLoss(msg + " (non-deterministic arithmetic, a corrupted transfer or a schedule mismatch)");
}

namespace {

namespace fs = std::filesystem;

constexpr double kOpTimeoutS = 600;  // one exchange; peer loss is detected by heartbeats much sooner

// One exchange, from submission to application: one fragment, or several
// (the final sync at the end of training) sharing one round trip.
struct Job {
  std::vector<int> frags;      // fragment indices, ascending
  std::vector<size_t> at;      // per fragment: its offset in buf / sent
  std::vector<double> tokens;  // per fragment: this rank's tokens in the fragment's round
  int64_t sent_step = 0;
  int64_t apply_step = 0;
  std::vector<float> buf;      // in: local deltas; out: the islands' weighted mean deltas
  std::vector<float> sent;     // params at submission (only with overlap)
  // The trainer's control values (island sums in, world sums out); empty = none.
  std::vector<double> control;
  core::TimePoint t_submit;
  // Results, written by the outer thread before `ready`: the exchange and
  // the outer step are done, the anchor holds the new value.
  bool ready = false;
  core::Status status;
  double exchange_s = 0;
  std::vector<uint64_t> strait_bytes;  // per fragment: payload bytes this rank put on the cross group
                                       // (computed from codec sizes; the header counted with the first)
  core::Sha256Digest dg{};     // sha256 of (anchor, momentum) of the job's fragments after the outer step
  std::string digest;          // the same in hex
};

class FragmentOuterSync final : public OuterSync {
 public:
  FragmentOuterSync(const OuterContext& ctx, const torch::Tensor& params) : ctx_(ctx) {
    const auto& s = ctx.job->strategy;
    streaming_ = s.kind == "streaming";
    H_ = s.inner_steps;
    lr_ = static_cast<float>(s.outer_lr);
    beta_ = static_cast<float>(s.outer_momentum);
    nesterov_ = s.nesterov;
    overlap_ = streaming_ ? s.overlap_steps : 0;
    numel_ = params.numel();
    anchor_ = params.detach().to(torch::kCPU, torch::kFloat32).contiguous().clone();  // host: the comm layer's
    momentum_ = torch::zeros_like(anchor_);
  }

  ~FragmentOuterSync() override {
    abort_.abort();  // an exchange still blocked (the trainer failed) returns now
    queue_.cancel(core::aborted("outer sync closed"));  // and the queued ones never start
    // queue_, the last member, joins its thread before anything it uses goes.
  }

  core::Status init() {
    const auto& s = ctx_.job->strategy;
    ARCH_ASSIGN_OR_RETURN(codec_, comm::parseCodec(s.codec));
    if (!(s.outer_momentum >= 0 && s.outer_momentum < 1)) {
      return core::invalidArgument(fmt::format("strategy.outer_momentum is {}; expected 0 <= momentum < 1", s.outer_momentum));
    }
    if (!(s.outer_lr > 0)) return core::invalidArgument(fmt::format("strategy.outer_lr is {}; expected > 0", s.outer_lr));
    if (overlap_ < 0 || overlap_ >= H_) {
      return core::invalidArgument(fmt::format(
          "strategy.overlap_steps is {}; expected 0 <= overlap_steps < strategy.inner_steps ({})", overlap_, H_));
    }
    if (!ctx_.fragment_cuts.empty()) {
      // Cut in the single-process layout (the trainer's); the schedule as fragmentSchedule's.
      const auto n = static_cast<int64_t>(ctx_.fragment_cuts.size()) - 1;
      if (n != (streaming_ ? s.fragments : 1) || ctx_.fragment_cuts.back() != numel_) {
        return core::internalError(fmt::format("outer sync: {} fragment cuts ending at {} for {} fragments of {}", n + 1,
                                               ctx_.fragment_cuts.back(), streaming_ ? s.fragments : 1, numel_));
      }
      frags_.clear();
      for (int64_t f = 0; f < n; ++f) {
        frags_.push_back({ctx_.fragment_cuts[static_cast<size_t>(f)], ctx_.fragment_cuts[static_cast<size_t>(f) + 1],
                          (f * H_) / n});
      }
    } else {
      ARCH_ASSIGN_OR_RETURN(frags_, fragmentSchedule(numel_, streaming_ ? s.fragments : 1, H_, ctx_.segment_offsets));
    }

    last_tokens_.assign(frags_.size(), 0);
    last_sent_.assign(frags_.size(), -1);
    rounds_.assign(frags_.size(), 0);
    if (s.error_feedback && codec_ != comm::CodecKind::kNone) {
      for (size_t f = 0; f < frags_.size(); ++f) efs_.push_back(std::make_unique<comm::ErrorFeedback>(codec_));
    }
    ARCH_RETURN_IF_ERROR(buildGroups());
    if (ctx_.metrics == nullptr) {
      const std::string dir = ctx_.run_dir.empty() ? ctx_.job->run_dir : ctx_.run_dir;
      std::error_code ec;
      fs::create_directories(dir, ec);
      if (own_metrics_.open((fs::path(dir) / "metrics.jsonl").string()).isOk()) metrics_ = &own_metrics_;
    } else {
      metrics_ = ctx_.metrics;
    }
    if (ctx_.world_group) straitMark_ = ctx_.world_group->straitBytesSent();
    if (ctx_.rank == 0) {
      ARCH_LOG_INFO("{}: H={} fragments={} overlap={} codec={} error_feedback={} outer lr={} momentum={}{}; {} shard(s) per island",
                    ctx_.job->strategy.kind, H_, frags_.size(), overlap_, comm::codecName(codec_),
                    !efs_.empty(), lr_, beta_, nesterov_ ? " (nesterov)" : "", K_);
    }
    return core::okStatus();
  }

  core::Status afterInnerStep(int64_t step, torch::Tensor params, int64_t tokens) override {
    ARCH_CHECK(params.numel() == numel_ && params.is_contiguous() && params.scalar_type() == torch::kFloat32);
    cum_tokens_ += tokens;
    float* p = params.data_ptr<float>();
    // Results due now (submitted overlap_ steps ago).
    while (!inflight_.empty() && inflight_.front()->apply_step <= step) {
      ARCH_RETURN_IF_ERROR(complete(inflight_.front(), p, step));
      inflight_.pop_front();
    }
    // The last step's syncs are left to finish(), which does all of them in one exchange.
    if (step >= ctx_.job->train.steps) return core::okStatus();
    for (int f : fragmentsDue(frags_, step, H_)) {
      auto job = submit({f}, step, p);
      if (job->apply_step <= step) {
        ARCH_RETURN_IF_ERROR(complete(job, p, step));
      } else {
        inflight_.push_back(job);
      }
    }
    return core::okStatus();
  }

  bool touchesParams(int64_t step) const override {
    if (!inflight_.empty() && inflight_.front()->apply_step <= step) return true;
    return step < ctx_.job->train.steps && !fragmentsDue(frags_, step, H_).empty();
  }

  void attachControl(std::span<const double> island_sums) override {
    control_out_.assign(island_sums.begin(), island_sums.end());
  }

  std::optional<Control> takeControl() override {
    std::optional<Control> c = std::move(control_in_);
    control_in_.reset();
    return c;
  }

  core::Status finish(int64_t step, torch::Tensor params) override {
    float* p = params.data_ptr<float>();
    while (!inflight_.empty()) {
      ARCH_RETURN_IF_ERROR(complete(inflight_.front(), p, step));
      inflight_.pop_front();
    }
    if (step < ctx_.job->train.steps) return waitForChecks();  // a stop: the next run continues the rounds
    // End of training: a last outer step over every fragment with progress
    // since its last sync, so that every replica ends with the same weights
    // (one exchange for all of them: one strait round trip, not F).
    std::vector<int> last;
    for (size_t f = 0; f < frags_.size(); ++f) {
      if (last_sent_[f] != step) last.push_back(static_cast<int>(f));
    }
    if (!last.empty()) {
      auto job = submit(last, step, p);
      job->apply_step = step;
      job->sent.clear();
      ARCH_RETURN_IF_ERROR(complete(job, p, step));
      if (ctx_.rank == 0) ARCH_LOG_INFO("{}: final outer sync of {} fragment(s) at step {}", ctx_.job->strategy.kind, last.size(), step);
    }
    return waitForChecks();
  }

  NamedTensors stateTensors() const override {
    // A job still running writes its fragment's anchor: let it get that far
    // (its replica check only reads the digest).
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return std::all_of(inflight_.begin(), inflight_.end(), [](const auto& j) { return j->ready; });
      });
    }
    NamedTensors out{{"anchor", anchor_}, {"momentum", momentum_}};
    // Residuals are per rank; only rank 0 writes checkpoints, so only its own survive a restart.
    for (size_t f = 0; f < efs_.size(); ++f) {
      auto r = efs_[f]->residual();
      if (r.empty()) continue;
      out.push_back({fmt::format("ef.r{}.f{}", ctx_.rank, f),
                     torch::from_blob(const_cast<float*>(r.data()), {static_cast<int64_t>(r.size())}, torch::kFloat32).clone()});
    }
    return out;
  }

  nlohmann::json stateJson() const override {
    return {{"kind", ctx_.job->strategy.kind}, {"fragments", frags_.size()}, {"inner_steps", H_},
            {"numel", numel_}, {"cum_tokens", cum_tokens_}, {"last_tokens", last_tokens_},
            {"rounds", rounds_}, {"outer_steps", outer_steps_}};
  }

  core::Status restore(const NamedTensors& tensors, const nlohmann::json& state) override {
    if (!state.is_object() || state.value("kind", "") != ctx_.job->strategy.kind ||
        state.value("fragments", size_t{0}) != frags_.size() || state.value("numel", int64_t{0}) != numel_) {
      return core::failedPrecondition("the checkpoint's outer-sync state (" + state.dump() +
                                      ") does not match this job's strategy " + ctx_.job->strategy.kind + " with " +
                                      std::to_string(frags_.size()) + " fragment(s); resume with the same strategy");
    }
    std::map<std::string, torch::Tensor> by(tensors.begin(), tensors.end());
    for (const char* name : {"anchor", "momentum"}) {
      auto it = by.find(name);
      if (it == by.end() || it->second.numel() != numel_) {
        return core::dataLoss(std::string("checkpoint lacks outer-sync tensor '") + name + "' of the model's size");
      }
    }
    anchor_.copy_(by["anchor"].reshape({-1}));
    momentum_.copy_(by["momentum"].reshape({-1}));
    cum_tokens_ = state.value("cum_tokens", int64_t{0});
    last_tokens_ = state.value("last_tokens", last_tokens_);
    rounds_ = state.value("rounds", rounds_);
    outer_steps_ = state.value("outer_steps", int64_t{0});
    if (last_tokens_.size() != frags_.size() || rounds_.size() != frags_.size()) {
      return core::dataLoss("checkpoint outer-sync state has per-fragment lists of the wrong length");
    }
    int restored = 0;
    for (size_t f = 0; f < efs_.size(); ++f) {
      auto it = by.find(fmt::format("ef.r{}.f{}", ctx_.rank, f));
      efs_[f]->reset();
      if (it == by.end() || my_pos_ >= K_) continue;
      const auto& fr = frags_[f];
      if (static_cast<size_t>(it->second.numel()) != shardCounts(static_cast<size_t>(fr.end - fr.begin))[my_pos_]) {
        continue;  // another layout (world size or islands changed): start from zero
      }
      torch::Tensor r = it->second.contiguous().to(torch::kFloat32);
      std::vector<float> zeros(static_cast<size_t>(r.numel()), 0.0f);
      // update(compensated, decoded) sets r = compensated - decoded = r exactly.
      efs_[f]->update(std::span<const float>(r.data_ptr<float>(), zeros.size()), zeros);
      ++restored;
    }
    if (!efs_.empty() && restored == 0) {
      ARCH_LOG_INFO("outer sync: no error-feedback residual of rank {} in the checkpoint; starting from zero", ctx_.rank);
    }
    return core::okStatus();
  }

 private:
  core::Status buildGroups() {
    const int world = ctx_.world;
    int n_islands = 0;
    for (int i : ctx_.island_of_rank) n_islands = std::max(n_islands, i + 1);
    if (world <= 1 || !ctx_.world_group) {
      K_ = 1;
      my_pos_ = 0;
      return core::okStatus();
    }
    if (static_cast<int>(ctx_.island_of_rank.size()) != world) {
      return core::internalError("outer sync: island_of_rank has " + std::to_string(ctx_.island_of_rank.size()) +
                            " entries for a world of " + std::to_string(world));
    }
    // Members of every island, descending.
    members_.assign(static_cast<size_t>(n_islands), {});
    // Only the world group's members take part (after a failure some slots are empty).
    const auto& in_world = ctx_.world_group->ranks();
    for (int r = world - 1; r >= 0; --r) {
      if (std::find(in_world.begin(), in_world.end(), r) == in_world.end()) continue;
      members_[static_cast<size_t>(ctx_.island_of_rank[static_cast<size_t>(r)])].push_back(r);
    }
    K_ = SIZE_MAX;
    for (const auto& m : members_) {
      if (!m.empty()) K_ = std::min(K_, m.size());
    }
    const auto& mine = members_[static_cast<size_t>(ctx_.island_of_rank[static_cast<size_t>(ctx_.rank)])];
    my_pos_ = static_cast<size_t>(std::find(mine.begin(), mine.end(), ctx_.rank) - mine.begin());
    if (mine.size() > 1) {
      ARCH_ASSIGN_OR_RETURN(island_, ctx_.world_group->subgroup(mine));
    }
    if (my_pos_ < K_) {
      std::vector<int> cross;
      for (int i = n_islands - 1; i >= 0; --i) {
        if (!members_[static_cast<size_t>(i)].empty()) cross.push_back(members_[static_cast<size_t>(i)][my_pos_]);
      }
      if (cross.size() > 1) {
        ARCH_ASSIGN_OR_RETURN(cross_, ctx_.world_group->subgroup(cross));
      }
    }
    return core::okStatus();
  }

  std::shared_ptr<Job> submit(const std::vector<int>& frags, int64_t step, const float* p) {
    auto job = std::make_shared<Job>();
    job->frags = frags;
    job->sent_step = step;
    job->apply_step = step + overlap_;
    size_t total = 0;
    for (int f : frags) {
      const auto& fr = frags_[static_cast<size_t>(f)];
      job->at.push_back(total);
      total += static_cast<size_t>(fr.end - fr.begin);
      job->tokens.push_back(static_cast<double>(cum_tokens_ - last_tokens_[static_cast<size_t>(f)]));
      last_tokens_[static_cast<size_t>(f)] = cum_tokens_;
      last_sent_[static_cast<size_t>(f)] = step;
    }
    job->buf.resize(total);
    if (overlap_ > 0) job->sent.resize(total);
    for (size_t i = 0; i < frags.size(); ++i) {
      const auto& fr = frags_[static_cast<size_t>(frags[i])];
      const float* a = anchor_.data_ptr<float>() + fr.begin;
      float* d = job->buf.data() + job->at[i];
      for (int64_t j = 0; j < fr.end - fr.begin; ++j) d[j] = a[j] - p[fr.begin + j];
      if (overlap_ > 0) std::copy(p + fr.begin, p + fr.end, job->sent.begin() + static_cast<std::ptrdiff_t>(job->at[i]));
    }
    // The trainer's control values ride along with the first exchange started after they were attached.
    job->control = std::move(control_out_);
    control_out_.clear();
    job->t_submit = core::Clock::now();
    queue_.submit([this, job] { return runJob(*job); }, [this, job](const core::Status& why) { skipJob(*job, why); });
    return job;
  }

  // Waits for the job's exchange and outer step, then writes the fragment's parameters.
  core::Status complete(const std::shared_ptr<Job>& job, float* p, int64_t step) {
    const auto t0 = core::Clock::now();
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return job->ready; });
    }
    const double wait_s = core::secondsSince(t0);
    ARCH_RETURN_IF_ERROR(queue_.error());  // a failed replica check of an earlier outer step
    ARCH_RETURN_IF_ERROR(job->status.withContext(fmt::format("outer step of fragment(s) {} sent after step {}",
                                                             fmt::join(job->frags, ","), job->sent_step)));
    if (!job->control.empty()) control_in_ = Control{job->sent_step, job->control};
    uint64_t measured = 0;
    if (ctx_.world_group) {
      const uint64_t now = ctx_.world_group->straitBytesSent();
      measured = now - straitMark_;
      straitMark_ = now;
    }
    for (size_t i = 0; i < job->frags.size(); ++i) {
      const int f = job->frags[i];
      const auto& fr = frags_[static_cast<size_t>(f)];
      const float* a = anchor_.data_ptr<float>() + fr.begin;
      const int64_t n = fr.end - fr.begin;
      if (job->sent.empty()) {
        std::memcpy(p + fr.begin, a, static_cast<size_t>(n) * sizeof(float));
      } else {
        // Merge: the new global value plus the local progress made during the overlap.
        const float* sent = job->sent.data() + job->at[i];
        for (int64_t j = 0; j < n; ++j) p[fr.begin + j] = a[j] + (p[fr.begin + j] - sent[j]);
      }
      ++outer_steps_;
      const int64_t round = ++rounds_[static_cast<size_t>(f)];
      if (metrics_) {
        // One line per fragment; a shared exchange (the final sync) reports its
        // time and measured bytes on every line of it, with "shared" set.
        metrics_->write(report::OuterRecord{
            .strategy = ctx_.job->strategy.kind, .step = step, .sent_step = job->sent_step, .round = round,
            .fragment = f, .rank = ctx_.rank,
            .island = ctx_.island_of_rank.empty() ? 0 : ctx_.island_of_rank[static_cast<size_t>(ctx_.rank)],
            .params = static_cast<double>(n), .codec = std::string(comm::codecName(codec_)),
            .bytes_strait = static_cast<double>(i < job->strait_bytes.size() ? job->strait_bytes[i] : 0),
            .bytes_strait_measured = static_cast<double>(i == 0 ? measured : 0),
            .shared = static_cast<double>(job->frags.size()), .control = !job->control.empty(),
            .sync_s = job->exchange_s, .wait_s = wait_s, .digest = job->digest.substr(0, 16)});
      }
    }
    return core::okStatus();
  }

  // Outer thread: one job's exchange and outer step; then, once the trainer
  // may use the result (`ready`), its replica check, whose failure is
  // returned (the queue's sticky error). The replica check runs while the
  // trainer already trains on the result: it costs a round trip over the
  // straits that nobody needs to wait for.
  core::Status runJob(Job& job) {
    const auto t0 = core::Clock::now();
    core::Status st = exchangeAndStep(job);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job.status = st;
      job.exchange_s = core::secondsSince(t0);
      job.ready = true;
    }
    cv_.notify_all();
    // A failed exchange reaches the trainer through job.status.
    if (!st.isOk()) return core::okStatus();
    return checkDigests(job.dg, fmt::format("the outer step of fragment(s) {} sent after step {}",
                                            fmt::join(job.frags, ","), job.sent_step));
  }

  // Outer thread: a job skipped after a failed check (or at destruction)
  // is ready with that error, so nobody waits for it.
  void skipJob(Job& job, const core::Status& why) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job.status = why;
      job.ready = true;
    }
    cv_.notify_all();
  }

  // Every submitted outer step has been checked; the first failed check, if any.
  core::Status waitForChecks() { return queue_.drain(); }

  comm::OpOptions opts() const {
    comm::OpOptions o = comm::OpOptions::within(kOpTimeoutS);
    o.abort = abort_;
    return o;
  }

  // Outer thread: average the job's fragments' deltas over islands (one
  // cross-island allgather for all of them, the trainer's control values in
  // its header), outer step, digest for the replica check.
  core::Status exchangeAndStep(Job& job) {
    const size_t nf = job.frags.size();
    auto fragSize = [&](size_t i) { return fragmentSize(job, i); };
    // 1. Tokens of my island in each fragment's round.
    std::vector<double> island_tokens = job.tokens;
    if (island_) {
      ARCH_RETURN_IF_ERROR(island_->allreduce(island_tokens.data(), nf, comm::DType::kF64, comm::ReduceOp::kSum, opts())
                               .withContext("island token count"));
    }
    const size_t nc = job.control.size();
    job.strait_bytes.assign(nf, 0);
    if (ctx_.mean_by_name) {
      // Per-island layouts: the islands' mean by tensor name, fragment by
      // fragment (each the same tensors in every island's terms); the
      // control values ride with the first.
      std::vector<double> none;
      for (size_t i = 0; i < nf; ++i) {
        uint64_t sent = 0;
        ARCH_RETURN_IF_ERROR(ctx_.mean_by_name(static_cast<size_t>(job.frags[i]),
                                               std::span<float>(job.buf.data() + job.at[i], fragSize(i)), island_tokens[i],
                                               i == 0 ? job.control : none, sent)
                                 .withContext("cross-island pseudo-gradient mean by tensor name"));
        job.strait_bytes[i] = sent;
      }
      return outerStep(job);
    }
    // 2. My shard of every fragment (position my_pos_ < K) crosses the
    // straits, compressed: [tokens per fragment][control][shard 0]...[shard nf-1].
    std::vector<size_t> off(nf, 0), len(nf, 0), enc(nf, 0), body_at(nf, 0);
    size_t payload = sizeof(double) * (nf + nc);
    for (size_t i = 0; i < nf; ++i) {
      const auto shards = shardCounts(fragSize(i));
      for (size_t k = 0; k < my_pos_ && k < K_; ++k) off[i] += shards[k];
      len[i] = my_pos_ < K_ ? shards[my_pos_] : 0;
      enc[i] = comm::encodedSize(codec_, len[i]);
      body_at[i] = payload;
      payload += enc[i];
    }
    if (my_pos_ < K_) {
      // Exchange buffers kept across outer steps (this thread's arena frees
      // emptied heaps back to the kernel: fresh ones faulted ~4,000 pages
      // in at every outer step).
      auto& out = x_out_;
      out.assign(payload, 0);
      std::memcpy(out.data(), island_tokens.data(), sizeof(double) * nf);
      if (nc > 0) std::memcpy(out.data() + sizeof(double) * nf, job.control.data(), sizeof(double) * nc);
      for (size_t i = 0; i < nf; ++i) {
        std::span<float> mine(job.buf.data() + job.at[i] + off[i], len[i]);
        std::span<uint8_t> body(out.data() + body_at[i], enc[i]);
        if (!efs_.empty()) {
          efs_[static_cast<size_t>(job.frags[i])]->encode(mine, body);
        } else {
          comm::encode(codec_, mine, body);
        }
      }
      const size_t members = cross_ ? static_cast<size_t>(cross_->size()) : 1;
      auto& all = x_all_;
      all.resize(payload * members);
      if (cross_) {
        ARCH_RETURN_IF_ERROR(cross_->allgather(out.data(), all.data(), payload, comm::DType::kU8, opts())
                                 .withContext("cross-island pseudo-gradient exchange"));
        // Ring allgather: each member forwards n-1 blocks; the header is counted with the first fragment.
        for (size_t i = 0; i < nf; ++i) job.strait_bytes[i] = (members - 1) * (enc[i] + (i == 0 ? sizeof(double) * (nf + nc) : 0));
      } else {
        all = out;
      }
      // Same bytes, same order on every member: the means and sums are bit-identical everywhere.
      if (nc > 0) {
        std::vector<double> sum(nc, 0.0), c(nc);
        for (size_t m = 0; m < members; ++m) {
          std::memcpy(c.data(), all.data() + m * payload + sizeof(double) * nf, sizeof(double) * nc);
          for (size_t j = 0; j < nc; ++j) sum[j] += c[j];
        }
        job.control = sum;
      }
      for (size_t i = 0; i < nf; ++i) {
        double total = 0;
        std::vector<double> tok(members);
        for (size_t m = 0; m < members; ++m) {
          std::memcpy(&tok[m], all.data() + m * payload + sizeof(double) * i, sizeof(double));
          total += tok[m];
        }
        std::span<float> mine(job.buf.data() + job.at[i] + off[i], len[i]);
        std::fill(mine.begin(), mine.end(), 0.0f);
        auto& dec = x_dec_;
        dec.resize(mine.size());
        for (size_t m = 0; m < members; ++m) {
          ARCH_RETURN_IF_ERROR(comm::decode(codec_, std::span<const uint8_t>(all.data() + m * payload + body_at[i], enc[i]), dec)
                                   .withContext("decoding island " + std::to_string(m) + "'s pseudo-gradient"));
          const float w = total > 0 ? static_cast<float>(tok[m] / total) : 1.0f / static_cast<float>(members);
          for (size_t j = 0; j < dec.size(); ++j) mine[j] += w * dec[j];
        }
      }
    }
    // 3. Every island member gets every shard (and the control sums, which
    // only the shard holders received across the straits).
    if (island_) {
      std::vector<size_t> counts(static_cast<size_t>(island_->size()), 0);
      for (size_t i = 0; i < nf; ++i) {
        const auto shards = shardCounts(fragSize(i));
        for (size_t k = 0; k < K_ && k < counts.size(); ++k) counts[k] = shards[k];
        ARCH_RETURN_IF_ERROR(island_->allgatherv(job.buf.data() + job.at[i] + off[i], job.buf.data() + job.at[i], counts,
                                                 comm::DType::kF32, opts())
                                 .withContext("island allgather of the mean pseudo-gradient"));
      }
      if (nc > 0 && static_cast<size_t>(island_->size()) > K_) {
        ARCH_RETURN_IF_ERROR(island_->broadcast(job.control.data(), nc, comm::DType::kF64, 0, opts())
                                 .withContext("island broadcast of the control values"));
      }
    }
    return outerStep(job);
  }

  // 4. Outer Nesterov step on each fragment's anchor (owned by this thread
  // while the job runs) with the mean pseudo-gradient in job.buf.
  core::Status outerStep(Job& job) {
    const size_t nf = job.frags.size();
    auto fragSize = [&](size_t i) { return fragmentSize(job, i); };
    core::Sha256 h;
    for (size_t i = 0; i < nf; ++i) {
      const auto& fr = frags_[static_cast<size_t>(job.frags[i])];
      const size_t n = fragSize(i);
      const float* d = job.buf.data() + job.at[i];
      float* a = anchor_.data_ptr<float>() + fr.begin;
      float* m = momentum_.data_ptr<float>() + fr.begin;
      for (size_t j = 0; j < n; ++j) {
        const float mj = beta_ * m[j] + d[j];
        m[j] = mj;
        const float s = nesterov_ ? d[j] + beta_ * mj : mj;
        a[j] = a[j] - lr_ * s;
      }
      // 5. The digest of (anchor, momentum) of the fragments for the replica
      // check, which loop() runs after handing the result to the trainer.
      h.update(a, n * sizeof(float));
      h.update(m, n * sizeof(float));
    }
    job.dg = h.finish();
    job.digest = core::toHex(job.dg);
    return core::okStatus();
  }

  // Elements of the job's i-th fragment.
  size_t fragmentSize(const Job& job, size_t i) const {
    const auto& fr = frags_[static_cast<size_t>(job.frags[i])];
    return static_cast<size_t>(fr.end - fr.begin);
  }

  std::vector<size_t> shardCounts(size_t n) const {
    std::vector<size_t> c(K_, n / K_);
    for (size_t k = 0; k < n % K_; ++k) ++c[k];
    return c;
  }

  // Island allgather of the digests, then the island tables across the
  // straits (cross members); every rank compares what it has.
  core::Status checkDigests(const core::Sha256Digest& dg, const std::string& what) {
    if (members_.empty()) return core::okStatus();
    const int my_island = ctx_.island_of_rank[static_cast<size_t>(ctx_.rank)];
    const auto& mine = members_[static_cast<size_t>(my_island)];
    std::vector<uint8_t> table(mine.size() * 32);
    if (island_) {
      ARCH_RETURN_IF_ERROR(island_->allgather(dg.data(), table.data(), 32, comm::DType::kU8, opts()).withContext("digest allgather"));
    } else {
      std::memcpy(table.data(), dg.data(), 32);
    }
    std::map<int, std::string> by_rank;
    for (size_t i = 0; i < mine.size(); ++i) by_rank[mine[i]] = core::toHex(std::span<const uint8_t>(table.data() + 32 * i, 32));
    if (cross_) {
      std::vector<size_t> counts;
      std::vector<int> islands;
      for (int r : cross_->ranks()) {
        islands.push_back(ctx_.island_of_rank[static_cast<size_t>(r)]);
        counts.push_back(members_[static_cast<size_t>(islands.back())].size() * 32);
      }
      size_t total = 0;
      for (size_t c : counts) total += c;
      std::vector<uint8_t> all(total);
      ARCH_RETURN_IF_ERROR(cross_->allgatherv(table.data(), all.data(), counts, comm::DType::kU8, opts())
                               .withContext("cross-island digest allgather"));
      size_t off = 0;
      for (size_t i = 0; i < islands.size(); ++i) {
        const auto& mem = members_[static_cast<size_t>(islands[i])];
        for (size_t k = 0; k < mem.size(); ++k) {
          by_rank[mem[k]] = core::toHex(std::span<const uint8_t>(all.data() + off + 32 * k, 32));
        }
        off += counts[i];
      }
    }
    std::vector<std::string> digests;
    std::vector<int> ranks;
    for (const auto& [r, d] : by_rank) {
      ranks.push_back(r);
      digests.push_back(d);
    }
    core::Status st = compareReplicaDigests(digests, what);
    if (!st.isOk() && ranks.size() != static_cast<size_t>(ctx_.world)) {
      st = st.withContext(fmt::format("compared ranks [{}] (indices above are into this list)", fmt::join(ranks, ",")));
    }
    return st;
  }

  OuterContext ctx_;
  bool streaming_ = false;
  int64_t H_ = 1;
  float lr_ = 1, beta_ = 0;  // outer learning rate and momentum
  bool nesterov_ = true;
  int64_t overlap_ = 0;
  int64_t numel_ = 0;
  comm::CodecKind codec_ = comm::CodecKind::kNone;
  std::vector<Fragment> frags_;
  torch::Tensor anchor_, momentum_;
  std::vector<std::unique_ptr<comm::ErrorFeedback>> efs_;  // per fragment, my shard (outer thread)
  std::vector<uint8_t> x_out_, x_all_;                     // exchange buffers (outer thread)
  std::vector<float> x_dec_;
  std::vector<int64_t> last_tokens_;                       // cum_tokens_ at the fragment's last submission
  std::vector<int64_t> last_sent_;                         // step of the fragment's last submission (-1: none)
  std::vector<double> control_out_;                        // attached, not yet sent (trainer thread)
  std::optional<Control> control_in_;                      // world sums not yet taken (trainer thread)
  std::vector<int64_t> rounds_;
  int64_t cum_tokens_ = 0;
  int64_t outer_steps_ = 0;

  std::vector<std::vector<int>> members_;  // per island, global ranks descending
  size_t K_ = 1;
  size_t my_pos_ = 0;
  std::shared_ptr<comm::Group> island_, cross_;

  report::MetricsSink own_metrics_;
  report::MetricsSink* metrics_ = nullptr;
  uint64_t straitMark_ = 0;

  std::deque<std::shared_ptr<Job>> inflight_;  // trainer thread
  mutable std::mutex mu_;                      // guards each Job's results and `ready`
  mutable std::condition_variable cv_;
  core::AbortFlag abort_;
  // The outer thread. Last member: destroyed (joined) before everything its jobs use.
  core::BackgroundQueue queue_;
};

}  // namespace

core::Result<std::unique_ptr<OuterSync>> makeOuterSync(const OuterContext& ctx, const torch::Tensor& params) {
  const std::string& kind = ctx.job->strategy.kind;
  if (kind == "sync") return std::unique_ptr<OuterSync>();
  if (kind != "diloco" && kind != "streaming") {
    return core::invalidArgument("strategy.kind is '" + kind + "'; expected sync, diloco or streaming");
  }
  if (params.scalar_type() != torch::kFloat32 || !params.is_contiguous() || params.dim() != 1) {
    return core::invalidArgument("outer sync needs the flat fp32 parameter vector");
  }
  auto s = std::make_unique<FragmentOuterSync>(ctx, params);
  ARCH_RETURN_IF_ERROR(s->init());
  return std::unique_ptr<OuterSync>(std::move(s));
}

}  // namespace archipelago::runtime
