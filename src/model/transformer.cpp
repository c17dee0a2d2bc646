// Config resolution, layers and the decoder (the MoE FFN is moe.cpp and
// expert_parallel.cpp). Few translation units on purpose: torch headers are
// expensive to compile (the layer shares a precompiled header).
#include "archipelago/model/transformer.h"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "archipelago/core/hash.h"
#include "archipelago/model/device.h"
#include "archipelago/model/fp8.h"
#include "archipelago/model/torch_compat.h"

namespace archipelago::model {

// ---- config -----------------------------------------------------------------

core::Result<core::ModelConfig> resolveModelConfig(const core::ModelConfig& config) {
  core::ModelConfig c = config;
  std::vector<std::string> errors;
  auto need = [&](bool ok, const std::string& what) {
    if (!ok) errors.push_back(what);
  };
  need(c.vocab_size > 0, "model.vocab_size: " + std::to_string(c.vocab_size) +
                             "; expected > 0 (set it, or let the data manifest provide it)");
  need(c.dim > 0, "model.dim: " + std::to_string(c.dim) + "; expected > 0");
  need(c.n_layers > 0, "model.n_layers: " + std::to_string(c.n_layers) + "; expected > 0");
  need(c.n_heads > 0, "model.n_heads: " + std::to_string(c.n_heads) + "; expected > 0");
  if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;
  if (c.dim > 0 && c.n_heads > 0) {
    need(c.dim % c.n_heads == 0, "model.n_heads: " + std::to_string(c.n_heads) +
                                     " does not divide model.dim " + std::to_string(c.dim));
    need((c.dim / c.n_heads) % 2 == 0, "model.dim / model.n_heads = " +
                                           std::to_string(c.dim / c.n_heads) +
                                           " (head dimension); expected an even number (rotary pairs)");
  }
  need(c.n_kv_heads > 0 && c.n_heads > 0 && c.n_heads % c.n_kv_heads == 0,
       "model.n_kv_heads: " + std::to_string(c.n_kv_heads) + "; expected a divisor of model.n_heads " +
           std::to_string(c.n_heads));
  if (c.ffn_hidden == 0 && c.dim > 0) c.ffn_hidden = ((8 * c.dim / 3 + 31) / 32) * 32;
  need(c.ffn_hidden > 0, "model.ffn_hidden: " + std::to_string(c.ffn_hidden) + "; expected > 0");
  need(c.max_seq_len > 0, "model.max_seq_len: " + std::to_string(c.max_seq_len) + "; expected > 0");
  need(c.rope_theta > 0, "model.rope_theta: " + std::to_string(c.rope_theta) + "; expected > 0");
  need(c.norm_eps > 0, "model.norm_eps: " + std::to_string(c.norm_eps) + "; expected > 0");
  need(c.init_std > 0, "model.init_std: " + std::to_string(c.init_std) + "; expected > 0");
  need(computeScalarType(c.dtype).isOk(),
       "model.dtype: '" + c.dtype + "'; expected fp32, bf16, fp16 or fp8 (fp8 linears, bf16 elsewhere)");
  core::MoeConfig& m = c.moe;
  need(m.num_experts >= 0, "model.moe.num_experts: " + std::to_string(m.num_experts) + "; expected >= 0");
  if (m.num_experts > 0) {
    need(m.top_k >= 1 && m.top_k <= m.num_experts,
         "model.moe.top_k: " + std::to_string(m.top_k) + "; expected 1.." + std::to_string(m.num_experts));
    if (m.expert_hidden == 0) m.expert_hidden = c.ffn_hidden;
    need(m.expert_hidden > 0, "model.moe.expert_hidden: " + std::to_string(m.expert_hidden) + "; expected > 0");
    need(m.every >= 1, "model.moe.every: " + std::to_string(m.every) + "; expected >= 1");
    need(m.balance == "aux_loss" || m.balance == "router_bias" || m.balance == "none",
         "model.moe.balance: '" + m.balance + "'; expected aux_loss, router_bias or none");
    need(m.aux_loss_coef >= 0, "model.moe.aux_loss_coef: " + std::to_string(m.aux_loss_coef) + "; expected >= 0");
    need(m.router_bias_rate >= 0,
         "model.moe.router_bias_rate: " + std::to_string(m.router_bias_rate) + "; expected >= 0");
    need(m.capacity_factor >= 0,
         "model.moe.capacity_factor: " + std::to_string(m.capacity_factor) + "; expected >= 0 (0 = unlimited)");
  }
  if (!errors.empty()) {
    std::string msg;
    for (size_t i = 0; i < errors.size(); ++i) msg += (i ? "\n" : "") + errors[i];
    return core::invalidArgument(msg);
  }
  return c;
}

bool isMoeLayer(const core::ModelConfig& c, int64_t layer) {
  return c.moe.num_experts > 0 && c.moe.every >= 1 && (layer + 1) % c.moe.every == 0;
}

core::Result<torch::ScalarType> parseDtype(const std::string& name) {
  if (name == "fp32" || name == "float32") return torch::kFloat32;
  if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
  if (name == "fp16" || name == "float16") return torch::kFloat16;
  return core::invalidArgument("dtype '" + name + "': expected fp32, bf16 or fp16");
}

void setComputeThreads(int64_t threads) {
  if (threads <= 0) return;
  at::set_num_threads(static_cast<int>(threads));
  // libtorch's setting does not reach OpenBLAS's own pthread pool (Debian's
  // libopenblas0-pthread), which starts one thread per core and, between
  // calls, spins on sched_yield: with several workers on one host that is
  // workers x cores busy threads, each stealing the cores the others
  // compute on (measured: 17,000 sched_yield/s per worker, a third of the
  // machine's time in the kernel). Bound it to the same budget when the
  // process has OpenBLAS loaded; looked up at run time so other BLAS
  // builds (MKL, a CUDA libtorch) need nothing.
  using SetThreads = void (*)(int);
  if (auto* set = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
    set(static_cast<int>(threads));
  }
  try {
    at::set_num_interop_threads(static_cast<int>(threads));
  } catch (const c10::Error&) {
    // Already fixed by earlier parallel work; intra-op threads are what count.
  }
}

torch::Tensor deterministicNormal(torch::IntArrayRef shape, double std, uint64_t seed,
                                  const std::string& name) {
  uint64_t s = core::mix64(seed ^ core::mix64(core::fnv1a64(name)));
  at::Generator gen = at::detail::createCPUGenerator(s);
  torch::NoGradGuard no_grad;
  return torch::empty(shape, torch::TensorOptions().dtype(torch::kFloat32)).normal_(0.0, std, gen);
}

// ---- layers -----------------------------------------------------------------

LinearNoBiasImpl::LinearNoBiasImpl(int64_t in, int64_t out) {
  weight = register_parameter("weight", torch::zeros({out, in}));
}
torch::Tensor LinearNoBiasImpl::forward(const torch::Tensor& x) {
  // FP8 compute is a child module that setFp8 attaches (model/fp8.h), so
  // this class, whose header nearly everything includes, did not change.
  if (Fp8LinearImpl* fp8 = fp8Of(*this)) return fp8->forward(x, weight);
  return torch::linear(x, weight);
}

EmbeddingImpl::EmbeddingImpl(int64_t vocab, int64_t dim, int64_t vocab_begin_) : vocab_begin(vocab_begin_) {
  weight = register_parameter("weight", torch::zeros({vocab, dim}));
}
torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) {
  TORCH_CHECK(ids.scalar_type() == torch::kLong, "token ids must be int64");
  if (!tp) return torch::embedding(weight, ids);
  const torch::Tensor local = ids - vocab_begin;
  const torch::Tensor other = (local < 0).logical_or(local >= weight.size(0));
  const torch::Tensor e = torch::embedding(weight, local.masked_fill(other, 0)).masked_fill(other.unsqueeze(-1), 0);
  return tp.leave(e);
}

