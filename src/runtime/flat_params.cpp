#include "archipelago/runtime/flat_params.h"

#include <cmath>

namespace archipelago::runtime {

FlatParams FlatParams::bind(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                            torch::ScalarType compute) {
  FlatParams f;
  int64_t total = 0;
  for (const auto& [name, p] : named) total += p.numel();
  const torch::Device device = named.empty() ? torch::Device(torch::kCPU) : named.front().second.device();
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(device);
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
    ParamSegment s;
    s.name = name;
    s.offset = off;
    s.numel = p.numel();
    s.shape = p.sizes().vec();
    // Norm gains (1-D) are not decayed; matrices (embeddings, projections) are.
    s.decay = p.dim() >= 2;
    f.params_.narrow(0, off, s.numel).view(p.sizes()).copy_(p.detach().to(torch::kFloat32));
    auto pview = f.computeParams().narrow(0, off, s.numel).view(p.sizes());
    auto param = p;
    param.set_data(pview);
    param.mutable_grad() = f.computeGrads().narrow(0, off, s.numel).view(p.sizes());
    if (s.decay) f.decay_mask_.narrow(0, off, s.numel).fill_(1.0f);
    s.param = param;
    f.segments_.push_back(std::move(s));
    off += p.numel();
  }
  f.syncCompute();
  return f;
}

void FlatParams::syncCompute() {
  if (!mixed()) return;
  torch::NoGradGuard no_grad;
  compute_params_.copy_(params_);
}

void FlatParams::upcastGrads(int64_t begin, int64_t end) {
  if (!mixed() || end <= begin) return;
  torch::NoGradGuard no_grad;
  grads_.narrow(0, begin, end - begin).copy_(compute_grads_.narrow(0, begin, end - begin));
}

FlatAdamW::FlatAdamW(const core::TrainConfig& cfg, int64_t begin, int64_t end, torch::Device device)
    : sgd_(cfg.optimizer == "sgd"), beta1_(cfg.beta1), beta2_(cfg.beta2), eps_(cfg.adam_eps), wd_(cfg.weight_decay), begin_(begin), end_(end) {
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  m_ = torch::zeros({end - begin}, opts);
  v_ = torch::zeros({end - begin}, opts);
}

void FlatAdamW::step(torch::Tensor params, const torch::Tensor& grads, const torch::Tensor& decay_mask, double lr) {
  torch::NoGradGuard no_grad;
  ++t_;
  // The same arithmetic as `params * mask` and `v.sqrt() / c + eps`, written
  // into one scratch buffer kept across steps: fresh temporaries of the
  // parameters' size each step fragmented the heap (it grew by one of them
  // every step or two, and every new page faulted; docs/runtime.md "Host
  // memory").
  if (scratch_.numel() != params.numel()) scratch_ = torch::empty_like(params);
  // p <- p - lr * wd * p (decoupled decay, only where the mask is 1)
  if (wd_ > 0) {
    at::mul_out(scratch_, params, decay_mask);
    params.sub_(scratch_, lr * wd_);
  }
  if (sgd_) {
    params.sub_(grads, lr);
    return;
  }
  m_.mul_(beta1_).add_(grads, 1.0 - beta1_);
  v_.mul_(beta2_).addcmul_(grads, grads, 1.0 - beta2_);
  const double bc1 = 1.0 - std::pow(beta1_, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(t_));
  at::sqrt_out(scratch_, v_);
  scratch_.div_(std::sqrt(bc2)).add_(eps_);
  params.addcdiv_(m_, scratch_, -lr / bc1);
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

}  // namespace archipelago::runtime
