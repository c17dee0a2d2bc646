// Predicted step time of a local run (see local_predict.h): each worker runs
// forward+backward of its share of the global batch at the achieved FLOP/s
// of its device kind (calibration profile, else catalog derating), stretched
// by its emulated slowdown; gradients are reduced with a ring inside each
// island and across the emulated straits (every H steps for DiLoCo).
#include "archipelago/plan/local_predict.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "archipelago/plan/cost_model.h"
#include "archipelago/plan/model_spec.h"

namespace archipelago::plan {

core::Result<StepPrediction> predictStepTime(const core::JobConfig& job, int64_t vocab, const DeviceCatalog& catalog,
                                             const CalibrationProfile* profile) {
  core::ModelConfig mc = job.model;
  if (vocab > 0) mc.vocab_size = vocab;
  ARCH_ASSIGN_OR_RETURN(ModelSpec model, fromModelConfig(mc));
  if (vocab > 0) model.vocab = vocab;
  const auto& cl = job.cluster;
  const int64_t world = cl.worldSize();
  if (world < 1) return core::invalidArgument("predictStepTime: cluster has no workers");
  const int64_t seq = job.data.seq_len;
  const double global = static_cast<double>(job.train.global_batch);
  TrainSetup su;
  su.seq_len = seq;
  su.global_batch_tokens = job.train.global_batch * seq;
  su.compute_dtype = job.model.dtype == "fp32" ? Dtype::kFp32 : Dtype::kBf16;
  su.act_bytes = job.model.dtype == "fp32" ? 4 : 2;
  su.flash_attention = false;
  CostModel cm(model, su, profile);

  // Shares: fixed ones if given, else proportional to speed (1 / slowdown).
  std::vector<double> speed;
  std::vector<int> island_of;
  for (size_t i = 0; i < cl.islands.size(); ++i) {
    for (int64_t k = 0; k < cl.islands[i].count; ++k) {
      speed.push_back(1.0 / std::max(1e-9, cl.islands[i].slowdownOf(k)));
      island_of.push_back(static_cast<int>(i));
    }
  }
  double speed_sum = 0;
  for (double s : speed) speed_sum += s;
  StepPrediction p;
  double worst = 0;
  for (size_t r = 0; r < speed.size(); ++r) {
    const auto& is = cl.islands[static_cast<size_t>(island_of[r])];
    ARCH_ASSIGN_OR_RETURN(DeviceSpec dev, catalog.get(is.device));
    double share = global * speed[r] / speed_sum;
    if (!job.train.shares.empty() && job.train.shares.size() == speed.size()) {
      double tot = 0;
      for (double s : job.train.shares) tot += s;
      share = global * job.train.shares[r] / tot;
    }
    const int64_t mb = job.train.micro_batch > 0 ? job.train.micro_batch : std::max<int64_t>(1, std::llround(share));
    const double n_mb = std::max(1.0, std::ceil(share / static_cast<double>(mb)));
    StageLinks links;
    double t = 0;
    for (int64_t item = 0; item < cm.numItems(); ++item) {
      const ItemCost c = cm.itemCost(item, dev, links, 1, 1, std::max<int64_t>(1, std::llround(share / n_mb)), Recompute::kNone);
      t += c.fwd_s + c.bwd_s;
      p.model_flops += c.model_flops * n_mb;
    }
    t *= n_mb * (1.0 / speed[r]);
    worst = std::max(worst, t);
  }
  p.compute_s = worst;
  // Gradient reduction: fp32 gradients (or the codec on straits).
  const double params = model.totalParams();
  const DeviceCalibration* dc = profile ? profile->find(cl.islands[0].device) : nullptr;
  const double loop_bw = dc && dc->loopback_bandwidth > 0 ? dc->loopback_bandwidth : 1.0e9;
  const double grad_bytes = params * 4;
  double intra = 0;
  for (const auto& is : cl.islands) intra = std::max(intra, CostModel::allreduceTime(grad_bytes, is.count, loop_bw, 50e-6));
  double cross = 0;
  const int64_t n_isl = static_cast<int64_t>(cl.islands.size());
  if (n_isl > 1) {
    const std::string& codec = job.strategy.codec;
    const double eb = codec == "none" ? 4 : (codec == "bf16" || codec == "fp16") ? 2 : 1.0 + 4.0 / 256.0;
    double bw = 0, lat = 0;
    for (const auto& s : cl.straits) {
      if (bw == 0 || s.bandwidth < bw) bw = s.bandwidth;
      lat = std::max(lat, s.latency);
    }
    if (bw == 0) bw = cl.default_strait_bandwidth > 0 ? cl.default_strait_bandwidth : loop_bw;
    const double ring = 2.0 * static_cast<double>(n_isl - 1) / static_cast<double>(n_isl) * params * eb;
    cross = ring / bw + 2.0 * static_cast<double>(n_isl - 1) * lat;
    if (job.strategy.kind != "sync") cross /= static_cast<double>(std::max<int64_t>(job.strategy.inner_steps, 1));
  }
  // Inside an island every strategy reduces gradients each step.
  p.comm_s = intra + cross;
  ARCH_ASSIGN_OR_RETURN(DeviceSpec dev0, catalog.get(cl.islands[0].device));
  p.optimizer_s = cm.memoryTime(dev0, params * 4 * 4 * 2);  // fp32 weights, grads, m, v read+write
  p.overhead_s = dc ? dc->step_overhead_s : 0.0;
  p.total_s = p.compute_s + p.comm_s + p.optimizer_s + p.overhead_s;
  p.detail = fmt::format("predicted {:.1f} ms = compute {:.1f} + comm {:.1f} + optimizer {:.1f} + overhead {:.1f} ({}{})",
                         1e3 * p.total_s, 1e3 * p.compute_s, 1e3 * p.comm_s, 1e3 * p.optimizer_s, 1e3 * p.overhead_s,
                         profile && dc ? "calibrated" : "catalog derating", world > 1 ? "" : ", 1 worker");
  return p;
}

}  // namespace archipelago::plan
