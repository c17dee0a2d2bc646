// The LLaMA-style decoder-only language model used by every worker.
//
//   ids -> model.embed_tokens
//       -> n_layers x [ x += self_attn(input_layernorm(x));
//                       x += ffn(post_attention_layernorm(x)) ]   ffn = mlp | block_sparse_moe
//       -> model.norm -> lm_head (or embed_tokens^T when tied) -> logits
//
// Parameter names are the Hugging Face LLaMA / Mixtral names (see
// docs/model.md); namedParameters() returns them in a fixed order (module
// registration order: embedding, layers 0..L-1, final norm, lm_head), which
// is the order the trainer flattens, buckets and checkpoints them in.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/model/layers.h"
#include "archipelago/model/moe.h"
#include "archipelago/model/tensor_parallel.h"

namespace archipelago::model {

// The part of the model one worker holds: pipeline parallelism gives each
// stage a contiguous range of decoder layers (the first stage also holds the
// embedding, the last the final norm and the LM head); expert parallelism
// gives each member a contiguous range of every MoE layer's experts. Every
// tensor keeps its full-model Hugging Face name and its full-model initial
// value (initialisation is seeded by name), so parts of one model at any
// split assemble, by name, into the same model. Tensor parallelism gives
// each rank of a group slices of the large matrices (model/tensor_parallel.h).
struct ModelShard {
  int64_t layer_begin = 0;
  int64_t layer_end = -1;   // -1 = n_layers
  int64_t expert_begin = 0;
  int64_t expert_end = -1;  // -1 = num_experts
  TensorParallelRank tp;
};

// One decoder layer. Exactly one of mlp / block_sparse_moe is set.
class DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(const core::ModelConfig& c, int64_t layer, int64_t expert_begin = 0, int64_t expert_end = -1,
                   TensorParallelRank tp = {});
  torch::Tensor forward(const torch::Tensor& x, const RotaryTables& rope,
                        LayerKvCache* cache = nullptr);

  RmsNorm input_layernorm{nullptr};
  Attention self_attn{nullptr};
  RmsNorm post_attention_layernorm{nullptr};
  SwiGlu mlp{nullptr};
  MoeFfn block_sparse_moe{nullptr};
};
TORCH_MODULE(DecoderLayer);

// HF's "model." prefix: embedding, layers, final norm. With a shard that
// holds only some layers, embed_tokens / norm may be null and layers[i] is
// decoder layer shard.layer_begin + i (registered under its global index).
class DecoderStackImpl : public torch::nn::Module {
 public:
  explicit DecoderStackImpl(const core::ModelConfig& c, const ModelShard& shard = {});
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RmsNorm norm{nullptr};
};
TORCH_MODULE(DecoderStack);

// Keys/values of every layer for incremental decoding.
struct KvCache {
  std::vector<LayerKvCache> layers;
  int64_t length() const { return layers.empty() || !layers[0].k.defined() ? 0 : layers[0].k.size(2); }
};

struct LossOutput {
  torch::Tensor loss;      // ce_sum / tokens + aux_loss: what a single process backwards
  torch::Tensor ce_sum;    // sum of per-token cross-entropy (fp32 scalar, differentiable)
  torch::Tensor aux_loss;  // aux_loss_coef * mean over MoE layers of their aux loss
                           // (0 unless moe.balance == "aux_loss"; differentiable)
  int64_t tokens = 0;      // tokens counted (targets >= 0)
  double ceMean() const { return tokens > 0 ? ce_sum.item<double>() / static_cast<double>(tokens) : 0.0; }
};

// Called around every decoder layer's forward (i: the layer's index in
// this shard). Sharded parameters (ZeRO-3, runtime/parallel/sharded_params.h)
// gather a layer's weights in before() and free them again in after(),
// which may also hook the output's gradient (the layer's backward starts
// there) and returns the tensor the next layer takes.
class LayerHooks {
 public:
  virtual ~LayerHooks() = default;
  virtual void before(size_t layer) = 0;
  virtual torch::Tensor after(size_t layer, torch::Tensor output) = 0;
};

class TransformerImpl : public torch::nn::Module {
 public:
  // `config` must be resolved (resolveModelConfig). Weights are initialised
  // deterministically from `seed` on the CPU in fp32; move/cast afterwards
  // with ->to(device, dtype).
  TransformerImpl(const core::ModelConfig& config, uint64_t seed);
  // Only the part `shard` names (pipeline stage / expert-parallel member).
  // forward/hidden/lossAndStats need every layer (and, without an expert
  // exchange, every expert); a pipeline stage uses stageForward/headLoss.
  TransformerImpl(const core::ModelConfig& config, uint64_t seed, const ModelShard& shard);

  // input_ids [B, T] int64 -> logits [B, T, vocab]. With a cache, positions
  // continue after cache->length() and the cache is extended.
  torch::Tensor forward(const torch::Tensor& input_ids, KvCache* cache = nullptr);
  // Final-norm hidden states [B, T, dim] (before the LM head).
  torch::Tensor hidden(const torch::Tensor& input_ids, KvCache* cache = nullptr);

