// FP8 quantisation, scaling recipes and the FP8 linear (model/fp8.h).
#include "archipelago/model/fp8.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "archipelago/model/layers.h"
#include "archipelago/model/transformer.h"
#include "archipelago/model/torch_compat.h"

namespace archipelago::model {

namespace {

constexpr Fp8FormatSpec kE4M3Spec{"e4m3", 448.0, 3, -6};
constexpr Fp8FormatSpec kE5M2Spec{"e5m2", 57344.0, 2, -14};

// The names setFp8 converts: every projection of attention, SwiGLU (LLaMA
// "mlp", Qwen2-MoE "shared_expert") and Mixtral experts. Not the router
// (block_sparse_moe.gate) nor lm_head; the embedding is no linear.
const std::vector<std::string>& fp8LinearNames() {
  static const std::vector<std::string> names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj", "w1", "w2", "w3"};
  return names;
}

std::string lastComponent(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

int64_t ceilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// x2d [R, C] zero-padded to whole tiles and viewed as [nr, tr, nc, tc], so
// one broadcast applies a [nr, nc] per-tile tensor; zeros change no amax.
torch::Tensor tiled(const torch::Tensor& x2d, int64_t tr, int64_t tc) {
  const int64_t r = x2d.size(0), c = x2d.size(1);
  const int64_t nr = ceilDiv(r, tr), nc = ceilDiv(c, tc);
  auto padded = (nr * tr == r && nc * tc == c) ? x2d : torch::constant_pad_nd(x2d, {0, nc * tc - c, 0, nr * tr - r});
  return padded.reshape({nr, tr, nc, tc});
}

// The inverse of tiled(): back to [R, C].
torch::Tensor untiled(const torch::Tensor& t4, int64_t r, int64_t c) {
  return t4.reshape({t4.size(0) * t4.size(1), t4.size(2) * t4.size(3)}).narrow(0, 0, r).narrow(1, 0, c);
}

torch::Tensor perTile(const torch::Tensor& scale) { return scale.reshape({scale.size(0), 1, scale.size(1), 1}); }

Fp8Tensor quantizeByTileScale(const torch::Tensor& x2d, Fp8Format format, const torch::Tensor& scale, int64_t tr,
                              int64_t tc) {
  Fp8Tensor q;
  q.format = format;
  q.tile_rows = tr;
  q.tile_cols = tc;
  q.scale = scale;
  auto scaled = untiled(tiled(x2d.to(torch::kFloat), tr, tc) * perTile(scale), x2d.size(0), x2d.size(1));
  q.values = roundToFp8(scaled, format).to(torch::kBFloat16);
  return q;
}

}  // namespace

const Fp8FormatSpec& fp8Spec(Fp8Format format) { return format == Fp8Format::kE4M3 ? kE4M3Spec : kE5M2Spec; }

torch::Tensor roundToFp8(const torch::Tensor& x, Fp8Format format) {
  const Fp8FormatSpec& s = fp8Spec(format);
  auto v = x.to(torch::kFloat);
  auto a = v.abs();
  // Format values in the binade [2^e, 2^(e+1)) are spaced 2^(e - mantissa
  // bits) apart; below the smallest normal the spacing stays that of
  // min_exponent (subnormals). Clamping e from above only keeps the integer
  // arithmetic in range for huge inputs, which saturate anyway.
  auto e = std::get<1>(torch::frexp(a)).sub(1).clamp(s.min_exponent, 17);
  // 2^(e - m) built from its fp32 bit pattern: exact, unlike exp2 / pow.
  auto quantum = (e.sub(s.mantissa_bits - 127) * (1 << 23)).to(torch::kInt).view(torch::kFloat);
  // a / quantum is exact (a power-of-two divisor); torch::round rounds half
  // to even, which is the format's rounding.
  auto r = torch::round(a / quantum) * quantum;
  r = torch::copysign(torch::clamp_max(r, s.max), v);
  auto non_finite = format == Fp8Format::kE4M3 ? torch::full_like(v, std::numeric_limits<float>::quiet_NaN()) : v;
  return torch::where(torch::isfinite(v), r, non_finite);
}

torch::Tensor scaleFromAmax(const torch::Tensor& amax, Fp8Format format, const torch::Tensor& fallback) {
  auto a = amax.to(torch::kFloat);
  auto usable = torch::isfinite(a).logical_and(a > 0);
  return torch::where(usable, torch::full_like(a, fp8Spec(format).max) / a, fallback.to(torch::kFloat));
}

torch::Tensor Fp8Tensor::dequantize() const {
  return untiled(tiled(values.to(torch::kFloat), tile_rows, tile_cols) / perTile(scale), values.size(0),
                 values.size(1));
}

Fp8Tensor quantizeTiles(const torch::Tensor& x2d, Fp8Format format, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(x2d.dim() == 2, "quantizeTiles: expected a 2-D tensor, got ", x2d.sizes());
  TORCH_CHECK(tile_rows >= 1 && tile_cols >= 1, "quantizeTiles: tile ", tile_rows, "x", tile_cols);
  // A tile larger than the tensor is the tensor (per-tensor scaling).
  const int64_t tr = std::min(tile_rows, std::max<int64_t>(1, x2d.size(0)));
  const int64_t tc = std::min(tile_cols, std::max<int64_t>(1, x2d.size(1)));
  auto amax = tiled(x2d.to(torch::kFloat).abs(), tr, tc).amax({1, 3});
  auto scale = scaleFromAmax(amax, format, torch::ones_like(amax));
  return quantizeByTileScale(x2d, format, scale, tr, tc);
}

Fp8Tensor quantizeWithScale(const torch::Tensor& x2d, Fp8Format format, const torch::Tensor& scale) {
  TORCH_CHECK(x2d.dim() == 2, "quantizeWithScale: expected a 2-D tensor, got ", x2d.sizes());
  TORCH_CHECK(scale.numel() == 1, "quantizeWithScale: expected one scale, got ", scale.sizes());
  const int64_t tr = std::max<int64_t>(1, x2d.size(0)), tc = std::max<int64_t>(1, x2d.size(1));
  return quantizeByTileScale(x2d, format, scale.to(torch::kFloat).reshape({1, 1}), tr, tc);
}

// ---- delayed scaling ----------------------------------------------------------

AmaxHistory::AmaxHistory(int64_t length) : length_(length) {
  TORCH_CHECK(length >= 1, "amax history length ", length, "; expected >= 1");
  amax_ = torch::zeros({length}, torch::kFloat);
  scale_ = torch::ones({}, torch::kFloat);
  steps_ = torch::zeros({}, torch::kLong);
}

void AmaxHistory::moveTo(const torch::Device& device) {
  if (amax_.device() == device) return;
  amax_ = amax_.to(device);
  scale_ = scale_.to(device);
  if (pending_.defined()) pending_ = pending_.to(device);
}

void AmaxHistory::deferRecording() {
  if (!pending_.defined()) pending_ = torch::zeros({}, amax_.options());
}

torch::Tensor AmaxHistory::takePending() {
  TORCH_CHECK(deferred(), "AmaxHistory::takePending without deferred recording");
  auto out = pending_.clone();
  pending_.zero_();
  return out;
}

void AmaxHistory::commit(const torch::Tensor& amax) {
  torch::NoGradGuard no_grad;
  auto a = amax.to(amax_.options()).reshape({1});
  amax_.copy_(torch::cat({a, amax_.narrow(0, 0, length_ - 1)}));
  steps_.add_(1);
}

void AmaxHistory::restore(const torch::Tensor& amaxes, int64_t steps) {
  TORCH_CHECK(amaxes.numel() == length_, "amax history of ", amaxes.numel(), " steps; this one keeps ", length_);
  torch::NoGradGuard no_grad;
  amax_.copy_(amaxes.reshape({length_}).to(amax_.options()));
  steps_.fill_(steps);
}

int64_t AmaxHistory::steps() const { return steps_.defined() ? steps_.item<int64_t>() : 0; }
torch::Tensor AmaxHistory::amaxes() const { return amax_; }
torch::Tensor AmaxHistory::lastScale() const { return scale_; }

AmaxHistory AmaxHistory::fromState(const std::vector<torch::Tensor>& state) {
  TORCH_CHECK(state.size() == 3 || state.size() == 4, "AmaxHistory state: expected 3 or 4 tensors, got ", state.size());
  AmaxHistory h;
  h.length_ = state[0].size(0);
  h.amax_ = state[0];
  h.scale_ = state[1];
  h.steps_ = state[2];
  if (state.size() == 4) h.pending_ = state[3];
  return h;
}

torch::Tensor AmaxHistory::scaleFor(const torch::Tensor& x, Fp8Format format, bool record) {
  TORCH_CHECK(length_ >= 1, "AmaxHistory used before it was given a length");
  TORCH_CHECK(amax_.device() == x.device(), "AmaxHistory on ", amax_.device(), " used for a tensor on ", x.device(),
              "; its owner moves it first (AmaxHistory::moveTo)");
  auto amax = x.numel() > 0 ? x.abs().amax().to(torch::kFloat) : torch::zeros({}, amax_.options());
  auto scale = scaleFromAmax(steps() == 0 ? amax : amax_.max(), format, scale_);
  if (record && deferred()) {
    pending_.copy_(torch::maximum(pending_, amax));
    scale_.copy_(scale);
  } else if (record) {
    // Newest first; the oldest amax drops out. cat() builds the new
    // history before copy_ overwrites the old one.
    amax_.copy_(torch::cat({amax.reshape({1}), amax_.narrow(0, 0, length_ - 1)}));
    scale_.copy_(scale);
    steps_.add_(1);
  }
  return scale;
}

// ---- options and backend --------------------------------------------------------

core::Result<Fp8Options> parseFp8Options(const std::string& recipe, int64_t amax_history) {
  Fp8Options o;
  if (recipe == "delayed") {
    o.recipe = Fp8Recipe::kDelayed;
  } else if (recipe == "block") {
    o.recipe = Fp8Recipe::kBlock;
  } else {
    return core::invalidArgument("train.fp8_recipe: '" + recipe +
                                 "'; expected delayed (per-tensor amax history) or block (1x128 / 128x128 tiles)");
  }
  if (amax_history < 1) {
    return core::invalidArgument("train.fp8_amax_history: " + std::to_string(amax_history) +
                                 "; expected >= 1 (steps of amax kept for delayed scaling)");
  }
  o.amax_history = amax_history;
  return o;
}

std::string fp8RecipeName(Fp8Recipe recipe) { return recipe == Fp8Recipe::kDelayed ? "delayed" : "block"; }

namespace {

// ===== Real FP8 GEMMs: PyTorch >= 2.1 only ========================================
// Compiled only against a libtorch with float8 dtypes (the CUDA flavour). It
// could not be compiled or run where it was written (Debian's libtorch 1.13,
// no GPU); the version-specific calls are in torch_compat.h. Only
// per-tensor scales go to _scaled_mm (one scale per operand): tile-scaled
// operands (the block recipe) take the emulated GEMM.
#if ARCH_TORCH_HAS_FLOAT8
bool realGemmFits(const Fp8Tensor& a, const Fp8Tensor& b) {
  const bool per_tensor = a.scale.numel() == 1 && b.scale.numel() == 1;
  // cuBLASLt's FP8 GEMM needs every dimension to be a multiple of 16.
  bool aligned = true;
  for (const auto* t : {&a.values, &b.values}) aligned = aligned && t->size(0) % 16 == 0 && t->size(1) % 16 == 0;
  return per_tensor && aligned && compat::fp8GemmAvailable(a.values.device());
}

// y = a b^T with a [M, K] and b [N, K] row-major.
torch::Tensor realGemm(const Fp8Tensor& a, const Fp8Tensor& b, torch::ScalarType out_dtype) {
  // The bf16-held values are exact FP8 numbers, so these casts are exact.
  auto a8 = a.values.to(compat::float8Dtype(a.format == Fp8Format::kE4M3)).contiguous();
  // _scaled_mm wants its second operand column-major: b [N, K] row-major,
  // transposed, is exactly that.
  auto b8 = b.values.to(compat::float8Dtype(b.format == Fp8Format::kE4M3)).contiguous().t();
  // _scaled_mm multiplies the product by the dequantisation factors 1 / scale.
  return compat::scaledMm(a8, b8, a.scale.reshape({}).reciprocal(), b.scale.reshape({}).reciprocal(), out_dtype);
}
#else
bool realGemmFits(const Fp8Tensor&, const Fp8Tensor&) { return false; }
torch::Tensor realGemm(const Fp8Tensor&, const Fp8Tensor&, torch::ScalarType) {
  TORCH_CHECK(false, "FP8 GEMMs need a libtorch with float8 dtypes (PyTorch >= 2.1)");
  return {};
}
#endif
// ===== end of the real FP8 GEMMs ==================================================

// The transpose of a per-tensor-scaled operand (same scale): how the
// backward GEMMs hand their operands to realGemm's a b^T form.
Fp8Tensor transposed(const Fp8Tensor& q) {
  Fp8Tensor t = q;
  t.values = q.values.t().contiguous();
  t.scale = q.scale.t();
  std::swap(t.tile_rows, t.tile_cols);
  return t;
}

// Emulation: the dequantised operands are fp32 (each value / its tile's
// scale, rounded once), multiplied in fp32 and rounded to out_dtype once, as
// an FP8 tensor-core GEMM with fp32 accumulation and a scaled output does.
// These three are the linear's forward, input-gradient and weight-gradient
// products.
torch::Tensor gemmForward(const Fp8Tensor& x, const Fp8Tensor& w, torch::ScalarType out) {
  if (realGemmFits(x, w)) return realGemm(x, w, out);
  return x.dequantize().matmul(w.dequantize().t()).to(out);
}
torch::Tensor gemmGradInput(const Fp8Tensor& g, const Fp8Tensor& w, torch::ScalarType out) {
  if (realGemmFits(g, w)) return realGemm(g, transposed(w), out);
  return g.dequantize().matmul(w.dequantize()).to(out);
}
torch::Tensor gemmGradWeight(const Fp8Tensor& g, const Fp8Tensor& x, torch::ScalarType out) {
  if (realGemmFits(g, x)) return realGemm(transposed(g), transposed(x), out);
  return g.dequantize().t().matmul(x.dequantize()).to(out);
}

}  // namespace

std::string fp8Backend(const torch::Device& device, Fp8Recipe recipe) {
#if ARCH_TORCH_HAS_FLOAT8
  if (recipe == Fp8Recipe::kDelayed && compat::fp8GemmAvailable(device)) return "scaled_mm";
#else
  (void)device;
  (void)recipe;
#endif
  return "EMULATED (quantise-dequantise)";
}

// ---- the FP8 linear ----------------------------------------------------------------

namespace {

using torch::autograd::AutogradContext;

// What a backward pass needs besides the saved operands: the recipe, the
// gradient's amax history (tensors shared with the module, updated in place)
// and whether this pass records amaxes.
struct GradQuantizer {
  Fp8Recipe recipe;
  AmaxHistory history;
  bool record;

