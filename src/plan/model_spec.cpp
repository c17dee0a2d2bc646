// Parameter and FLOP accounting of transformer shapes, and the presets.
#include "archipelago/plan/model_spec.h"

#include <algorithm>
#include <filesystem>

#include "plan/arith.h"

namespace archipelago::plan {

bool ModelSpec::isMoeLayer(int64_t layer) const {
  if (!isMoe() || layer < first_dense) return false;
  return (layer - first_dense) % std::max<int64_t>(moe_every, 1) == 0;
}

int64_t ModelSpec::numMoeLayers() const {
  int64_t n = 0;
  for (int64_t l = 0; l < n_layers; ++l) n += isMoeLayer(l) ? 1 : 0;
  return n;
}

double ModelSpec::attentionParams() const {
  const double h = d(dim);
  double p = 0;
  if (isMla()) {
    const double qk = d(qk_nope_dim + qk_rope_dim);
    if (q_lora_rank > 0) {
      p += h * d(q_lora_rank) + d(q_lora_rank) + d(q_lora_rank) * d(n_heads) * qk;
    } else {
      p += h * d(n_heads) * qk;
    }
    p += h * d(kv_lora_rank + qk_rope_dim) + d(kv_lora_rank);
    p += d(kv_lora_rank) * d(n_heads) * d(qk_nope_dim + v_head_dim);
    p += d(n_heads) * d(v_head_dim) * h;
  } else {
    const double q = d(n_heads * head_dim), kv = d(n_kv_heads * head_dim);
    p += h * q + 2 * h * kv + q * h;
    if (biases) p += q + 2 * kv + h;
  }
  p += h * (biases ? 2 : 1);  // pre-attention norm (+ bias for LayerNorm)
  return p;
}

double ModelSpec::denseFfnParams() const {
  const double h = d(dim), f = d(ffn_hidden);
  double p = (gated_ffn ? 3 : 2) * h * f;
  if (biases) p += f + h;
  return p + h * (biases ? 2 : 1);  // pre-FFN norm
}

double ModelSpec::expertParams() const { return (gated_ffn ? 3.0 : 2.0) * d(dim) * d(expert_hidden); }

double ModelSpec::moeLayerParams() const {
  return d(num_experts + shared_experts) * expertParams() + d(num_experts) * d(dim) + d(dim);
}

double ModelSpec::moeLayerActiveParams() const {
  return d(top_k + shared_experts) * expertParams() + d(num_experts) * d(dim) + d(dim);
}

double ModelSpec::layerParams(int64_t layer) const {
  return attentionParams() + (isMoeLayer(layer) ? moeLayerParams() : denseFfnParams());
}

double ModelSpec::embeddingParams() const { return d(vocab) * d(dim) + d(learned_pos) * d(dim); }

double ModelSpec::headParams() const {
  return (tie_embeddings ? 0.0 : d(vocab) * d(dim)) + d(dim) * (biases ? 2 : 1);
}

double ModelSpec::totalParams() const {
  double p = embeddingParams() + headParams();
  for (int64_t l = 0; l < n_layers; ++l) p += layerParams(l);
  return p;
}

double ModelSpec::activeParams() const {
  // The head is a matmul every token passes through even when tied.
  double p = d(vocab) * d(dim) + d(dim);
  for (int64_t l = 0; l < n_layers; ++l) {
    p += attentionParams() + (isMoeLayer(l) ? moeLayerActiveParams() : denseFfnParams());
  }
  return p;
}

double ModelSpec::attentionCoreForwardFlops(int64_t seq_len) const {
  // QK^T and softmax(.)V: 2 * s * (qk dim + v dim) per head per token.
  const double qk = isMla() ? d(qk_nope_dim + qk_rope_dim) : d(head_dim);
  const double v = isMla() ? d(v_head_dim) : d(head_dim);
  return 2.0 * d(seq_len) * d(n_heads) * (qk + v);
}

double ModelSpec::layerForwardFlops(int64_t layer, int64_t seq_len) const {
  const double weights = attentionParams() + (isMoeLayer(layer) ? moeLayerActiveParams() : denseFfnParams());
  return 2.0 * weights + attentionCoreForwardFlops(seq_len);
}

double ModelSpec::trainFlopsPerToken(int64_t seq_len) const {
  double f = headForwardFlops();
  for (int64_t l = 0; l < n_layers; ++l) f += layerForwardFlops(l, seq_len);
  return 3.0 * f;
}

core::Status ModelSpec::validate() const {
  auto bad = [&](const std::string& what) { return core::invalidArgument("model " + name + ": " + what); };
  if (dim <= 0 || n_layers <= 0 || n_heads <= 0 || vocab <= 0) return bad("dim, n_layers, n_heads, vocab must be > 0");
  if (!isMla() && (n_kv_heads <= 0 || n_heads % n_kv_heads != 0)) return bad("n_heads must be a multiple of n_kv_heads");
  if (!isMla() && head_dim <= 0) return bad("head_dim must be > 0");
  if (isMoe() && (top_k <= 0 || top_k > num_experts || expert_hidden <= 0)) {
    return bad("MoE needs 0 < top_k <= num_experts and expert_hidden > 0");
  }
  if (!isMoe() && ffn_hidden <= 0) return bad("ffn_hidden must be > 0");
  return core::okStatus();
}

namespace {

ModelSpec llama(const std::string& name, int64_t layers, int64_t dim, int64_t heads, int64_t kv, int64_t ffn,
                double published) {
  ModelSpec m;
  m.name = name;
  m.vocab = 128256;
  m.dim = dim;
  m.n_layers = layers;
  m.n_heads = heads;
  m.n_kv_heads = kv;
  m.head_dim = dim / heads;
  m.ffn_hidden = ffn;
  m.published_total = published;
  m.published_active = published;
  return m;
}

ModelSpec gptLike(const std::string& name, int64_t layers, int64_t dim, int64_t heads, int64_t vocab,
                  int64_t pos, double published) {
  ModelSpec m;
  m.name = name;
  m.vocab = vocab;
  m.dim = dim;
  m.n_layers = layers;
  m.n_heads = heads;
  m.n_kv_heads = heads;
  m.head_dim = dim / heads;
  m.ffn_hidden = 4 * dim;
  m.gated_ffn = false;
  m.biases = true;
  m.tie_embeddings = true;
  m.learned_pos = pos;
  m.published_total = published;
  m.published_active = published;
  return m;
}

ModelSpec mlaMoe(const std::string& name, int64_t heads, int64_t experts, int64_t first_dense, int64_t vocab,
                 double total, double active) {
  ModelSpec m;
  m.name = name;
  m.vocab = vocab;
  m.dim = 7168;
  m.n_layers = 61;
  m.n_heads = heads;
  m.n_kv_heads = heads;
  m.head_dim = 128;
  m.ffn_hidden = 18432;  // the first dense layers
  m.q_lora_rank = 1536;
  m.kv_lora_rank = 512;
  m.qk_nope_dim = 128;
  m.qk_rope_dim = 64;
  m.v_head_dim = 128;
  m.num_experts = experts;
  m.top_k = 8;
  m.shared_experts = 1;
  m.expert_hidden = 2048;
  m.first_dense = first_dense;
  m.published_total = total;
  m.published_active = active;
  return m;
}

}  // namespace

std::vector<std::string> presetNames() {
  return {"gpt3-175b",   "llama3-8b",  "llama3-70b", "llama3-405b", "deepseek-v3",
          "kimi-k2",     "mt-nlg-530b", "bloom-176b", "tiny-llama"};
}

core::Result<ModelSpec> preset(const std::string& name) {
  // GPT-3 175B: Brown et al. 2020, Table 2.1 (96 layers, d 12288, 96 heads, ctx 2048).
  if (name == "gpt3-175b") return gptLike(name, 96, 12288, 96, 50257, 2048, 175e9);
  // LLaMA 3: Llama 3 paper Table 3 / released configs.
  if (name == "llama3-8b") return llama(name, 32, 4096, 32, 8, 14336, 8.03e9);
  if (name == "llama3-70b") return llama(name, 80, 8192, 64, 8, 28672, 70.6e9);
  if (name == "llama3-405b") return llama(name, 126, 16384, 128, 8, 53248, 405e9);
  // DeepSeek-V3: technical report sec. 4.2 (61 layers, d 7168, MLA 128 heads,
  // 1 shared + 256 routed experts of 2048, 8 active, first 3 layers dense).
  // 671B total / 37B activated, excluding the 14B MTP module.
  if (name == "deepseek-v3") return mlaMoe(name, 128, 256, 3, 129280, 671e9, 37e9);
  // Kimi K2: Moonshot AI release (61 layers, d 7168, MLA 64 heads, 384
  // experts of 2048, 8 active + 1 shared, first layer dense, vocab 163840).
  if (name == "kimi-k2") return mlaMoe(name, 64, 384, 1, 163840, 1.04e12, 32e9);
  // MT-NLG 530B: Smith et al. 2022 (105 layers, d 20480, 128 heads).
  if (name == "mt-nlg-530b") return gptLike(name, 105, 20480, 128, 51200, 2048, 530e9);
  // BLOOM 176B: BigScience 2022 (70 layers, d 14336, 112 heads, vocab 250880, ALiBi).
  if (name == "bloom-176b") {
    ModelSpec m = gptLike(name, 70, 14336, 112, 250880, 0, 176e9);
    return m;
  }
  if (name == "tiny-llama") {
    ModelSpec m = llama(name, 4, 128, 4, 4, 352, 0);
    m.vocab = 256;
    m.published_total = m.published_active = 0;
    return m;
  }
  std::string known;
  for (const auto& n : presetNames()) known += (known.empty() ? "" : ", ") + n;
  return core::notFound("model '" + name + "' is neither a preset (" + known + ") nor a job YAML file");
}

core::Result<ModelSpec> fromModelConfig(const core::ModelConfig& c) {
  if (!c.preset.empty()) return preset(c.preset);
  ModelSpec m;
  m.name = "job-model";
  m.vocab = c.vocab_size > 0 ? c.vocab_size : 256;
  m.dim = c.dim;
  m.n_layers = c.n_layers;
  m.n_heads = c.n_heads;
  m.n_kv_heads = c.n_kv_heads > 0 ? c.n_kv_heads : c.n_heads;
  m.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
  m.ffn_hidden = c.ffn_hidden > 0 ? c.ffn_hidden : ((8 * c.dim / 3 + 31) / 32) * 32;
  m.tie_embeddings = c.tie_embeddings;
  if (c.moe.num_experts > 0) {
    m.num_experts = c.moe.num_experts;
    m.top_k = c.moe.top_k;
    m.expert_hidden = c.moe.expert_hidden > 0 ? c.moe.expert_hidden : m.ffn_hidden;
    m.shared_experts = c.moe.shared_expert ? 1 : 0;
    m.moe_every = c.moe.every;
    // The runtime's MoE layers are those with (l + 1) % every == 0 (model/layers.h).
    m.first_dense = std::max<int64_t>(c.moe.every, 1) - 1;
  }
  ARCH_RETURN_IF_ERROR(m.validate());
  return m;
}

core::Result<ModelSpec> resolveModel(const std::string& preset_or_path) {
  auto p = preset(preset_or_path);
  if (p.isOk()) return p;
  std::error_code ec;
  if (!std::filesystem::exists(preset_or_path, ec)) return p.status();
  core::LoadOptions lo;
  lo.use_process_env = false;
  ARCH_ASSIGN_OR_RETURN(core::LoadedJob job, core::loadJob(preset_or_path, lo));
  ARCH_ASSIGN_OR_RETURN(ModelSpec m, fromModelConfig(job.job.model));
  if (job.job.model.preset.empty()) {
    m.name = std::filesystem::path(preset_or_path).stem().string();
  }
  return m;
}

}  // namespace archipelago::plan