RmsNormImpl::RmsNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}));
}
torch::Tensor RmsNormImpl::forward(const torch::Tensor& x) {
  auto compute = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto xf = x.to(compute);
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * y.to(x.scalar_type());
}

RotaryTables rotaryTables(int64_t start, int64_t length, int64_t head_dim, double theta,
                          torch::Device device, torch::ScalarType dtype) {
  // Built in double so fp64 reference checks see exact tables; cast once.
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto i = torch::arange(0, head_dim, 2, opts);
  auto inv_freq = torch::pow(theta, -i / static_cast<double>(head_dim));
  auto pos = torch::arange(start, start + length, opts);
  auto freqs = torch::outer(pos, inv_freq);
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(device, dtype), emb.sin().to(device, dtype)};
}

torch::Tensor applyRotary(const torch::Tensor& x, const RotaryTables& rope) {
  int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half);
  auto x2 = x.narrow(-1, half, half);
  auto rotated = torch::cat({-x2, x1}, -1);
  auto c = rope.cos.to(x.scalar_type());
  auto s = rope.sin.to(x.scalar_type());
  return x * c + rotated * s;
}

torch::Tensor causalAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, int64_t q_start) {
  int64_t tq = q.size(2), tk = k.size(2);
  if (q_start == 0 && tq == tk) {
    if (auto fused = compat::fusedCausalAttention(q, k, v); fused.defined()) return fused;
  }
  double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;
  auto compute = q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  scores = scores.to(compute);
  auto iopts = torch::TensorOptions().dtype(torch::kLong).device(q.device());
  auto qpos = torch::arange(q_start, q_start + tq, iopts).unsqueeze(1);
  auto kpos = torch::arange(0, tk, iopts).unsqueeze(0);
  scores = scores.masked_fill(kpos > qpos, -std::numeric_limits<double>::infinity());
  auto p = torch::softmax(scores, -1).to(v.scalar_type());
  return torch::matmul(p, v);
}