  Fp8Tensor operator()(const torch::Tensor& g2d) {
    if (recipe == Fp8Recipe::kBlock) return quantizeTiles(g2d, Fp8Format::kE5M2, 1, kFp8Tile);
    return quantizeWithScale(g2d, Fp8Format::kE5M2, history.scaleFor(g2d, Fp8Format::kE5M2, record));
  }
};

void saveFp8(AutogradContext* ctx, const std::string& key, const Fp8Tensor& q) {
  ctx->saved_data[key + ".values"] = q.values;
  ctx->saved_data[key + ".scale"] = q.scale;
  ctx->saved_data[key + ".tile"] = std::vector<int64_t>{q.tile_rows, q.tile_cols};
}

Fp8Tensor loadFp8(AutogradContext* ctx, const std::string& key) {
  Fp8Tensor q;
  q.values = ctx->saved_data[key + ".values"].toTensor();
  q.scale = ctx->saved_data[key + ".scale"].toTensor();
  auto tile = ctx->saved_data[key + ".tile"].toIntVector();
  q.tile_rows = tile[0];
  q.tile_cols = tile[1];
  q.format = Fp8Format::kE4M3;
  return q;
}

struct Fp8LinearFunction : public torch::autograd::Function<Fp8LinearFunction> {
  // x, w: the differentiable inputs; qx, qw: their quantised forms (made by
  // the caller, which owns the histories); grad: the backward's quantiser.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const Fp8Tensor& qx, const Fp8Tensor& qw, GradQuantizer grad) {
    saveFp8(ctx, "x", qx);
    saveFp8(ctx, "w", qw);
    ctx->saved_data["x.sizes"] = x.sizes().vec();
    ctx->saved_data["x.dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["w.dtype"] = static_cast<int64_t>(w.scalar_type());
    ctx->saved_data["grad.recipe"] = static_cast<int64_t>(grad.recipe);
    ctx->saved_data["grad.record"] = grad.record;
    if (grad.recipe == Fp8Recipe::kDelayed) {
      ctx->saved_data["grad.history"] = grad.history.state();
    }
    auto y = gemmForward(qx, qw, x.scalar_type());
    auto out_sizes = x.sizes().vec();
    out_sizes.back() = w.size(0);
    return y.view(out_sizes);
  }

