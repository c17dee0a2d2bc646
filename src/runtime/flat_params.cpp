#include "archipelago/runtime/flat_params.h"

#include <algorithm>
#include <cmath>

#include "archipelago/model/torch_compat.h"

namespace archipelago::runtime {

namespace {
ParamSegment segmentOf(const std::string& name, const torch::Tensor& p, int64_t offset) {
  ParamSegment s;
  s.name = name;
  s.offset = offset;
  s.numel = p.numel();
  s.shape = p.sizes().vec();
  // Norm gains (1-D) are not decayed; matrices (embeddings, projections) are.
  s.decay = p.dim() >= 2;
  return s;
}

// The module's parameter becomes `value` (a view of a flat buffer), its gradient `grad`.
torch::Tensor rebind(const torch::Tensor& p, const torch::Tensor& value, const torch::Tensor& grad) {
  auto param = p;
  param.set_data(value.view(p.sizes()));
  param.mutable_grad() = grad.view(p.sizes());
  return param;
}
}  // namespace

FlatParams FlatParams::bind(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                            torch::ScalarType compute) {
  FlatParams f;
  int64_t total = 0;
  for (const auto& [name, p] : named) total += p.numel();
  const torch::Device device = named.empty() ? torch::Device(torch::kCPU) : named.front().second.device();
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  f.numel_ = total;
  f.held_ = {{0, total}};
  f.compute_dtype_ = compute;
  f.params_ = torch::empty({total}, opts);
  f.grads_ = torch::zeros({total}, opts);
  f.decay_mask_ = torch::zeros({total}, opts);
  if (compute != torch::kFloat32) {
    f.compute_params_ = torch::empty({total}, opts.dtype(compute));
    f.compute_grads_ = torch::zeros({total}, opts.dtype(compute));
  }
  int64_t off = 0;
  torch::NoGradGuard no_grad;
  for (const auto& [name, p] : named) {
    ParamSegment s = segmentOf(name, p, off);
    f.params_.narrow(0, off, s.numel).view(p.sizes()).copy_(p.detach().to(torch::kFloat32));
    s.param = rebind(p, f.computeParams().narrow(0, off, s.numel), f.computeGrads().narrow(0, off, s.numel));
    if (s.decay) f.decay_mask_.narrow(0, off, s.numel).fill_(1.0f);
    f.segments_.push_back(std::move(s));
    off += p.numel();
  }
  f.syncCompute();
  return f;
}

FlatParams FlatParams::bindSharded(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                                   torch::ScalarType compute, const ShardLayout& shard) {
  FlatParams f;
  const torch::Device device = named.empty() ? torch::Device(torch::kCPU) : named.front().second.device();
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  int64_t n = 0;
  for (const FlatSlice& s : shard.slices) {
    TORCH_CHECK(s.begin <= s.end && (f.held_.empty() || f.held_.back().end <= s.begin),
                "the slices of the sharded parameters must be ascending and disjoint");
    f.held_.push_back(s);
    n += s.numel();
  }
  f.compute_dtype_ = compute;
  f.unit_offsets_ = shard.unit_offsets;
  f.params_ = torch::empty({n}, opts);
  f.grads_ = torch::zeros({n}, opts);
  f.decay_mask_ = torch::zeros({n}, opts);
  for (size_t u = 0; u + 1 < shard.unit_offsets.size(); ++u) {
    const int64_t len = shard.unit_offsets[u + 1] - shard.unit_offsets[u];
    f.unit_params_.push_back(torch::empty({len}, opts.dtype(compute)));
    f.unit_grads_.push_back(torch::zeros({len}, opts.dtype(compute)));
  }
  int64_t off = 0;
  size_t u = 0;
  torch::NoGradGuard no_grad;
  for (const auto& [name, p] : named) {
    ParamSegment s = segmentOf(name, p, off);
    while (u + 1 < f.unit_offsets_.size() && off >= f.unit_offsets_[u + 1]) ++u;
    TORCH_CHECK(u < f.unit_params_.size() && off + s.numel <= f.unit_offsets_[u + 1], "tensor ", name,
                " crosses a unit boundary of the sharded parameters");
    // The masters of this rank's slices take the initial values.
    for (const FlatSlice& h : f.held_) {
      const int64_t lo = std::max(off, h.begin), hi = std::min(off + s.numel, h.end);
      if (lo >= hi) continue;
      const auto flat = p.detach().reshape({-1}).to(torch::kFloat32);
      f.params_.narrow(0, f.localOf(lo), hi - lo).copy_(flat.narrow(0, lo - off, hi - lo));
      if (s.decay) f.decay_mask_.narrow(0, f.localOf(lo), hi - lo).fill_(1.0f);
    }
    const int64_t at = off - f.unit_offsets_[u];
    s.param = rebind(p, f.unit_params_[u].narrow(0, at, s.numel), f.unit_grads_[u].narrow(0, at, s.numel));
    f.segments_.push_back(std::move(s));
    off += p.numel();
  }
  f.numel_ = off;
  TORCH_CHECK(f.unit_offsets_.empty() || f.unit_offsets_.back() == off, "the units of the sharded parameters cover ",
              f.unit_offsets_.empty() ? 0 : f.unit_offsets_.back(), " of ", off, " elements");
  for (size_t i = 0; i < f.unit_params_.size(); ++i) {
    model::compat::freeStorage(f.unit_params_[i]);
    model::compat::freeStorage(f.unit_grads_[i]);
  }
  return f;
}

torch::Tensor& FlatParams::computeParams() {
  TORCH_CHECK(!sharded(), "sharded parameters have no whole compute buffer");
  return compute_params_.defined() ? compute_params_ : params_;
}

torch::Tensor& FlatParams::computeGrads() {
  TORCH_CHECK(!sharded(), "sharded parameters have no whole gradient buffer");
  return compute_grads_.defined() ? compute_grads_ : grads_;
}

int64_t FlatParams::bytes() const {
  int64_t n = 0;
  for (const torch::Tensor* t : {&params_, &grads_, &decay_mask_, &compute_params_, &compute_grads_}) {
    if (t->defined()) n += t->numel() * static_cast<int64_t>(t->element_size());
  }
  return n;
}

void FlatParams::syncCompute() {
  // Sharded: a unit's compute copy is rounded from the masters when it is gathered.
  if (!compute_params_.defined()) return;
  torch::NoGradGuard no_grad;
  compute_params_.copy_(params_);
}

void FlatParams::upcastGrads(int64_t begin, int64_t end) {
  if (!compute_grads_.defined() || end <= begin) return;
  torch::NoGradGuard no_grad;
  grads_.narrow(0, begin, end - begin).copy_(compute_grads_.narrow(0, begin, end - begin));
}

FlatAdamW::FlatAdamW(const core::TrainConfig& cfg, int64_t numel, torch::Device device)
    : sgd_(cfg.optimizer == "sgd"), beta1_(cfg.beta1), beta2_(cfg.beta2), eps_(cfg.adam_eps), wd_(cfg.weight_decay) {
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  m_ = torch::zeros({numel}, opts);
  v_ = torch::zeros({numel}, opts);
}

int64_t FlatAdamW::bytes() const {
  int64_t n = 0;
  for (const torch::Tensor* t : {&m_, &v_, &scratch_}) {
    if (t->defined()) n += t->numel() * static_cast<int64_t>(t->element_size());
  }
  return n;
}

void FlatAdamW::step(torch::Tensor params, const torch::Tensor& grads, const torch::Tensor& decay_mask, double lr) {
  step(std::vector<Piece>{{std::move(params), grads, decay_mask, 0}}, lr);
}

void FlatAdamW::step(const std::vector<Piece>& pieces, double lr) {
  torch::NoGradGuard no_grad;
  ++t_;
  // The update's temporaries in one scratch buffer kept across steps (the
  // largest piece's size): fresh temporaries of the parameters' size each
  // step fragmented the heap (it grew by one of them every step or two, and
  // every new page faulted; docs/runtime.md "Host memory").
  int64_t most = 0;
  for (const auto& p : pieces) most = std::max(most, p.params.numel());
  if (!pieces.empty() && scratch_.numel() != most) scratch_ = torch::empty({most}, pieces.front().params.options());
  for (const auto& p : pieces) update(p, lr);
}

// The same arithmetic as `params * mask` and `v.sqrt() / c + eps`.
void FlatAdamW::update(const Piece& p, double lr) {
  const int64_t n = p.params.numel();
  torch::Tensor params = p.params;
  torch::Tensor scratch = scratch_.narrow(0, 0, n);
  // p <- p - lr * wd * p (decoupled decay, only where the mask is 1)
  if (wd_ > 0) {
    at::mul_out(scratch, params, p.decay_mask);
    params.sub_(scratch, lr * wd_);
  }
  if (sgd_) {
    params.sub_(p.grads, lr);
    return;
  }
  torch::Tensor m = m_.narrow(0, p.state_offset, n), v = v_.narrow(0, p.state_offset, n);
  m.mul_(beta1_).add_(p.grads, 1.0 - beta1_);
  v.mul_(beta2_).addcmul_(p.grads, p.grads, 1.0 - beta2_);
  const double bc1 = 1.0 - std::pow(beta1_, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(t_));
  at::sqrt_out(scratch, v);
  scratch.div_(std::sqrt(bc2)).add_(eps_);
  params.addcdiv_(m, scratch, -lr / bc1);
}

double learningRate(const core::TrainConfig& cfg, int64_t step) {
  // step is 0-based: the update made after `step` completed micro-batches.
  if (cfg.warmup_steps > 0 && step < cfg.warmup_steps) {
    return cfg.lr * static_cast<double>(step + 1) / static_cast<double>(cfg.warmup_steps);
  }
  const int64_t decay_steps = std::max<int64_t>(1, cfg.steps - cfg.warmup_steps);
  double progress = static_cast<double>(step - cfg.warmup_steps) / static_cast<double>(decay_steps);
  progress = std::min(1.0, std::max(0.0, progress));
  return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + std::cos(M_PI * progress));
}

