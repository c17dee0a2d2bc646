// FP8 linear layers (docs/model.md "FP8"): what lets a weak chip with FP8
// tensor cores, or none at all, train with the numerics of FP8 compute.
//
// Forward operands (activations, weights) are quantised to OCP E4M3, the
// output gradient of the backward pass to E5M2 (more range, less precision:
// gradients span many binades). A scale maps each tensor, or each tile of
// it, onto the format's range before rounding:
//
//   delayed  one scale per tensor from the largest amax of the last N steps
//            (Transformer Engine's delayed scaling): no extra pass over the
//            data before the GEMM, at the risk of clipping a sudden outlier;
//   block    one scale per 1x128 tile of activations and gradients and per
//            128x128 block of weights, from the tile's own amax (DeepSeek-V3's
//            fine-grained quantisation): outliers only coarsen their tile.
//
// Two backends compute the GEMMs of the same quantised operands:
//   "scaled_mm"                      real FP8 GEMMs (at::_scaled_mm) where the
//                                    linked libtorch has float8 dtypes and the
//                                    device runs them (CUDA, compute >= 8.9),
//                                    delayed recipe only;
//   "EMULATED (quantise-dequantise)" everywhere else: operands rounded exactly
//                                    to FP8 values, multiplied in fp32.
// Anything printed about an FP8 run names the backend (fp8Backend()).
//
// Only the attention projections and the SwiGLU / expert projections run in
// FP8 (setFp8): the embedding, the LM head and the MoE router stay in the
// compute dtype, as Transformer Engine's and DeepSeek-V3's recipes keep them,
// because their outputs feed a softmax over many classes (vocabulary,
// experts) whose argmax a 3-bit mantissa would reorder, and their share of
// the FLOPs is small.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/status.h"

namespace archipelago::core {
struct ModelConfig;
}

namespace archipelago::model {

enum class Fp8Format : uint8_t {
  kE4M3,  // OCP E4M3 "fn": bias 7, max 448, subnormals down to 2^-9, NaN, no infinities
  kE5M2,  // OCP E5M2: bias 15, max 57344, subnormals down to 2^-16, NaN and infinities
};

struct Fp8FormatSpec {
  const char* name;   // "e4m3" | "e5m2"
  double max;         // largest finite value
  int mantissa_bits;  // stored fraction bits
  int min_exponent;   // exponent of the smallest normal value
};
const Fp8FormatSpec& fp8Spec(Fp8Format format);

// Every element of x rounded to the nearest `format` value, ties to even,
// subnormals included; returned as fp32 on x's device (any device: plain
// torch ops). Finite values beyond the largest finite value saturate to it;
// +-Inf stays +-Inf in E5M2 and becomes NaN in E4M3 (no infinity there);
// NaN stays NaN; signed zeros keep their sign. That is the comm codecs'
// policy (docs/codecs.md), so a non-finite gradient stays visible.
torch::Tensor roundToFp8(const torch::Tensor& x, Fp8Format format);

// The multiplier that maps an amax onto the format's largest value:
// max / amax where amax is finite and > 0, otherwise `fallback` (an all-zero
// tile needs no scaling; a non-finite amax must not poison the scale).
torch::Tensor scaleFromAmax(const torch::Tensor& amax, Fp8Format format, const torch::Tensor& fallback);

// A 2-D tensor [R, C] quantised tile by tile: values = roundToFp8(x * scale)
// with one scale per tile of tile_rows x tile_cols. The last row / column of
// tiles is cut short where R or C is not a multiple of the tile (its amax is
// taken over the elements that exist). One tile of R x C is per-tensor
// scaling. values are held in bf16, which represents every E4M3 and E5M2
// number exactly.
struct Fp8Tensor {
  torch::Tensor values;  // [R, C] kBFloat16, exact FP8 numbers
  torch::Tensor scale;   // [ceil(R / tile_rows), ceil(C / tile_cols)] fp32
  int64_t tile_rows = 0;
  int64_t tile_cols = 0;
  Fp8Format format = Fp8Format::kE4M3;

  // values / scale, fp32 [R, C].
  torch::Tensor dequantize() const;
};

// Scales from each tile's own amax (block scaling; the whole tensor as one
// tile when tile_rows = R and tile_cols = C).
Fp8Tensor quantizeTiles(const torch::Tensor& x2d, Fp8Format format, int64_t tile_rows, int64_t tile_cols);
// One given scale (scalar tensor) for the whole tensor (delayed scaling).
Fp8Tensor quantizeWithScale(const torch::Tensor& x2d, Fp8Format format, const torch::Tensor& scale);

// Tile edge of the block recipe: 1 x kFp8Tile for activations and gradients,
// kFp8Tile x kFp8Tile for weights.
inline constexpr int64_t kFp8Tile = 128;

// Per-tensor delayed scaling state of one tensor role (the input, the weight
// or the output gradient of one linear). A handle: copies share the state,
// which is what lets the backward pass (which holds a copy) update the
// gradient's history in place. The tensors live on the device of the
// tensors it scales.
//
// Rule (Transformer Engine's DelayedScaling with amax_compute_algo "max" and
// margin 0): the scale used at step t is max / (largest amax of steps
// t-N .. t-1), falling back to the previous scale when that amax is 0 or not
// finite; step t's own amax then enters the history. One deliberate
// difference: at the very first step, with an empty history, the tensor's
// own amax gives the scale (TE starts from scale 1, which flushes the first
// step's small gradients, ~1e-6, below E5M2's smallest subnormal to zero).
class AmaxHistory {
 public:
  AmaxHistory() = default;
  explicit AmaxHistory(int64_t length);

