// Gradient-ready hooks, generation, counts.
#include "archipelago/model/training.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

namespace archipelago::model {

// ---- GradReadyHooks --------------------------------------------------------------

namespace {
class ReadyHook : public torch::autograd::FunctionPostHook {
 public:
  ReadyHook(std::shared_ptr<std::function<void(size_t)>> cb, size_t index) : cb_(std::move(cb)), index_(index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    (*cb_)(index_);
    return outputs;
  }

 private:
  std::shared_ptr<std::function<void(size_t)>> cb_;
  size_t index_;
};
}  // namespace

struct GradReadyHooks::Entry {
  // Holding the accumulator keeps the node (and our hook on it) alive for
  // every backward, as libtorch otherwise recreates it lazily.
  std::shared_ptr<torch::autograd::Node> accumulator;
  uintptr_t key = 0;
};

GradReadyHooks::GradReadyHooks(const std::vector<torch::Tensor>& params, std::function<void(size_t)> on_ready)
    : callback_(std::make_shared<std::function<void(size_t)>>(std::move(on_ready))) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto e = std::make_unique<Entry>();
    if (params[i].requires_grad()) {
      e->accumulator = torch::autograd::impl::grad_accumulator(params[i]);
      e->key = e->accumulator->add_post_hook(std::make_unique<ReadyHook>(callback_, i));
    }
    entries_.push_back(std::move(e));
  }
}

GradReadyHooks::~GradReadyHooks() {
  for (auto& e : entries_) {
    if (e->accumulator) e->accumulator->del_post_hook(e->key);
  }
}

// ---- generation --------------------------------------------------------------------

namespace {
int64_t sampleToken(const torch::Tensor& logits_row, const GenerateOptions& o, std::mt19937_64& rng) {
  auto l = logits_row.to(torch::kCPU, torch::kDouble).contiguous();
  const double* p = l.data_ptr<double>();
  const int64_t v = l.numel();
  if (o.temperature <= 0) return static_cast<int64_t>(std::max_element(p, p + v) - p);
  std::vector<double> x(p, p + v);
  for (double& xi : x) xi /= o.temperature;
  double threshold = -std::numeric_limits<double>::infinity();
  if (o.top_k > 0 && o.top_k < v) {
    std::vector<double> sorted = x;
    std::nth_element(sorted.begin(), sorted.begin() + (o.top_k - 1), sorted.end(), std::greater<double>());
    threshold = sorted[static_cast<size_t>(o.top_k - 1)];
  }
  double mx = *std::max_element(x.begin(), x.end());
  double sum = 0;
  for (double& xi : x) {
    xi = xi >= threshold ? std::exp(xi - mx) : 0.0;
    sum += xi;
  }
  // 53 random bits -> uniform in [0, 1): the same on every standard library.
  double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * sum;
  double acc = 0;
  int64_t last_nonzero = 0;
  for (int64_t i = 0; i < v; ++i) {
    if (x[static_cast<size_t>(i)] <= 0) continue;
    acc += x[static_cast<size_t>(i)];
    last_nonzero = i;
    if (u < acc) return i;
  }
  return last_nonzero;
}
}  // namespace

std::vector<int64_t> generate(Transformer& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& options) {
  std::vector<int64_t> out;
  if (prompt.empty() || options.max_new_tokens <= 0) return out;
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const int64_t max_len = model->config().max_seq_len;
  const torch::Device device = model->device();
  std::mt19937_64 rng(options.seed);
  std::vector<int64_t> ctx = prompt;
  KvCache cache = model->makeCache();
  auto ids = [&](std::vector<int64_t>::const_iterator b, std::vector<int64_t>::const_iterator e) {
    std::vector<int64_t> v(b, e);
    return torch::tensor(v, torch::kLong).view({1, -1}).to(device);
  };
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    torch::Tensor logits;
    const int64_t window = std::min<int64_t>(static_cast<int64_t>(ctx.size()), max_len);
    if (options.use_kv_cache && cache.length() > 0 && cache.length() < max_len) {
      logits = model->forward(ids(ctx.end() - 1, ctx.end()), &cache);
    } else {
      // First step, no cache, or the window is full: (re)compute the last
      // max_seq_len tokens from position 0.
      cache = model->makeCache();
      logits = model->forward(ids(ctx.end() - window, ctx.end()), options.use_kv_cache ? &cache : nullptr);
    }
    int64_t next = sampleToken(logits[0][logits.size(1) - 1], options, rng);
    out.push_back(next);
    ctx.push_back(next);
    if (next == options.stop_token) break;
  }
  if (was_training) model->train();
  return out;
}

// ---- counts --------------------------------------------------------------------------

ParamCounts countParameters(const core::ModelConfig& c) {
  const int64_t d = c.dim, hd = c.dim / c.n_heads;
  const int64_t attn = d * c.n_heads * hd + 2 * d * c.n_kv_heads * hd + c.n_heads * hd * d;
  ParamCounts n;
  n.embedding = c.vocab_size * d * (c.tie_embeddings ? 1 : 2);
  n.total = n.embedding + d;  // + final norm
  n.active = n.total;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    int64_t common = attn + 2 * d;
    n.total += common;
    n.active += common;
    if (isMoeLayer(c, i)) {
      const int64_t eh = c.moe.expert_hidden, e = c.moe.num_experts;
      const int64_t expert = 3 * d * eh;
      const int64_t shared = c.moe.shared_expert ? expert : 0;
      n.total += e * d + e * expert + shared;
      n.active += e * d + c.moe.top_k * expert + shared;
    } else {
      n.total += 3 * d * c.ffn_hidden;
      n.active += 3 * d * c.ffn_hidden;
    }
  }
  return n;
}

FlopCounts flopsPerToken(const core::ModelConfig& c, int64_t seq_len) {
  const double d = static_cast<double>(c.dim), hd = static_cast<double>(c.dim / c.n_heads);
  const double h = static_cast<double>(c.n_heads), kv = static_cast<double>(c.n_kv_heads);
  double fwd = 0;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    fwd += 2.0 * (d * h * hd + 2.0 * d * kv * hd + h * hd * d);  // q, k, v, o projections
    fwd += 2.0 * 2.0 * h * hd * static_cast<double>(seq_len);    // scores and weighted values
    if (isMoeLayer(c, i)) {
      const double expert = 3.0 * d * static_cast<double>(c.moe.expert_hidden);
      fwd += 2.0 * d * static_cast<double>(c.moe.num_experts);  // router
      fwd += 2.0 * static_cast<double>(c.moe.top_k) * expert;
      if (c.moe.shared_expert) fwd += 2.0 * expert;
    } else {
      fwd += 2.0 * 3.0 * d * static_cast<double>(c.ffn_hidden);
    }
  }
  fwd += 2.0 * d * static_cast<double>(c.vocab_size);  // LM head
  return {fwd, 2.0 * fwd};
}

}  // namespace archipelago::model
