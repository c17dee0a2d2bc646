// Building blocks of the LLaMA-style decoder: config resolution, deterministic
// initialisation, RMSNorm, rotary position embeddings, causal self-attention
// with optional grouped-query attention, and the SwiGLU feed-forward.
//
// Every weight is created under the Hugging Face LLaMA name it will carry in
// a checkpoint (the module tree mirrors HF's), so torch's named_parameters()
// yields "model.layers.0.self_attn.q_proj.weight" with no renaming table.
// Linear weights are stored [out, in] like HF's nn.Linear.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/model/tensor_parallel.h"

namespace archipelago::model {

// Fills the derived defaults of a ModelConfig (n_kv_heads = n_heads,
// ffn_hidden = 8/3*dim rounded up to 32, expert_hidden = ffn_hidden) and
// validates it. vocab_size must already be set (the data manifest gives it).
// Errors name the field: "model.n_heads: 3 does not divide model.dim 128".
core::Result<core::ModelConfig> resolveModelConfig(const core::ModelConfig& config);

inline int64_t headDim(const core::ModelConfig& c) { return c.dim / c.n_heads; }
// Layer i has an MoE FFN when MoE is on and (i + 1) % moe.every == 0 (the
// Qwen2-MoE "decoder_sparse_step" rule; every = 1 means all layers).
bool isMoeLayer(const core::ModelConfig& c, int64_t layer);
// torch dtype of "fp32" | "bf16" | "fp16".
core::Result<torch::ScalarType> parseDtype(const std::string& name);

// Sets libtorch's intra-op threads (and inter-op threads when that is still
// possible: libtorch allows it once, before the first parallel work).
void setComputeThreads(int64_t threads);

// Deterministic normal(0, std) fp32 tensor on the CPU. The generator is seeded
// from (seed, name) alone, so a tensor's initial value does not depend on the
// order of construction nor on which other tensors exist (a pipeline stage
// that builds only its layers gets the same weights as the full model).
torch::Tensor deterministicNormal(torch::IntArrayRef shape, double std, uint64_t seed,
                                  const std::string& name);

// y = x W^T with W [out, in] and no bias (all LLaMA projections).
class LinearNoBiasImpl : public torch::nn::Module {
 public:
  LinearNoBiasImpl(int64_t in, int64_t out);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
};
TORCH_MODULE(LinearNoBias);

// Token embedding table [vocab, dim] ("embed_tokens.weight"). Vocab-parallel
// (tensor parallelism): the rows of ids [vocab_begin, vocab_begin + vocab);
// other ids look up zeros here and the group's sum is the embedding.
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t vocab, int64_t dim, int64_t vocab_begin = 0);
  torch::Tensor forward(const torch::Tensor& ids);
  torch::Tensor weight;
  int64_t vocab_begin = 0;
  TensorParallelContext tp;  // set with a vocab slice
};
TORCH_MODULE(Embedding);

// RMSNorm as in HF LLaMA: normalise in fp32, cast back, then scale.
class RmsNormImpl : public torch::nn::Module {
 public:
  RmsNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RmsNorm);

// cos/sin tables [T, head_dim] (computed in fp64, stored as dtype) for absolute positions
// start .. start+T-1, HF "rotate_half" layout: frequency i pairs element i
// with element i + head_dim/2, inv_freq_i = theta^(-2i/head_dim).
struct RotaryTables {
  torch::Tensor cos;
  torch::Tensor sin;
};
RotaryTables rotaryTables(int64_t start, int64_t length, int64_t head_dim, double theta,
                          torch::Device device, torch::ScalarType dtype = torch::kFloat);
// x [B, H, T, head_dim] -> x*cos + rotate_half(x)*sin.
torch::Tensor applyRotary(const torch::Tensor& x, const RotaryTables& rope);

// Keys and values of one layer kept between generation steps
// ([B, n_kv_heads, T_so_far, head_dim]); empty tensors before the first step.
struct LayerKvCache {
  torch::Tensor k;
  torch::Tensor v;
};

// Causal multi-head self-attention with rotary embeddings. n_kv_heads <
// n_heads gives grouped-query attention: query head h reads kv head
// h / (n_heads / n_kv_heads), as HF's repeat_kv does.
//
// Tensor parallelism: this rank's query heads and their kv heads
// (column-parallel q/k/v, row-parallel o_proj; the output summed over `tp`).
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const core::ModelConfig& c, TensorParallelRank tp_rank = {});
  // x [B, T, dim]; rope holds positions start..start+T-1 where start is the
  // cache length (0 without a cache). Returns [B, T, dim].
  torch::Tensor forward(const torch::Tensor& x, const RotaryTables& rope,
                        LayerKvCache* cache = nullptr);

  LinearNoBias q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  int64_t n_heads, n_kv_heads, head_dim;  // heads held here
  TensorParallelContext tp;  // set when the heads are a slice
};
TORCH_MODULE(Attention);

// Scaled dot-product attention over [B, H, Tq, hd] / [B, H, Tk, hd] with the
// causal rule "query i (absolute position q_start + i) sees keys 0..q_start+i".
// Softmax in fp32. Whole sequences on a GPU take the fused kernel of
// libtorch >= 2.0 (compat::fusedCausalAttention). Exposed for the tests.
torch::Tensor causalAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, int64_t q_start);

// SwiGLU FFN: down(silu(gate(x)) * up(x)). Tensor names are parameterised so
// the same module serves as LLaMA "mlp" (gate_proj/up_proj/down_proj) and as a
// Mixtral expert (w1 = gate, w3 = up, w2 = down). Tensor parallelism: `hidden`
// is this rank's slice (column-parallel gate/up, row-parallel down; the
// output summed over `tp`).
class SwiGluImpl : public torch::nn::Module {
 public:
  SwiGluImpl(int64_t dim, int64_t hidden, bool mixtral_names = false);
  torch::Tensor forward(const torch::Tensor& x);
  LinearNoBias gate{nullptr}, up{nullptr}, down{nullptr};
  TensorParallelContext tp;  // set when `hidden` is a slice
};
TORCH_MODULE(SwiGlu);

}  // namespace archipelago::model