AttentionImpl::AttentionImpl(const core::ModelConfig& c, TensorParallelRank tp_rank)
    : n_heads(c.n_heads / tp_rank.size), n_kv_heads(c.n_kv_heads / tp_rank.size), head_dim(c.dim / c.n_heads) {
  q_proj = register_module("q_proj", LinearNoBias(c.dim, n_heads * head_dim));
  k_proj = register_module("k_proj", LinearNoBias(c.dim, n_kv_heads * head_dim));
  v_proj = register_module("v_proj", LinearNoBias(c.dim, n_kv_heads * head_dim));
  o_proj = register_module("o_proj", LinearNoBias(n_heads * head_dim, c.dim));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& input, const RotaryTables& rope,
                                     LayerKvCache* cache) {
  const torch::Tensor x = tp.enter(input);
  int64_t b = x.size(0), t = x.size(1);
  auto q = q_proj(x).view({b, t, n_heads, head_dim}).transpose(1, 2);
  auto k = k_proj(x).view({b, t, n_kv_heads, head_dim}).transpose(1, 2);
  auto v = v_proj(x).view({b, t, n_kv_heads, head_dim}).transpose(1, 2);
  q = applyRotary(q, rope);
  k = applyRotary(k, rope);
  int64_t start = 0;
  if (cache != nullptr) {
    if (cache->k.defined()) {
      start = cache->k.size(2);
      k = torch::cat({cache->k, k}, 2);
      v = torch::cat({cache->v, v}, 2);
    }
    cache->k = k.detach();
    cache->v = v.detach();
  }
  if (n_kv_heads < n_heads) {
    int64_t rep = n_heads / n_kv_heads;
    k = k.repeat_interleave(rep, 1);
    v = v.repeat_interleave(rep, 1);
  }
  auto out = causalAttention(q, k, v, start);
  out = out.transpose(1, 2).reshape({b, t, n_heads * head_dim});
  return tp.leave(o_proj(out));
}

SwiGluImpl::SwiGluImpl(int64_t dim, int64_t hidden, bool mixtral_names) {
  if (mixtral_names) {
    gate = register_module("w1", LinearNoBias(dim, hidden));
    down = register_module("w2", LinearNoBias(hidden, dim));
    up = register_module("w3", LinearNoBias(dim, hidden));
  } else {
    gate = register_module("gate_proj", LinearNoBias(dim, hidden));
    up = register_module("up_proj", LinearNoBias(dim, hidden));
    down = register_module("down_proj", LinearNoBias(hidden, dim));
  }
}
torch::Tensor SwiGluImpl::forward(const torch::Tensor& input) {
  const torch::Tensor x = tp.enter(input);
  return tp.leave(down(torch::silu(gate(x)) * up(x)));
}

