// What the trainer needs around the model: "gradient ready" hooks (the
// runtime's gradient bucketer overlaps allreduce with backward through
// them), text generation, and parameter / FLOP counts (for MFU and the
// planner).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/model/transformer.h"

namespace archipelago::model {

// ---- gradient-ready hooks ------------------------------------------------------

// Calls on_ready(i) each time backward has finished accumulating parameter
// i's gradient into .grad() (a post hook on its AccumulateGrad node). Runs on
// the autograd thread; keep the callback short (mark a bucket, notify).
// Hooks are removed when this object is destroyed.
class GradReadyHooks {
 public:
  GradReadyHooks(const std::vector<torch::Tensor>& params, std::function<void(size_t)> on_ready);
  ~GradReadyHooks();
  GradReadyHooks(const GradReadyHooks&) = delete;
  GradReadyHooks& operator=(const GradReadyHooks&) = delete;

 private:
  struct Entry;
  std::vector<std::unique_ptr<Entry>> entries_;
  std::shared_ptr<std::function<void(size_t)>> callback_;
};

// ---- generation -----------------------------------------------------------------

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0.0;  // 0 = greedy (argmax)
  int64_t top_k = 0;         // 0 = the whole vocabulary
  uint64_t seed = 0;
  int64_t stop_token = -1;   // stop after emitting this token; -1 = never
  bool use_kv_cache = true;  // false = recompute the whole context each step
};

// Returns only the new tokens. Sampling draws from a 64-bit generator seeded
// by `seed` with probabilities computed in fp64, so a (model, prompt,
// options) triple gives the same text on every machine. When the context
// reaches max_seq_len the oldest tokens are dropped (sliding window).
std::vector<int64_t> generate(Transformer& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& options);

// ---- counts ---------------------------------------------------------------------

struct ParamCounts {
  int64_t total = 0;       // every trainable parameter
  int64_t embedding = 0;   // embed_tokens (+ lm_head when untied)
  int64_t active = 0;      // used per token: total minus unselected experts
};
// Closed form from a resolved config (equals Transformer::numParameters()).
ParamCounts countParameters(const core::ModelConfig& c);

struct FlopCounts {
  double forward = 0;   // per token
  double backward = 0;  // per token (2x forward: grads w.r.t. inputs and weights)
  double total() const { return forward + backward; }
};
// Matmul FLOPs (2 per multiply-add) per token for a sequence of seq_len:
// projections, attention scores and values over the full seq_len (the
// PaLM/Megatron MFU convention, causal masking not discounted), the FFN or
// the router + top_k experts + shared expert, and the LM head. Norms,
// softmax, activations and embedding lookups are not counted.
FlopCounts flopsPerToken(const core::ModelConfig& c, int64_t seq_len);

}  // namespace archipelago::model
