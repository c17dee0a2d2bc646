#include "archipelago/runtime/parallel/gradient_bucketer.h"

#include <algorithm>

#include "archipelago/model/training.h"

namespace archipelago::runtime::parallel {

GradientBucketer::GradientBucketer(FlatParams& flat, DpComm* dp, int64_t bucket_bytes, bool overlap, int seg_begin,
                                   int seg_end, torch::ScalarType reduce_dtype)
    : flat_(flat), comm_(dp), seg_begin_(seg_begin), reduce_dtype_(reduce_dtype) {
  const auto& segs = flat.segments();
  if (seg_end < 0) seg_end = static_cast<int>(segs.size());
  if (seg_end <= seg_begin) return;
  const int64_t cap = std::max<int64_t>(1, bucket_bytes / 4);
  const auto& last = segs[static_cast<size_t>(seg_end) - 1];
  Bucket cur;
  cur.end = last.offset + last.numel;
  for (int i = seg_end - 1; i >= seg_begin; --i) {
    cur.segments.push_back(i);
    cur.begin = segs[static_cast<size_t>(i)].offset;
    if (cur.end - cur.begin >= cap || i == seg_begin) {
      buckets_.push_back(std::move(cur));
      cur = Bucket{};
      cur.end = segs[static_cast<size_t>(i)].offset;
    }
  }
  seg_bucket_.assign(static_cast<size_t>(seg_end - seg_begin), 0);
  for (size_t b = 0; b < buckets_.size(); ++b) {
    for (int s : buckets_[b].segments) seg_bucket_[static_cast<size_t>(s - seg_begin)] = static_cast<int>(b);
  }
  if (!overlap) return;  // nothing to overlap with
  std::vector<torch::Tensor> params;
  for (int i = seg_begin; i < seg_end; ++i) params.push_back(segs[static_cast<size_t>(i)].param);
  hooks_ = std::make_unique<model::GradReadyHooks>(params, [this](size_t i) { onGradReady(i); });
}

GradientBucketer::~GradientBucketer() = default;

std::vector<GradientBucketer::Range> GradientBucketer::buckets() const {
  std::vector<Range> out;
  for (const auto& b : buckets_) out.push_back({b.begin, b.end});
  return out;
}

void GradientBucketer::setDp(DpComm* dp) {
  std::lock_guard<std::mutex> lock(mu_);
  comm_.bind(dp);
}

void GradientBucketer::setBackend(IslandBackend* backend) {
  std::lock_guard<std::mutex> lock(mu_);
  native_ = backend;
}

void GradientBucketer::arm() {
  if (!hooks_) return;
  std::lock_guard<std::mutex> lock(mu_);
  armed_ = true;
  next_launch_ = 0;
  for (auto& b : buckets_) {
    b.ready = 0;
    b.op.reset();
  }
}

core::Status GradientBucketer::finish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!armed_) next_launch_ = 0;  // nothing launched from hooks this step
    armed_ = false;
    while (next_launch_ < buckets_.size()) launch(next_launch_++);
  }
  core::Status first;
  for (auto& b : buckets_) {
    if (b.op) {
      core::Status st = b.op->wait();
      if (!st.isOk() && first.isOk()) first = st;
      b.op.reset();
    }
    land(b);
  }
  return first;
}

void GradientBucketer::land(Bucket& b) {
  torch::NoGradGuard no_grad;
  if (b.staged) {
    flat_.grads().narrow(0, b.begin, b.end - b.begin).copy_(b.staging);
    b.staged = false;
  } else {
    flat_.upcastGrads(b.begin, b.end);
  }
}

void GradientBucketer::onGradReady(size_t seg) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!armed_) return;
  auto& b = buckets_[static_cast<size_t>(seg_bucket_[seg])];
  ++b.ready;
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].ready >= buckets_[next_launch_].segments.size()) {
    launch(next_launch_++);
  }
}

torch::Tensor GradientBucketer::wireOf(Bucket& b, const torch::TensorOptions& options) {
  torch::Tensor wire = flat_.computeGrads().narrow(0, b.begin, b.end - b.begin);
  if (wire.device() == options.device() && wire.scalar_type() == reduce_dtype_) return wire;
  torch::NoGradGuard no_grad;
  if (!b.staging.defined() || b.staging.device() != options.device()) {
    b.staging = torch::empty({b.end - b.begin}, options.dtype(reduce_dtype_));
  }
  b.staging.copy_(wire);
  b.staged = true;
  return b.staging;
}

void GradientBucketer::launch(size_t b) {
  DpComm* dp = comm_.dp();
  if (!dp) return;  // nobody else holds these tensors
  auto& bk = buckets_[b];
  IslandBackend& backend = native_ ? *native_ : comm_;
  torch::Tensor wire = wireOf(bk, backend.wireOptions(flat_.device(), reduce_dtype_));
  bk.op = sharded() ? backend.reduceScatterSum(wire, sliceCounts(bk)) : backend.allreduceSum(wire);
}

std::pair<int64_t, int64_t> GradientBucketer::ownSlice() const {
  const auto r = static_cast<size_t>(comm_.dp()->rank());
  return {shards_[r], shards_[r + 1]};
}

std::vector<size_t> GradientBucketer::sliceCounts(const Bucket& b) const {
  // The slices are contiguous and ascending, so their pieces of the bucket
  // are consecutive blocks in rank order, as the reduce-scatter wants them.
  std::vector<size_t> counts;
  for (size_t r = 0; r + 1 < shards_.size(); ++r) {
    const int64_t lo = std::max(b.begin, shards_[r]), hi = std::min(b.end, shards_[r + 1]);
    counts.push_back(static_cast<size_t>(std::max<int64_t>(0, hi - lo)));
  }
  return counts;
}

}  // namespace archipelago::runtime::parallel