// ---- decoder ------------------------------------------------------------------

DecoderLayerImpl::DecoderLayerImpl(const core::ModelConfig& c, int64_t layer, int64_t expert_begin,
                                   int64_t expert_end, TensorParallelRank tp) {
  input_layernorm = register_module("input_layernorm", RmsNorm(c.dim, c.norm_eps));
  self_attn = register_module("self_attn", Attention(c, tp));
  post_attention_layernorm = register_module("post_attention_layernorm", RmsNorm(c.dim, c.norm_eps));
  if (isMoeLayer(c, layer)) {
    block_sparse_moe = register_module("block_sparse_moe", MoeFfn(c, layer, expert_begin, expert_end));
  } else {
    const auto [h0, h1] = splitRange(c.ffn_hidden, tp.size, tp.rank);
    mlp = register_module("mlp", SwiGlu(c.dim, h1 - h0));
  }
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const RotaryTables& rope,
                                        LayerKvCache* cache) {
  auto h = x + self_attn(input_layernorm(x), rope, cache);
  auto n = post_attention_layernorm(h);
  return h + (mlp.is_empty() ? block_sparse_moe(n) : mlp(n));
}

DecoderStackImpl::DecoderStackImpl(const core::ModelConfig& c, const ModelShard& shard) {
  const int64_t begin = shard.layer_begin;
  const int64_t end = shard.layer_end < 0 ? c.n_layers : shard.layer_end;
  TORCH_CHECK(begin >= 0 && begin < end && end <= c.n_layers, "layer range [", begin, ", ", end,
              ") is not inside [0, ", c.n_layers, ")");
  if (begin == 0) {
    const auto [v0, v1] = splitRange(c.vocab_size, shard.tp.size, shard.tp.rank);
    embed_tokens = register_module("embed_tokens", Embedding(v1 - v0, c.dim, v0));
  }
  if (begin == 0 && end == c.n_layers) {
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.n_layers; ++i) {
      layers->push_back(DecoderLayer(c, i, shard.expert_begin, shard.expert_end, shard.tp));
    }
  } else {
    // A pipeline stage: layers keep their global index in their names.
    layers = torch::nn::ModuleList();
    auto holder = register_module("layers", std::make_shared<torch::nn::Module>());
    for (int64_t i = begin; i < end; ++i) {
      DecoderLayer l(c, i, shard.expert_begin, shard.expert_end, shard.tp);
      holder->register_module(std::to_string(i), l);
      layers->push_back(l);
    }
  }
  if (end == c.n_layers) norm = register_module("norm", RmsNorm(c.dim, c.norm_eps));
}