  static torch::autograd::variable_list backward(AutogradContext* ctx, torch::autograd::variable_list grads) {
    const Fp8Tensor qx = loadFp8(ctx, "x");
    const Fp8Tensor qw = loadFp8(ctx, "w");
    GradQuantizer quantize{static_cast<Fp8Recipe>(ctx->saved_data["grad.recipe"].toInt()), AmaxHistory(),
                           ctx->saved_data["grad.record"].toBool()};
    if (quantize.recipe == Fp8Recipe::kDelayed) {
      quantize.history = AmaxHistory::fromState(ctx->saved_data["grad.history"].toTensorVector());
    }
    const auto x_sizes = ctx->saved_data["x.sizes"].toIntVector();
    const auto x_dtype = static_cast<torch::ScalarType>(ctx->saved_data["x.dtype"].toInt());
    const auto w_dtype = static_cast<torch::ScalarType>(ctx->saved_data["w.dtype"].toInt());
    const Fp8Tensor qg = quantize(grads[0].reshape({-1, qw.values.size(0)}));
    torch::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0)) grad_x = gemmGradInput(qg, qw, x_dtype).view(x_sizes);
    if (ctx->needs_input_grad(1)) grad_w = gemmGradWeight(qg, qx, w_dtype);
    return {grad_x, grad_w, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

Fp8LinearImpl::Fp8LinearImpl(const Fp8Options& options)
    : options_(options),
      input_(options.amax_history),
      weight_(options.amax_history),
      grad_(options.amax_history) {}

torch::Tensor Fp8LinearImpl::forward(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "FP8 linear: input ", x.sizes(),
              " does not match weight ", weight.sizes());
  const bool record = is_training();
  auto x2d = x.reshape({-1, x.size(-1)});
  // The histories live where the tensors they scale do, moved here, by
  // their owner, before the backward pass takes its copy of grad_.
  for (AmaxHistory* h : {&input_, &weight_, &grad_}) h->moveTo(x.device());
  Fp8Tensor qx, qw;
  {
    // Quantisation is part of the op, not of the graph: the custom backward
    // below defines the gradients.
    torch::NoGradGuard no_grad;
    if (options_.recipe == Fp8Recipe::kBlock) {
      qx = quantizeTiles(x2d, Fp8Format::kE4M3, 1, kFp8Tile);
      qw = quantizeTiles(weight, Fp8Format::kE4M3, kFp8Tile, kFp8Tile);
    } else {
      qx = quantizeWithScale(x2d, Fp8Format::kE4M3, input_.scaleFor(x2d, Fp8Format::kE4M3, record));
      qw = quantizeWithScale(weight, Fp8Format::kE4M3, weight_.scaleFor(weight, Fp8Format::kE4M3, record));
    }
  }
  return Fp8LinearFunction::apply(x, weight, qx, qw, GradQuantizer{options_.recipe, grad_, record});
}

// ---- attaching to a model ------------------------------------------------------------

Fp8LinearImpl* fp8Of(const torch::nn::Module& linear) {
  for (const auto& child : linear.children()) {
    if (auto* f = dynamic_cast<Fp8LinearImpl*>(child.get())) return f;
  }
  return nullptr;
}

std::vector<std::string> fp8LinearsOf(torch::nn::Module& root) {
  std::vector<std::string> out;
  const auto& names = fp8LinearNames();
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    if (dynamic_cast<LinearNoBiasImpl*>(item.value().get()) == nullptr) continue;
    if (std::find(names.begin(), names.end(), lastComponent(item.key())) != names.end()) out.push_back(item.key());
  }
  return out;
}

std::vector<std::string> fp8LinearsOf(const core::ModelConfig& config) {
  std::vector<std::string> out;
  const auto& names = fp8LinearNames();
  const std::string suffix = ".weight";
  for (const auto& [name, shape] : parameterLayout(config)) {
    if (!name.ends_with(suffix)) continue;
    const std::string linear = name.substr(0, name.size() - suffix.size());
    if (std::find(names.begin(), names.end(), lastComponent(linear)) != names.end()) out.push_back(linear);
  }
  return out;
}

int64_t setFp8(torch::nn::Module& root, const Fp8Options& options) {
  clearFp8(root);
  const auto modules = root.named_modules("", /*include_self=*/false);
  const std::vector<std::string> names = fp8LinearsOf(root);
  for (const auto& name : names) {
    auto& linear = *modules[name];
    auto fp8 = linear.register_module("fp8", Fp8Linear(options));
    fp8->train(linear.is_training());
  }
  return static_cast<int64_t>(names.size());
}

void clearFp8(torch::nn::Module& root) {
  for (const auto& item : root.named_modules("", /*include_self=*/true)) {
    if (fp8Of(*item.value()) != nullptr) item.value()->unregister_module("fp8");
  }
}

}  // namespace archipelago::model