  // The scale for quantising x at this step; with `record`, x's amax then
  // enters the history (evaluation passes do not record: validation must not
  // change the training run's scales).
  torch::Tensor scaleFor(const torch::Tensor& x, Fp8Format format, bool record);

  int64_t length() const { return length_; }
  int64_t steps() const;            // amaxes recorded so far
  torch::Tensor amaxes() const;     // [length] fp32, newest first, 0 where unused
  torch::Tensor lastScale() const;  // the scale of the last recording scaleFor

  // Step-level recording, as a training loop runs it (runtime/loop
  // fp8_steps.cpp): a recording scaleFor keeps the largest amax of the step
  // (takePending) instead of entering it, and the loop enters each step's
  // amax (the largest over every replica) with commit(). The scale inside
  // a step then depends on committed steps only: the same for each
  // micro-batch and each replica, from the amaxes of whole batches.
  void deferRecording();
  bool deferred() const { return pending_.defined(); }
  // The step's largest amax so far ([] fp32, 0 if none), reset to 0.
  torch::Tensor takePending();
  // Enters `amax` ([] fp32) as the newest step.
  void commit(const torch::Tensor& amax);
  // [length] amaxes, newest first, and how many steps were recorded: what a
  // checkpoint keeps (the scale follows from them at the next scaleFor).
  void restore(const torch::Tensor& amaxes, int64_t steps);

  // The shared tensors themselves, and a handle made from them: how the
  // backward pass, which can only keep tensors, carries the history.
  std::vector<torch::Tensor> state() const {
    if (deferred()) return {amax_, scale_, steps_, pending_};
    return {amax_, scale_, steps_};
  }
  static AmaxHistory fromState(const std::vector<torch::Tensor>& state);
  // Moves the history to `device` (a no-op when it is there). Only the
  // owner may call it, before it hands out copies: moving makes new
  // tensors, which a copy taken earlier would not see (on a GPU the
  // backward pass then recorded into a copy and the module's gradient
  // scale stayed 1: FP8 loss +31% over bf16, seen on an H200). scaleFor
  // therefore never moves; it refuses a tensor on another device.
  void moveTo(const torch::Device& device);

 private:

  int64_t length_ = 0;
  torch::Tensor amax_;   // [length] fp32, newest first
  torch::Tensor scale_;  // [] fp32
  torch::Tensor steps_;  // [] int64 on the CPU (read without a device sync)
  torch::Tensor pending_;  // [] fp32: the step's largest amax (deferred recording only)
};

enum class Fp8Recipe : uint8_t { kDelayed, kBlock };

struct Fp8Options {
  Fp8Recipe recipe = Fp8Recipe::kDelayed;
  int64_t amax_history = 16;  // delayed: steps of amax kept per tensor
};

// From the job fields train.fp8_recipe ("delayed" | "block") and
// train.fp8_amax_history (>= 1); errors name the field and what is expected.
core::Result<Fp8Options> parseFp8Options(const std::string& recipe, int64_t amax_history);
std::string fp8RecipeName(Fp8Recipe recipe);

// "scaled_mm" when the FP8 GEMMs of `recipe` on `device` are real,
// otherwise "EMULATED (quantise-dequantise)".
std::string fp8Backend(const torch::Device& device, Fp8Recipe recipe);

// The FP8 state of one linear layer: its recipe and, for delayed scaling,
// the amax histories of its input, weight and output gradient. It has no
// parameters or buffers, so a linear that holds one keeps its tensor names,
// its checkpoint layout and its flat-buffer offsets. The training loop
// records its histories step by step and checkpoints them apart from the
// weights (runtime/loop/fp8_steps.cpp).
class Fp8LinearImpl : public torch::nn::Module {
 public:
  explicit Fp8LinearImpl(const Fp8Options& options);

  // y = deq(q_e4m3(x)) deq(q_e4m3(W))^T in x's dtype, x [..., in], W [out, in].
  // Backward: grad_y is quantised to E5M2; grad_x = deq(q(grad_y)) deq(q(W))
  // and grad_W = deq(q(grad_y))^T deq(q(x)), from the operands quantised in
  // forward. Training mode records amaxes; evaluation mode only reads them.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& weight);

  const Fp8Options& options() const { return options_; }
  AmaxHistory& inputHistory() { return input_; }
  AmaxHistory& weightHistory() { return weight_; }
  AmaxHistory& gradHistory() { return grad_; }

 private:
  Fp8Options options_;
  AmaxHistory input_, weight_, grad_;
};
TORCH_MODULE(Fp8Linear);

// Turns FP8 on for every linear of `root` named q_proj, k_proj, v_proj,
// o_proj, gate_proj, up_proj, down_proj, w1, w2 or w3 (attention, SwiGLU,
// experts, shared expert), as a child module "fp8" of that linear; returns
// how many. Call it on a Transformer (or any module tree with those names).
int64_t setFp8(torch::nn::Module& root, const Fp8Options& options);
// The linears of `root` that setFp8 converts (converted or not), by module
// name in named_modules order.
std::vector<std::string> fp8LinearsOf(torch::nn::Module& root);
// The same for the whole model of `config`, without building it (from
// parameterLayout): what a pipeline stage, an expert group or a
// tensor-parallel rank holds part of is named as in the whole model.
std::vector<std::string> fp8LinearsOf(const core::ModelConfig& config);
// Back to ordinary linears (bit-identical to a model that never had FP8).
void clearFp8(torch::nn::Module& root);

// The FP8 state attached to a linear by setFp8, or null.
Fp8LinearImpl* fp8Of(const torch::nn::Module& linear);

}  // namespace archipelago::model