namespace {
bool endsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

TransformerImpl::TransformerImpl(const core::ModelConfig& config, uint64_t seed)
    : TransformerImpl(config, seed, ModelShard{}) {}

TransformerImpl::TransformerImpl(const core::ModelConfig& config, uint64_t seed, const ModelShard& shard)
    : config_(config), shard_(shard) {
  if (shard_.layer_end < 0) shard_.layer_end = config.n_layers;
  if (shard_.expert_end < 0) shard_.expert_end = config.moe.num_experts;
  TORCH_CHECK(!(config.tie_embeddings && (shard_.layer_begin > 0 || shard_.layer_end < config.n_layers)),
              "model.tie_embeddings needs the embedding and the LM head on one worker (no pipeline split)");
  model = register_module("model", DecoderStack(config, shard_));
  TORCH_CHECK(shard_.tp.size >= 1 && shard_.tp.rank >= 0 && shard_.tp.rank < shard_.tp.size, "tensor-parallel rank ",
              shard_.tp.rank, " of ", shard_.tp.size);
  if (!config.tie_embeddings && holdsHead()) {
    const auto [v0, v1] = splitRange(config.vocab_size, shard_.tp.size, shard_.tp.rank);
    lm_head = register_module("lm_head", LinearNoBias(config.dim, v1 - v0));
  }
  initParameters(seed);
}

void TransformerImpl::initParameters(uint64_t seed) {
  const core::ModelConfig& config = config_;
  // Residual-branch outputs get std / sqrt(2 L) (GPT-2 / Megatron scaled init)
  // so the residual stream's variance does not grow with depth.
  torch::NoGradGuard no_grad;
  double out_std = config.init_std / std::sqrt(2.0 * static_cast<double>(config.n_layers));
  for (auto& item : named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    torch::Tensor& p = item.value();
    if (endsWith(name, "layernorm.weight") || name == "model.norm.weight") {
      p.fill_(1.0);
    } else {
      bool out_proj = endsWith(name, "o_proj.weight") || endsWith(name, "down_proj.weight") ||
                      endsWith(name, ".w2.weight");
      // A tensor-parallel slice is cut from the seeded whole tensor.
      const TensorSlice slice = tensorSlice(config, name, shard_.tp);
      std::vector<int64_t> full = p.sizes().vec();
      if (slice.sliced()) full[static_cast<size_t>(slice.dim)] = slice.full;
      p.copy_(sliceOf(deterministicNormal(full, out_proj ? out_std : config.init_std, seed, name), slice));
    }
  }
}

torch::Device TransformerImpl::device() const {
  auto params = parameters(true);
  return params.empty() ? torch::Device(torch::kCPU) : params.front().device();
}

torch::Tensor TransformerImpl::hidden(const torch::Tensor& input_ids, KvCache* cache) {
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be [batch, time], got ", input_ids.sizes());
  TORCH_CHECK(holdsEmbedding() && holdsHead(), "this model holds layers [", shard_.layer_begin, ", ",
              shard_.layer_end, ") only (a pipeline stage): use stageForward");
  int64_t start = cache != nullptr ? cache->length() : 0;
  int64_t t = input_ids.size(1);
  TORCH_CHECK(start + t <= config_.max_seq_len, "sequence of ", start + t,
              " positions exceeds model.max_seq_len ", config_.max_seq_len);
  if (cache != nullptr && cache->layers.size() != static_cast<size_t>(config_.n_layers)) {
    cache->layers.assign(static_cast<size_t>(config_.n_layers), LayerKvCache{});
  }
  auto x = model->embed_tokens(input_ids);
  auto table_dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  RotaryTables rope = rotaryTables(start, t, headDim(config_), config_.rope_theta, x.device(), table_dtype);
  for (size_t i = 0; i < model->layers->size(); ++i) x = layerForward(i, x, rope, cache ? &cache->layers[i] : nullptr);
  return model->norm(x);
}

torch::Tensor TransformerImpl::layerForward(size_t i, const torch::Tensor& x, const RotaryTables& rope,
                                            LayerKvCache* cache) {
  if (layer_hooks_ == nullptr) return model->layers[i]->as<DecoderLayerImpl>()->forward(x, rope, cache);
  layer_hooks_->before(i);
  return layer_hooks_->after(i, model->layers[i]->as<DecoderLayerImpl>()->forward(x, rope, cache));
}

torch::Tensor TransformerImpl::logitsOf(const torch::Tensor& h) {
  const torch::Tensor x = tp_.enter(h);
  return lm_head.is_empty() ? torch::linear(x, model->embed_tokens->weight) : lm_head(x);
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& input_ids, KvCache* cache) {
  TORCH_CHECK(shard_.tp.size == 1, "forward: the logits of a tensor-parallel shard are a vocab slice; use lossAndStats");
  return logitsOf(hidden(input_ids, cache));
}

LossOutput TransformerImpl::lossAndStats(const torch::Tensor& input_ids, const torch::Tensor& target) {
  TORCH_CHECK(target.sizes() == input_ids.sizes(), "target ", target.sizes(), " must match input ",
              input_ids.sizes());
  return headLoss(hidden(input_ids), target);
}

torch::Tensor TransformerImpl::stageForward(const torch::Tensor& input) {
  torch::Tensor x;
  if (holdsEmbedding()) {
    TORCH_CHECK(input.dim() == 2, "the first stage takes input_ids [batch, time], got ", input.sizes());
    x = model->embed_tokens(input);
  } else {
    TORCH_CHECK(input.dim() == 3 && input.size(2) == config_.dim, "stage input must be [batch, time, ", config_.dim,
                "], got ", input.sizes());
    x = input;
  }
  // Sequence parallelism: x is this rank's block; attention sees the whole sequence.
  const int64_t t = holdsEmbedding() ? input.size(1) : x.size(1) * (tp_.sequence ? shard_.tp.size : 1);
  TORCH_CHECK(t <= config_.max_seq_len, "sequence of ", t, " positions exceeds model.max_seq_len ",
              config_.max_seq_len);
  auto table_dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  RotaryTables rope = rotaryTables(0, t, headDim(config_), config_.rope_theta, x.device(), table_dtype);
  for (size_t i = 0; i < model->layers->size(); ++i) x = layerForward(i, x, rope, nullptr);
  return holdsHead() ? model->norm(x) : x;
}

torch::Tensor TransformerImpl::localAuxLoss() const {
  auto moe = moeLayers();
  int64_t total = 0;
  for (int64_t l = 0; l < config_.n_layers; ++l) total += isMoeLayer(config_, l) ? 1 : 0;
  if (moe.empty() || config_.moe.balance != "aux_loss" || config_.moe.aux_loss_coef <= 0 ||
      !moe[0]->lastAuxLoss().defined()) {
    return torch::zeros({}, torch::kFloat);
  }
  torch::Tensor sum = moe[0]->lastAuxLoss();
  for (size_t i = 1; i < moe.size(); ++i) sum = sum + moe[i]->lastAuxLoss();
  return sum * (config_.moe.aux_loss_coef / static_cast<double>(total));
}

void TransformerImpl::setExpertExchange(std::shared_ptr<ExpertExchange> exchange) {
  for (auto& m : moeLayers()) m->setExchange(exchange);
}

void TransformerImpl::setTensorParallel(std::shared_ptr<TensorParallelComm> comm, bool sequence) {
  TORCH_CHECK(!comm || (comm->size() == shard_.tp.size && comm->rank() == shard_.tp.rank), "tensor-parallel group of ",
              comm ? comm->size() : 0, " (rank ", comm ? comm->rank() : 0, ") for a shard cut for ", shard_.tp.size,
              " (rank ", shard_.tp.rank, ")");
  TORCH_CHECK(comm || shard_.tp.size == 1, "a tensor-parallel shard needs its group");
  const TensorParallelContext ctx{shard_.tp.size == 1 ? nullptr : std::move(comm), sequence && shard_.tp.size > 1};
  tp_ = ctx;
  if (!model->embed_tokens.is_empty()) model->embed_tokens->tp = ctx;
  for (const auto& child : model->layers->children()) {
    auto layer = std::dynamic_pointer_cast<DecoderLayerImpl>(child);
    if (!layer) continue;
    layer->self_attn->tp = ctx;
    if (!layer->mlp.is_empty()) layer->mlp->tp = ctx;
    // Replicated: it only needs the group when it routes a block of the sequence.
    if (!layer->block_sparse_moe.is_empty()) layer->block_sparse_moe->tp = ctx.sequence ? ctx : TensorParallelContext{};
  }
}

LossOutput TransformerImpl::headLoss(const torch::Tensor& h, const torch::Tensor& target) {
  TORCH_CHECK(holdsHead(), "headLoss: this pipeline stage does not hold the LM head");
  TORCH_CHECK(shard_.tp.size == 1 || tp_, "a tensor-parallel shard needs setTensorParallel before its first forward");
  auto logits = logitsOf(h);
  auto compute = logits.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto flat = logits.reshape({-1, logits.size(-1)}).to(compute);
  auto tgt = target.reshape({-1}).to(torch::kLong);
  auto valid = tgt >= 0;
  LossOutput out;
  if (shard_.tp.size > 1) {
    out.ce_sum = vocabParallelCrossEntropySum(flat, tgt, splitRange(config_.vocab_size, shard_.tp.size, shard_.tp.rank).first,
                                              tp_.comm.get());
  } else {
    out.ce_sum = torch::nn::functional::cross_entropy(
        flat, tgt.masked_fill(valid.logical_not(), -100),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  }
  out.tokens = valid.sum().item<int64_t>();
  out.aux_loss = localAuxLoss().to(out.ce_sum.scalar_type());
  out.loss = out.ce_sum / static_cast<double>(std::max<int64_t>(1, out.tokens)) + out.aux_loss;
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> TransformerImpl::namedParameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : named_parameters(true)) out.emplace_back(item.key(), item.value());
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> TransformerImpl::namedTensors() const {
  auto out = namedParameters();
  for (const auto& item : named_buffers(true)) out.emplace_back(item.key(), item.value());
  return out;
}

std::vector<torch::Tensor> TransformerImpl::parameterList() const {
  std::vector<torch::Tensor> out;
  for (const auto& item : named_parameters(true)) out.push_back(item.value());
  return out;
}

int64_t TransformerImpl::numParameters() const {
  int64_t n = 0;
  for (const auto& p : parameterList()) n += p.numel();
  return n;
}

std::vector<MoeFfn> TransformerImpl::moeLayers() const {
  std::vector<MoeFfn> out;
  for (const auto& child : model->layers->children()) {
    auto layer = std::dynamic_pointer_cast<DecoderLayerImpl>(child);
    if (layer && !layer->block_sparse_moe.is_empty()) out.push_back(layer->block_sparse_moe);
  }
  return out;
}

std::vector<MoeLayerStats> TransformerImpl::moeStats() const {
  std::vector<MoeLayerStats> out;
  for (const auto& m : moeLayers()) out.push_back(m->stats());
  return out;
}

torch::Tensor TransformerImpl::routerLoad() const {
  auto moe = moeLayers();
  if (moe.empty()) return torch::zeros({0, 0}, torch::kLong);
  std::vector<torch::Tensor> rows;
  for (const auto& m : moe) rows.push_back(m->loadCounts());
  return torch::stack(rows);
}

void TransformerImpl::updateRouterBias(const torch::Tensor& global_load) {
  auto moe = moeLayers();
  if (moe.empty() || config_.moe.balance != "router_bias") return;
  TORCH_CHECK(global_load.dim() == 2 && global_load.size(0) == static_cast<int64_t>(moe.size()),
              "router load must be [", moe.size(), ", E], got ", global_load.sizes());
  for (size_t i = 0; i < moe.size(); ++i) moe[i]->updateRouterBias(global_load[static_cast<int64_t>(i)]);
}

KvCache TransformerImpl::makeCache() const {
  KvCache c;
  c.layers.assign(static_cast<size_t>(config_.n_layers), LayerKvCache{});
  return c;
}

core::Result<Transformer> buildModel(const core::ModelConfig& config, uint64_t seed) {
  return buildModel(config, seed, ModelShard{});
}

core::Result<Transformer> buildModel(const core::ModelConfig& config, uint64_t seed, const ModelShard& shard) {
  auto resolved = resolveModelConfig(config);
  if (!resolved.isOk()) return resolved.status();
  try {
    return Transformer(*resolved, seed, shard);
  } catch (const c10::Error& e) {
    return core::internalError(std::string("building the model: ") + e.what_without_backtrace());
  }
}

std::vector<std::pair<std::string, std::vector<int64_t>>> parameterLayout(const core::ModelConfig& config) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.push_back({"model.embed_tokens.weight", {config.vocab_size, config.dim}});
  for (int64_t l = 0; l < config.n_layers; ++l) {
    DecoderLayer layer(config, l);  // uninitialised: only names and shapes are read
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    for (const auto& item : layer->named_parameters(true)) out.push_back({prefix + item.key(), item.value().sizes().vec()});
  }
  out.push_back({"model.norm.weight", {config.dim}});
  if (!config.tie_embeddings) out.push_back({"lm_head.weight", {config.vocab_size, config.dim}});
  return out;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> bufferLayout(const core::ModelConfig& config) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (int64_t l = 0; l < config.n_layers; ++l) {
    if (!isMoeLayer(config, l)) continue;
    DecoderLayer layer(config, l);  // uninitialised: only names and shapes are read
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    for (const auto& item : layer->named_buffers(true)) out.push_back({prefix + item.key(), item.value().sizes().vec()});
  }
  return out;
}

}  // namespace archipelago::model
