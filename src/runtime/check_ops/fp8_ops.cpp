// The FP8 linear (model/fp8.h) on the device, both recipes, against fp64
// products of the same quantised operands. The operands are quantised on
// the CPU by the same exact rules (quantisation is exact arithmetic, so a
// device must reproduce it bit for bit); what remains is the GEMM's
// accumulation and the bf16 output: r = 2, n = the longest sum.
#include <cmath>

#include "archipelago/model/fp8.h"
#include "runtime/check_ops/op_case.h"

namespace archipelago::runtime::check_ops {

namespace {

using model::Fp8Format;
using model::Fp8Recipe;

// x [M, K] with K not a multiple of 128 (the block recipe's short last tile)
// but of 16 (what an FP8 tensor-core GEMM needs).
struct Fp8Run {
  torch::Tensor y, grad;          // device: output; input and weight gradients, flattened
  torch::Tensor y_ref, grad_ref;  // fp64
  torch::Tensor grad_norm;        // per element: the largest reference value of its gradient
  int64_t reduction = 0;
};

// The first step's quantisation of each operand under `recipe` (delayed
// scaling with an empty history scales by the tensor's own amax).
model::Fp8Tensor quantizeFirstStep(const torch::Tensor& t, Fp8Format f, Fp8Recipe recipe, bool weight) {
  if (recipe == Fp8Recipe::kBlock) {
    return model::quantizeTiles(t, f, weight ? model::kFp8Tile : 1, model::kFp8Tile);
  }
  auto amax = t.abs().amax().to(torch::kFloat);
  return model::quantizeWithScale(t, f, model::scaleFromAmax(amax, f, torch::ones({})));
}

torch::Tensor dequantized(const torch::Tensor& t, Fp8Format f, Fp8Recipe recipe, bool weight) {
  return quantizeFirstStep(t.to(torch::kFloat), f, recipe, weight).dequantize().to(torch::kDouble);
}

Fp8Run fp8Run(const OpContext& c, Fp8Recipe recipe) {
  const int64_t m = c.size(16, 256), k = c.size(160, 320), n = c.size(48, 192);
  auto x = c.input({m, k}, 1.0, "fp8.x", torch::kBFloat16);
  auto w = c.input({n, k}, 1.0 / std::sqrt(static_cast<double>(k)), "fp8.w", torch::kBFloat16);
  auto g = c.input({m, n}, 1e-3, "fp8.grad", torch::kBFloat16);
  model::Fp8Options options;
  options.recipe = recipe;
  model::Fp8Linear linear(options);
  auto xl = x.dev.detach().clone().requires_grad_(true);
  auto wl = w.dev.detach().clone().requires_grad_(true);
  auto y = linear->forward(xl, wl);
  y.backward(g.dev);

  auto xd = dequantized(x.ref, Fp8Format::kE4M3, recipe, false);
  auto wd = dequantized(w.ref, Fp8Format::kE4M3, recipe, true);
  auto gd = dequantized(g.ref, Fp8Format::kE5M2, recipe, false);
  auto gx = gd.mm(wd), gw = gd.t().mm(xd);
  Fp8Run run;
  run.y = y;
  run.y_ref = xd.mm(wd.t());
  run.grad = torch::cat({xl.grad().reshape({-1}).to(torch::kCPU), wl.grad().reshape({-1}).to(torch::kCPU)});
  run.grad_ref = torch::cat({gx.reshape({-1}), gw.reshape({-1})});
  run.grad_norm = torch::cat({torch::full({gx.numel()}, gx.abs().max().item<double>(), torch::kDouble),
                              torch::full({gw.numel()}, gw.abs().max().item<double>(), torch::kDouble)});
  run.reduction = std::max({m, k, n});
  return run;
}

OpResult forward(const OpContext& c, Fp8Recipe recipe) {
  auto run = fp8Run(c, recipe);
  return {run.y, run.y_ref, {}, "fp8", 2, run.reduction, "bf16", model::fp8Backend(c.device, recipe)};
}

OpResult backward(const OpContext& c, Fp8Recipe recipe) {
  auto run = fp8Run(c, recipe);
  return {run.grad, run.grad_ref, run.grad_norm, "fp8", 2, run.reduction, "bf16", model::fp8Backend(c.device, recipe)};
}

}  // namespace

std::vector<OpDef> fp8Ops() {
  return {{"fp8_linear_delayed", [](const OpContext& c) { return forward(c, Fp8Recipe::kDelayed); }},
          {"fp8_linear_delayed_grad", [](const OpContext& c) { return backward(c, Fp8Recipe::kDelayed); }},
          {"fp8_linear_block", [](const OpContext& c) { return forward(c, Fp8Recipe::kBlock); }},
          {"fp8_linear_block_grad", [](const OpContext& c) { return backward(c, Fp8Recipe::kBlock); }}};
}

}  // namespace archipelago::runtime::check_ops
