// The shape of a transformer as the planner sees it: enough to count
// parameters, FLOPs, activation bytes and communication volumes per layer.
// Presets hold the published architectures; any job file's core::ModelConfig
// converts to one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::plan {

struct ModelSpec {
  std::string name;
  int64_t vocab = 32000;
  int64_t dim = 4096;
  int64_t n_layers = 32;
  int64_t n_heads = 32;
  int64_t n_kv_heads = 32;
  int64_t head_dim = 128;
  int64_t ffn_hidden = 11008;   // dense FFN hidden size
  bool gated_ffn = true;        // SwiGLU (3 matrices) vs GELU MLP (2)
  bool biases = false;          // GPT-3 / BLOOM style linear biases
  bool tie_embeddings = false;
  int64_t learned_pos = 0;      // learned position table rows (GPT-3: 2048)

  // Multi-head latent attention (DeepSeek-V2/V3, Kimi K2); 0 = standard GQA.
  int64_t q_lora_rank = 0;
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_dim = 0;
  int64_t qk_rope_dim = 0;
  int64_t v_head_dim = 0;

  // Mixture of experts: layers [first_dense, n_layers) with (l - first_dense)
  // % moe_every == 0 are MoE layers.
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t shared_experts = 0;
  int64_t expert_hidden = 0;
  int64_t first_dense = 0;
  int64_t moe_every = 1;

  // Published totals, for reporting the deviation (0 = unknown).
  double published_total = 0;
  double published_active = 0;

  bool isMla() const { return kv_lora_rank > 0; }
  bool isMoe() const { return num_experts > 0; }
  bool isMoeLayer(int64_t layer) const;
  int64_t numMoeLayers() const;

  double attentionParams() const;      // one layer's attention block (+ norm)
  double denseFfnParams() const;       // one dense FFN
  double expertParams() const;         // one expert
  double moeLayerParams() const;       // routed + shared experts + router
  double moeLayerActiveParams() const; // top_k routed + shared + router
  double layerParams(int64_t layer) const;
  double embeddingParams() const;      // input embedding (+ learned positions)
  double headParams() const;           // LM head (0 when tied) + final norm
  double totalParams() const;
  // Parameters a token passes through in matmuls: excludes the input
  // embedding lookup (a gather, not a matmul), counts only routed experts a
  // token visits. This is the convention of the published "activated" counts.
  double activeParams() const;

  // Forward FLOPs of one token in one layer at sequence length s, matmuls
  // only: 2 * active weights + attention scores (4 * s * heads * head dims,
  // no causal discount, the Megatron convention).
  double layerForwardFlops(int64_t layer, int64_t seq_len) const;
  double attentionCoreForwardFlops(int64_t seq_len) const;
  double headForwardFlops() const { return 2.0 * static_cast<double>(vocab * dim); }
  // Model FLOPs per token for one training step (fwd + bwd = 3x forward).
  double trainFlopsPerToken(int64_t seq_len) const;

  core::Status validate() const;
};

// Known presets: gpt3-175b, llama3-8b, llama3-70b, llama3-405b,
// deepseek-v3, kimi-k2, mt-nlg-530b, bloom-176b, and tiny local models.
std::vector<std::string> presetNames();
core::Result<ModelSpec> preset(const std::string& name);
// From a job file's model section (preset name takes precedence when set).
core::Result<ModelSpec> fromModelConfig(const core::ModelConfig& config);
// MODEL on the command line: a preset name or a job YAML path.
core::Result<ModelSpec> resolveModel(const std::string& preset_or_path);

}  // namespace archipelago::plan