  // Cross-entropy of logits(input) against target [B, T] (targets < 0 are
  // ignored), plus the MoE auxiliary loss. The trainer that splits a global
  // batch unevenly backwards ce_sum / global_tokens (+ its share of aux).
  LossOutput lossAndStats(const torch::Tensor& input_ids, const torch::Tensor& target);

  // ---- pipeline stages ----
  // The first stage takes input_ids [B, T]; later stages take the previous
  // stage's hidden states [B, T, dim]. Runs the held layers; the last stage
  // also applies the final norm. (For the whole model: hidden().)
  torch::Tensor stageForward(const torch::Tensor& input);
  // Last stage: LM head + cross-entropy of final-norm hidden states against
  // target, plus localAuxLoss() (lossAndStats = headLoss(hidden(ids), target)).
  LossOutput headLoss(const torch::Tensor& hidden_states, const torch::Tensor& target);
  // This part's share of the MoE auxiliary loss from the last forward:
  // aux_loss_coef * sum over held MoE layers / (MoE layers of the whole
  // model); summed over stages it is LossOutput::aux_loss. Scalar; zero
  // (not requiring grad) when there is nothing to balance by aux loss.
  torch::Tensor localAuxLoss() const;
  const ModelShard& shard() const { return shard_; }
  bool holdsEmbedding() const { return shard_.layer_begin == 0; }
  bool holdsHead() const { return shard_.layer_end == config_.n_layers; }
  // Expert parallelism: routes every MoE layer's rows through `exchange`.
  void setExpertExchange(std::shared_ptr<ExpertExchange> exchange);
  // Tensor parallelism: the group joining this shard's slices (its size and
  // rank must be the shard's). Needed before the first forward of a shard
  // with shard().tp.size > 1; forward() is then refused (logits are a
  // vocab slice: lossAndStats has the vocab-parallel head). `sequence`:
  // sequence parallelism (hidden() and stageForward() then return this
  // rank's block of the sequence; dense models only).
  void setTensorParallel(std::shared_ptr<TensorParallelComm> comm, bool sequence = false);
  bool sequenceParallel() const { return tp_.sequence; }
  // Hooks around every layer's forward (null: none). Not owned.
  void setLayerHooks(LayerHooks* hooks) { layer_hooks_ = hooks; }

  // (HF name, parameter) in the stable order described above.
  std::vector<std::pair<std::string, torch::Tensor>> namedParameters() const;
  // Parameters plus persistent state that is not trained (router biases):
  // what a checkpoint must hold to resume exactly. Same order, buffers last.
  std::vector<std::pair<std::string, torch::Tensor>> namedTensors() const;
  std::vector<torch::Tensor> parameterList() const;
  int64_t numParameters() const;

  // Statistics of every MoE layer from the last forward (empty for dense).
  std::vector<MoeLayerStats> moeStats() const;
  // Router-bias balancing across data-parallel ranks: routerLoad() is int64
  // [n_moe_layers, E] accumulated since the last update; sum it over ranks and
  // pass the sum to updateRouterBias. No-op unless moe.balance == "router_bias".
  torch::Tensor routerLoad() const;
  void updateRouterBias(const torch::Tensor& global_load);
  void updateRouterBias() { updateRouterBias(routerLoad()); }
  std::vector<MoeFfn> moeLayers() const;

  KvCache makeCache() const;
  const core::ModelConfig& config() const { return config_; }
  torch::Device device() const;

  DecoderStack model{nullptr};
  LinearNoBias lm_head{nullptr};  // null when tie_embeddings

 private:
  void initParameters(uint64_t seed);
  torch::Tensor logitsOf(const torch::Tensor& h);
  torch::Tensor layerForward(size_t i, const torch::Tensor& x, const RotaryTables& rope, LayerKvCache* cache);
  core::ModelConfig config_;
  ModelShard shard_;  // resolved: ends filled in
  TensorParallelContext tp_;
  LayerHooks* layer_hooks_ = nullptr;
};
TORCH_MODULE(Transformer);

// (HF name, shape) of every trainable parameter of the whole model, in
// namedParameters() order, without allocating the model (one decoder layer
// at a time). The trainer's flat checkpoint layout (optimizer state) follows
// this order whatever the pipeline / expert split.
std::vector<std::pair<std::string, std::vector<int64_t>>> parameterLayout(const core::ModelConfig& config);
// (HF name, shape) of every persistent tensor that is not a parameter (the
// routing biases of model.moe.balance: router_bias), in layer order.
std::vector<std::pair<std::string, std::vector<int64_t>>> bufferLayout(const core::ModelConfig& config);

// Convenience: resolve + construct. Errors name the config field.
core::Result<Transformer> buildModel(const core::ModelConfig& config, uint64_t seed);
core::Result<Transformer> buildModel(const core::ModelConfig& config, uint64_t seed, const ModelShard& shard);

}  // namespace archipelago::model
