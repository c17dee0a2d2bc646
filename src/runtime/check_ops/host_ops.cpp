// The training loop's operators around the model: the AdamW step on the
// device's flat fp32 master weights, and each comm codec's round trip, which
// takes a device tensor through host memory (where the codecs run) and back.
#include <cmath>
#include <span>

#include "archipelago/comm/codec.h"
#include "archipelago/core/config.h"
#include "archipelago/runtime/flat_params.h"
#include "runtime/check_ops/op_case.h"

namespace archipelago::runtime::check_ops {

namespace {

// Three AdamW steps (runtime::FlatAdamW, decoupled weight decay on half of
// the elements) against the update written out in fp64. Master weights and
// optimizer state are fp32 in every compute dtype. r = 8: the ~ten fp32
// roundings of one update, all relative to the update, not the weight;
// n = 3 steps.
OpResult adamw(const OpContext& c) {
  const int64_t n = c.size(64, 4096), steps = 3;
  const double lr = 1e-2;
  core::TrainConfig cfg;
  cfg.weight_decay = 0.1;
  auto p = c.input({n}, 1.0, "adamw.param", torch::kFloat);
  auto mask = torch::remainder(torch::arange(n, torch::kLong), 2).to(torch::kFloat);
  FlatAdamW opt(cfg, n, c.device);
  auto param = p.dev.clone();
  auto ref = p.ref.clone();
  auto m = torch::zeros_like(ref), v = torch::zeros_like(ref);
  const auto decay = mask.to(torch::kDouble);
  for (int64_t t = 1; t <= steps; ++t) {
    auto g = c.input({n}, 0.1, "adamw.grad" + std::to_string(t), torch::kFloat);
    opt.step(param, g.dev, mask.to(c.device), lr);
    ref = ref - lr * cfg.weight_decay * decay * ref;
    m = cfg.beta1 * m + (1 - cfg.beta1) * g.ref;
    v = cfg.beta2 * v + (1 - cfg.beta2) * g.ref * g.ref;
    const double bc1 = 1 - std::pow(cfg.beta1, static_cast<double>(t));
    const double bc2 = 1 - std::pow(cfg.beta2, static_cast<double>(t));
    ref = ref - (lr / bc1) * m / (torch::sqrt(v / bc2) + cfg.adam_eps);
  }
  return {param, ref, {}, "fp32", 8, steps};
}

// Round trip of a codec (comm/codec.h) from a device tensor through host
// memory and back. Errors are relative to what the format promises: the
// block's amax for the scaled codecs (one scale per kCodecBlockSize
// values), the value itself (but at least the smallest normal, below which
// the spacing is absolute) for bf16 / fp16. r = 2: the value's rounding and
// the scale's; n = 0 (no sum).
OpResult codecRoundTrip(const OpContext& c, comm::CodecKind kind) {
  const int64_t n = c.size(1000, 65536);  // not a multiple of the block: a short last block
  auto base = c.input({n}, 1.0, "codec.x", torch::kFloat);
  // An outlier every 97 values (times 64: exact in fp32), so blocks differ in scale.
  auto outliers = torch::where(torch::remainder(torch::arange(n), 97) == 0, 64.0, 1.0);
  Operand x{base.dev * outliers.to(torch::kFloat).to(c.device), base.ref * outliers.to(torch::kDouble)};
  auto host = x.dev.to(torch::kCPU).contiguous().clone();
  comm::roundTrip(kind, std::span<float>(host.data_ptr<float>(), static_cast<size_t>(n)));
  auto back = host.to(c.device);

  torch::Tensor norm;
  auto a = x.ref.abs();
  if (kind == comm::CodecKind::kBF16 || kind == comm::CodecKind::kFP16) {
    const double min_normal = kind == comm::CodecKind::kFP16 ? std::ldexp(1.0, -14) : std::ldexp(1.0, -126);
    norm = a.clamp_min(min_normal);
  } else {
    const int64_t block = static_cast<int64_t>(comm::kCodecBlockSize);
    const int64_t blocks = (n + block - 1) / block;
    auto amax = torch::constant_pad_nd(a, {0, blocks * block - n}).reshape({blocks, block}).amax(1);
    norm = amax.repeat_interleave(block).narrow(0, 0, n);
  }
  return {back, x.ref, norm, std::string(comm::codecName(kind)), 2, 0};
}

template <comm::CodecKind kKind>
OpResult codecOp(const OpContext& c) {
  return codecRoundTrip(c, kKind);
}

}  // namespace

std::vector<OpDef> hostOps() {
  return {{"adamw", adamw},
          {"codec_bf16", codecOp<comm::CodecKind::kBF16>},
          {"codec_fp16", codecOp<comm::CodecKind::kFP16>},
          {"codec_int8", codecOp<comm::CodecKind::kInt8>},
          {"codec_fp8_e4m3", codecOp<comm::CodecKind::kFP8E4M3>},
          {"codec_fp8_e5m2", codecOp<comm::CodecKind::kFP8E5M2>}};
}

}  // namespace archipelago::runtime::check_ops
