#include "archipelago/runtime/parallel/pipeline.h"

#include <algorithm>

#include "archipelago/core/background_queue.h"
#include "archipelago/core/clock.h"

namespace archipelago::runtime::parallel {

namespace {
constexpr uint32_t kTagActivation = 11;
constexpr uint32_t kTagGradient = 12;
constexpr uint32_t kTagEval = 14;
constexpr double kP2pTimeoutS = 600;

comm::OpOptions p2pOptions() { return comm::OpOptions::within(kP2pTimeoutS); }

torch::Tensor idRows(const std::vector<int64_t>& v, int64_t begin, int64_t n, int64_t t) {
  return torch::from_blob(const_cast<int64_t*>(v.data()) + begin * t, {n, t}, torch::kInt64).clone();
}
// What leaves a stage: fp32 host memory for the comm layer (no copy for an
// fp32 CPU stage).
torch::Tensor outbound(const torch::Tensor& t) { return t.detach().to(torch::kCPU, torch::kFloat).contiguous();
}
}  // namespace

std::vector<PipeOp> oneFOneBSchedule(int stage, int stages, int64_t m) {
  std::vector<PipeOp> ops;
  const int64_t warmup = std::min<int64_t>(stages - stage - 1, m);
  for (int64_t i = 0; i < warmup; ++i) ops.push_back({true, i});
  for (int64_t i = 0; i < m - warmup; ++i) {
    ops.push_back({true, warmup + i});
    ops.push_back({false, i});
  }
  for (int64_t i = m - warmup; i < m; ++i) ops.push_back({false, i});
  return ops;
}

double oneFOneBBubble(int stages, int64_t m) {
  return m + stages - 1 > 0 ? static_cast<double>(stages - 1) / static_cast<double>(m + stages - 1) : 0.0;
}

int64_t pipelineMicroCount(int64_t n, int64_t micro_batch, int stages) {
  if (n <= 0) return 0;
  if (micro_batch > 0) return (n + micro_batch - 1) / micro_batch;
  return std::min<int64_t>(n, stages > 1 ? 2 * stages : 1);
}

// Sends fp32 tensors (codec-encoded where set) to the neighbours on the
// queue's thread; the first failed send is kept and later ones are skipped
// (a stream whose message went missing cannot go on).
class PipelineParallel::Sender {
 public:
  explicit Sender(comm::Group* group) : group_(group) {}
  // `t` is fp32 and contiguous; kept alive until sent.
  void push(torch::Tensor t, comm::CodecKind codec, int dst, uint32_t tag) {
    std::vector<uint8_t> bytes;
    if (codec != comm::CodecKind::kNone) {
      bytes.resize(comm::encodedSize(codec, static_cast<size_t>(t.numel())));
      comm::encode(codec, std::span<const float>(t.data_ptr<float>(), static_cast<size_t>(t.numel())), bytes);
      t = torch::Tensor();
    }
    queue_.submit([this, t = std::move(t), bytes = std::move(bytes), dst, tag]() -> core::Status {
      core::Status st = t.defined() ? group_->send(t.data_ptr<float>(), static_cast<size_t>(t.numel()),
                                                   comm::DType::kF32, dst, tag, p2pOptions())
                                    : group_->send(bytes.data(), bytes.size(), comm::DType::kU8, dst, tag, p2pOptions());
      return st.isOk() ? st : st.withContext("pipeline send to rank " + std::to_string(dst));
    });
  }
  // Waits until everything pushed is sent; the first error, if any.
  core::Status drain() { return queue_.drain(); }

