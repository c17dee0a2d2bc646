#include "archipelago/runtime/parallel/micro_batches.h"

#include <algorithm>

#include "archipelago/core/clock.h"
#include "archipelago/core/cpu_time.h"

namespace archipelago::runtime::parallel {

namespace {
torch::Tensor rows(const std::vector<int64_t>& ids, int64_t begin, int64_t n, int64_t seq_len) {
  return torch::from_blob(const_cast<int64_t*>(ids.data()) + begin * seq_len, {n, seq_len}, torch::kInt64);
}
// Token ids on the model's device (no copy on the CPU).
torch::Tensor rowsOn(const model::Transformer& net, const std::vector<int64_t>& ids, int64_t begin, int64_t n,
                     int64_t seq_len) {
  return rows(ids, begin, n, seq_len).to(net->device());
}
}  // namespace

std::vector<std::pair<int64_t, int64_t>> microRanges(int64_t n, int64_t micro_batch, int64_t count) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (n <= 0) return out;
  if (count > 0) {
    for (int64_t i = 0; i < count; ++i) out.push_back({n * i / count, n * (i + 1) / count});
    return out;
  }
  const int64_t mb = micro_batch > 0 ? micro_batch : n;
  for (int64_t off = 0; off < n; off += mb) out.push_back({off, std::min(n, off + mb)});
  return out;
}

int64_t microCount(int64_t n, int64_t micro_batch) {
  if (n <= 0) return 0;
  return micro_batch > 0 ? (n + micro_batch - 1) / micro_batch : 1;
}

core::Status MicroBatchSchedule::forwardBackward(const StepInput& in, StepStats& stats) {
  const data::Batch& batch = *in.batch;
  const int64_t T = in.seq_len;
  const double group_tokens = std::max(1.0, in.group_samples) * static_cast<double>(T);
  const auto micro = microRanges(batch.n, micro_batch_, agreed_count_);
  const auto c0 = core::Clock::now();
  const double cpu0 = core::threadCpuSeconds();
  stats.sched_begin_us = core::wallMicros();
  {
    ScopedSpan span(in.trace, TraceRecorder::kCompute, "forward+backward");
    if (micro.empty() && on_final_) on_final_();  // nothing to compute: reductions still take part
    if (passes_) passes_->beginPass(true);
    for (int64_t i = static_cast<int64_t>(micro.size()); passes_ && i < in.passes; ++i) {
      passes_->idleForward(true);
      passes_->idleBackward();
    }
    for (size_t i = 0; i < micro.size(); ++i) {
      const auto [b, e] = micro[i];
      const int64_t n = e - b;
      auto out = net_->lossAndStats(rowsOn(net_, batch.input, b, n, T), rowsOn(net_, batch.target, b, n, T));
      auto loss = out.ce_sum / group_tokens;
      if (out.aux_loss.defined()) {
        loss = loss + out.aux_loss * (static_cast<double>(n) / std::max(1.0, in.group_samples));
        stats.aux_sum += out.aux_loss.item<double>() * static_cast<double>(n);
      }
      if (i + 1 == micro.size() && on_final_) on_final_();
      if (in.loss_scale != 1) loss = loss * in.loss_scale;
      loss.backward();
      if (passes_) passes_->endBackward();
      stats.ce_sum += out.ce_sum.item<double>();
      stats.tokens += out.tokens;
    }
  }
  stats.micro_batches = static_cast<int64_t>(micro.size());
  const double compute_s = core::secondsSince(c0);
  stats.compute_cpu_s += core::threadCpuSeconds() - cpu0;
  stats.compute_s += compute_s + slowdown_.stretch(compute_s, in.trace);
  stats.sched_end_us = core::wallMicros();
  return core::okStatus();
}

core::Status MicroBatchSchedule::evaluate(const data::Batch& batch, int64_t seq_len, double& ce_sum, double& tokens) {
  if (passes_) {
    passes_->beginPass(false);
    if (batch.n == 0) passes_->idleForward(false);
  }
  if (batch.n == 0) {
    if (passes_) passes_->endForwardOnly();
    return core::okStatus();
  }
  // Evaluation mode: MoE layers neither count router load (the next step's
  // router-bias update must see training tokens only) nor record stats.
  torch::NoGradGuard ng;
  net_->eval();
  auto out = net_->lossAndStats(rowsOn(net_, batch.input, 0, batch.n, seq_len),
                                rowsOn(net_, batch.target, 0, batch.n, seq_len));
  net_->train();
  if (passes_) passes_->endForwardOnly();
  ce_sum += out.ce_sum.item<double>();
  tokens += static_cast<double>(out.tokens);
  return core::okStatus();
}

}  // namespace archipelago::runtime::parallel
