#include "archipelago/runtime/calibrate.h"

#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/model/layers.h"

namespace archipelago::runtime {

plan::CalibrationProfile calibrateLocalMatmuls(const core::ModelConfig& model, int64_t rows, const std::string& kind,
                                               double min_seconds_per_shape) {
  plan::CalibrationProfile profile;
  auto resolved = model::resolveModelConfig(model);
  const core::ModelConfig c = resolved.isOk() ? *resolved : model;
  const int64_t ffn = c.ffn_hidden > 0 ? c.ffn_hidden : c.dim * 8 / 3;
  const int64_t vocab = c.vocab_size > 0 ? c.vocab_size : 256;
  // The GEMM shapes of one decoder step: projections, FFN, LM head.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{c.dim, c.dim}, {c.dim, ffn}, {ffn, c.dim}, {c.dim, vocab}};
  torch::NoGradGuard ng;
  for (const auto& [k, n] : shapes) {
    auto a = torch::randn({rows, k});
    auto b = torch::randn({k, n});
    (void)torch::mm(a, b);  // warm-up
    int iters = 0;
    const auto t0 = core::Clock::now();
    do {
      (void)torch::mm(a, b);
      ++iters;
    } while (core::secondsSince(t0) < min_seconds_per_shape);
    const double per = core::secondsSince(t0) / iters;
    profile.addMatmul(kind, plan::Dtype::kFp32, static_cast<double>(rows), static_cast<double>(n),
                      static_cast<double>(k), per);
  }
  return profile;
}

}  // namespace archipelago::runtime