 private:
  comm::Group* group_;
  core::BackgroundQueue queue_;  // last: joined before group_ goes
};

// One micro-batch in flight on this stage.
struct PipelineParallel::Stash {
  torch::Tensor input;   // stage input (ids, or received activation requiring grad)
  torch::Tensor output;  // activation sent on (or the loss on the last stage)
  torch::Tensor aux;     // this stage's aux loss term (scaled), if it needs backward
};

PipelineParallel::PipelineParallel(model::Transformer net, std::shared_ptr<comm::Group> world,
                                   const PipelineOptions& options)
    : net_(std::move(net)),
      world_(std::move(world)),
      opt_(options),
      slowdown_(options.slowdown),
      sender_(std::make_unique<Sender>(world_.get())) {}

PipelineParallel::~PipelineParallel() = default;

core::Result<torch::Tensor> PipelineParallel::receive(std::vector<int64_t> shape, comm::CodecKind codec, int src,
                                                      uint32_t tag, TraceRecorder* trace, StepStats* stats,
                                                      const std::string& what) {
  const int64_t t0 = core::wallMicros();
  torch::Tensor out = torch::empty(shape, torch::kFloat);
  const size_t n = static_cast<size_t>(out.numel());
  core::Status st;
  if (codec == comm::CodecKind::kNone) {
    st = world_->recv(out.data_ptr<float>(), n, comm::DType::kF32, src, tag, p2pOptions());
  } else {
    std::vector<uint8_t> bytes(comm::encodedSize(codec, n));
    st = world_->recv(bytes.data(), bytes.size(), comm::DType::kU8, src, tag, p2pOptions());
    if (st.isOk()) st = comm::decode(codec, bytes, std::span<float>(out.data_ptr<float>(), n));
  }
  if (!st.isOk()) return st.withContext("pipeline receive (" + what + ") from rank " + std::to_string(src));
  const int64_t dur = core::wallMicros() - t0;
  if (trace) trace->complete(TraceRecorder::kWait, "recv " + what, t0, dur);
  if (stats) stats->wait_s += static_cast<double>(dur) / 1e6;
  return out;
}

// Forward of micro-batch i from `input`: the activation to send on (or, on
// the last stage, the scaled loss) and this stage's scaled aux-loss term.
std::pair<torch::Tensor, torch::Tensor> PipelineParallel::runForward(const StepInput& in, int64_t m, int64_t i,
                                                                     const torch::Tensor& input, StepStats* record) {
  const data::Batch& batch = *in.batch;
  const int64_t b = batch.n * i / m, e = batch.n * (i + 1) / m;
  const double frac = static_cast<double>(e - b) / in.group_samples;
  torch::Tensor out = net_->stageForward(input);
  if (opt_.stage == opt_.stages - 1) {
    auto lo = net_->headLoss(out, idRows(batch.target, b, e - b, in.seq_len).to(net_->device()));
    if (record) {
      record->ce_sum += lo.ce_sum.item<double>();
      record->tokens += lo.tokens;
      record->aux_sum += lo.aux_loss.item<double>() * static_cast<double>(e - b);
    }
    const double total_tokens = in.group_samples * static_cast<double>(in.seq_len);
    return {(lo.ce_sum / total_tokens + lo.aux_loss * frac) * in.loss_scale, torch::Tensor()};
  }
  torch::Tensor aux_term = net_->localAuxLoss();
  if (record) record->aux_sum += aux_term.item<double>() * static_cast<double>(e - b);
  return {out, aux_term.requires_grad() ? aux_term * (frac * in.loss_scale) : torch::Tensor()};
}

core::Status PipelineParallel::forwardOp(const StepInput& in, int64_t m, int64_t i, Stash& st, StepStats& stats) {
  const data::Batch& batch = *in.batch;
  const int64_t b = batch.n * i / m, e = batch.n * (i + 1) / m;
  torch::Tensor input;
  if (opt_.stage == 0) {
    input = idRows(batch.input, b, e - b, in.seq_len).to(net_->device());
  } else {
    ARCH_ASSIGN_OR_RETURN(input, receive({e - b, in.seq_len / opt_.seq_parts, opt_.dim}, opt_.prev_codec, opt_.prev_rank, kTagActivation,
                                         in.trace, &stats, "activation " + std::to_string(i)));
    input = input.to(net_->device(), opt_.dtype).requires_grad_(true);
  }
  const auto c0 = core::Clock::now();
  const int64_t t0 = core::wallMicros();
  if (opt_.recompute) {
    torch::NoGradGuard ng;
    st.output = runForward(in, m, i, input, &stats).first;
  } else {
    std::tie(st.output, st.aux) = runForward(in, m, i, input, &stats);
  }
  st.input = input;
  const double c = core::secondsSince(c0);
  if (in.trace) {
    in.trace->complete(TraceRecorder::kCompute, "F" + std::to_string(i), t0, core::wallMicros() - t0,
                       {{"stage", opt_.stage}, {"micro", i}});
  }
  // The output leaves after the emulated slowdown: a slower device has it later.
  slowdown_.stretchOp(c, in.trace, "F", e - b);
  if (opt_.stage + 1 < opt_.stages) {
    sender_->push(outbound(st.output), opt_.next_codec, opt_.next_rank, kTagActivation);
  }
  stats.compute_s += core::secondsSince(c0);  // busy: compute, emulated slowdown, handing the output on
  if (opt_.recompute) st.output = torch::Tensor();
  return core::okStatus();
}

core::Status PipelineParallel::backwardOp(const StepInput& in, int64_t m, int64_t i, Stash& st, StepStats& stats) {
  const data::Batch& batch = *in.batch;
  const int64_t b = batch.n * i / m, e = batch.n * (i + 1) / m;
  const bool last = opt_.stage == opt_.stages - 1;
  torch::Tensor grad;
  if (!last) {
    ARCH_ASSIGN_OR_RETURN(grad, receive({e - b, in.seq_len / opt_.seq_parts, opt_.dim}, opt_.next_codec, opt_.next_rank, kTagGradient,
                                        in.trace, &stats, "gradient " + std::to_string(i)));
  }
  const auto c0 = core::Clock::now();
  const int64_t t0 = core::wallMicros();
  if (opt_.recompute) {
    // Router loads must count each micro-batch once, recomputation or not.
    auto moes = net_->moeLayers();
    std::vector<torch::Tensor> loads;
    for (auto& mo : moes) loads.push_back(mo->loadCounts().clone());
    std::tie(st.output, st.aux) = runForward(in, m, i, st.input, nullptr);
    for (size_t k = 0; k < moes.size(); ++k) moes[k]->loadCounts().copy_(loads[k]);
  }
  if (last) {
    st.output.backward();
  } else {
    std::vector<torch::Tensor> outs{st.output}, grads{grad.to(st.output.device(), st.output.scalar_type())};
    if (st.aux.defined()) {
      outs.push_back(st.aux);
      grads.push_back(torch::ones_like(st.aux));
    }
    torch::autograd::backward(outs, grads);
  }
  const double c = core::secondsSince(c0);
  if (in.trace) {
    in.trace->complete(TraceRecorder::kCompute, "B" + std::to_string(i), t0, core::wallMicros() - t0,
                       {{"stage", opt_.stage}, {"micro", i}});
  }
  slowdown_.stretchOp(c, in.trace, "B", e - b);
  if (opt_.stage > 0) {
    sender_->push(outbound(st.input.grad()), opt_.prev_codec, opt_.prev_rank, kTagGradient);
  }
  st = Stash{};
  stats.compute_s += core::secondsSince(c0);
  return core::okStatus();
}

// A micro-batch this pipeline has no rows for: the pass hooks' calls of the
// operation a pipeline with rows runs (its recomputation included).
void PipelineParallel::idleOp(const PipeOp& op) {
  if (op.forward) {
    passes_->idleForward(!opt_.recompute);
    return;
  }
  if (opt_.recompute) passes_->idleForward(true);
  passes_->idleBackward();
}

core::Status PipelineParallel::forwardBackward(const StepInput& in, StepStats& stats) {
  const int64_t m = agreed_count_ > 0 ? agreed_count_ : pipelineMicroCount(in.batch->n, opt_.micro_batch, opt_.stages);
  const int64_t ops = passes_ ? std::max(m, in.passes) : m;
  stats.micro_batches = m;
  stats.sched_begin_us = core::wallMicros();
  std::vector<Stash> stash(static_cast<size_t>(m));
  if (passes_) passes_->beginPass(true);
  for (const PipeOp& op : oneFOneBSchedule(opt_.stage, opt_.stages, ops)) {
    if (op.micro >= m) {
      idleOp(op);
      continue;
    }
    auto& st = stash[static_cast<size_t>(op.micro)];
    if (op.forward) {
      ARCH_RETURN_IF_ERROR(forwardOp(in, m, op.micro, st, stats));
    } else {
      ARCH_RETURN_IF_ERROR(backwardOp(in, m, op.micro, st, stats));
      if (passes_) passes_->endBackward();
    }
  }
  stats.sched_end_us = core::wallMicros();
  ScopedSpan span(in.trace, TraceRecorder::kComm, "pipeline sends drain", &stats.wait_s);
  return sender_->drain();
}

core::Status PipelineParallel::evaluate(const data::Batch& batch, int64_t seq_len, double& ce_sum, double& tokens) {
  if (!passes_) return evaluateRows(batch, seq_len, ce_sum, tokens);
  passes_->beginPass(false);
  if (batch.n == 0) passes_->idleForward(false);
  core::Status st = evaluateRows(batch, seq_len, ce_sum, tokens);
  passes_->endForwardOnly();
  return st;
}

core::Status PipelineParallel::evaluateRows(const data::Batch& batch, int64_t seq_len, double& ce_sum,
                                            double& tokens) {
  if (batch.n == 0) return core::okStatus();
  torch::NoGradGuard ng;
  net_->eval();
  struct TrainAgain {
    model::Transformer& net;
    ~TrainAgain() { net->train(); }
  } train_again{net_};
  torch::Tensor x;
  if (opt_.stage == 0) {
    x = idRows(batch.input, 0, batch.n, seq_len).to(net_->device());
  } else {
    ARCH_ASSIGN_OR_RETURN(x, receive({batch.n, seq_len / opt_.seq_parts, opt_.dim}, opt_.prev_codec, opt_.prev_rank, kTagEval, nullptr,
                                     nullptr, "evaluation activation"));
    x = x.to(net_->device(), opt_.dtype);
  }
  torch::Tensor h = net_->stageForward(x);
  if (opt_.stage + 1 < opt_.stages) {
    sender_->push(outbound(h), opt_.next_codec, opt_.next_rank, kTagEval);
    return sender_->drain();
  }
  auto out = net_->headLoss(h, idRows(batch.target, 0, batch.n, seq_len).to(net_->device()));
  ce_sum += out.ce_sum.item<double>();
  tokens += static_cast<double>(out.tokens);
  return core::okStatus();
}

}  // namespace archipelago::runtime::parallel
