#include "archipelago/runtime/outer_sync.h"

namespace archipelago::runtime {

core::Result<std::unique_ptr<OuterSync>> makeOuterSync(const OuterContext& ctx, const torch::Tensor& params) {
  (void)params;
  return core::unimplemented("strategy.kind '" + ctx.job->strategy.kind + "' is not available in this build yet");
}

}  // namespace archipelago::runtime