torch::Tensor sumOfSquaresFp64(const torch::Tensor& t) {
  const int64_t kChunk = t.is_cpu() ? int64_t{1} << 18 : int64_t{1} << 22;  // 2 MB / 32 MB of fp64
  torch::NoGradGuard no_grad;
  const torch::Tensor flat = t.reshape({-1});
  torch::Tensor sum = torch::zeros({}, flat.options().dtype(torch::kFloat64));
  for (int64_t off = 0; off < flat.numel(); off += kChunk) {
    sum += flat.narrow(0, off, std::min(kChunk, flat.numel() - off)).to(torch::kFloat64).square().sum();
  }
  return sum;
}

int64_t FlatParams::localOf(int64_t offset) const {
  int64_t local = 0;
  for (const FlatSlice& h : held_) {
    if (offset >= h.begin && offset <= h.end) return local + offset - h.begin;
    local += h.numel();
  }
  TORCH_CHECK(false, "flat offset ", offset, " is not held by this rank");
}

double gradSumOfSquares(const FlatParams& flat, int64_t lo, int64_t hi, const std::vector<bool>& counted) {
  const torch::Tensor& g = flat.grads();
  if (counted.empty()) return hi > lo ? sumOfSquaresFp64(g.narrow(0, flat.localOf(lo), hi - lo)).item<double>() : 0.0;
  torch::Tensor sq = torch::zeros({}, g.options().dtype(torch::kFloat64));
  const auto& segs = flat.segments();
  for (size_t i = 0; i < segs.size() && i < counted.size(); ++i) {
    const int64_t a = std::max(lo, segs[i].offset), b = std::min(hi, segs[i].offset + segs[i].numel);
    if (counted[i] && a < b) sq += sumOfSquaresFp64(g.narrow(0, flat.localOf(a), b - a));
  }
  return sq.item<double>();
}

}  // namespace archipelago::runtime
