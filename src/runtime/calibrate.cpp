#include "archipelago/runtime/calibrate.h"

#include <dirent.h>
#include <sched.h>
#include <unistd.h>

#include <cstdlib>

#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/model/layers.h"
#include "archipelago/model/transformer.h"
#include "archipelago/plan/local_predict.h"
#include "archipelago/plan/model_spec.h"
#include "archipelago/runtime/flat_params.h"

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

namespace {

// The fastest of several runs: the cost on an uncontended core (on a shared
// machine the others are inflated by time slices lost to other processes;
// the predictor models that sharing separately).
double fastest(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); }

// Runnable processes on the host right now that are not this job's, per
// scheduling group. With autogroup scheduling (sched_autogroup_enabled, the
// default for sessions) the kernel shares the cores fairly between groups,
// not processes, so a group's demand matters, not its process count.
// Skipped: this process, its parent (the local launcher), its siblings (the
// other local workers, whose first step may still run while rank 0
// calibrates) and our own group.
std::string autogroupOf(const std::string& pid) {
  std::ifstream in("/proc/" + pid + "/autogroup");
  std::string g;
  in >> g;
  return g;
}

std::map<std::string, double> otherRunnableNow(const std::string& own_group) {
  std::map<std::string, double> groups;
  const long self = static_cast<long>(::getpid()), parent = static_cast<long>(::getppid());
  DIR* dir = ::opendir("/proc");
  if (!dir) return groups;
  while (dirent* e = ::readdir(dir)) {
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (!end || *end != '\0' || pid <= 0 || pid == self || pid == parent) continue;
    std::ifstream in(std::string("/proc/") + e->d_name + "/stat");
    std::string line;
    if (!std::getline(in, line)) continue;
    const size_t rp = line.rfind(')');  // the command name may hold spaces
    if (rp == std::string::npos || rp + 4 >= line.size()) continue;
    const char state = line[rp + 2];
    const long ppid = std::strtol(line.c_str() + rp + 4, nullptr, 10);
    if (state != 'R' || (parent > 1 && ppid == parent)) continue;
    const std::string g = autogroupOf(e->d_name);
    if (!own_group.empty() && g == own_group) continue;
    groups[g.empty() ? "pid" + std::string(e->d_name) : g] += 1;
  }
  ::closedir(dir);
  return groups;
}

struct LoadSampler {
  std::string own = autogroupOf("self");
  std::map<std::string, double> sum;
  int n = 0;
  void sample() {
    for (const auto& [g, c] : otherRunnableNow(own)) sum[g] += c;
    ++n;
  }
  // Mean runnable processes per other group over the samples.
  std::vector<double> groups() const {
    std::vector<double> out;
    for (const auto& [g, c] : sum) out.push_back(n > 0 ? c / n : 0.0);
    std::sort(out.begin(), out.end());
    return out;
  }
};

struct FwdBwd {
  double fwd_s = 0;
  double bwd_s = 0;
};

// Forward (loss and the scalars the trainer reads) and backward of `net`
// on n random sequences, as the trainer's inner loop runs them.
FwdBwd timeModel(model::Transformer& net, FlatParams& flat, int64_t n, int64_t T, int64_t vocab, double min_s,
                 LoadSampler* load = nullptr) {
  auto input = torch::randint(0, vocab, {n, T}, torch::kInt64);
  auto target = torch::randint(0, vocab, {n, T}, torch::kInt64);
  std::vector<double> f, b;
  const auto t_all = core::Clock::now();
  for (int it = 0; it < 1000; ++it) {
    flat.zeroGrad();
    if (load && it > 0) load->sample();
    const auto t0 = core::Clock::now();
    auto out = net->lossAndStats(input, target);
    auto loss = out.ce_sum / static_cast<double>(n * T);
    if (out.aux_loss.defined()) loss = loss + out.aux_loss;
    (void)out.ce_sum.item<double>();
    const double tf = core::secondsSince(t0);
    const auto t1 = core::Clock::now();
    loss.backward();
    const double tb = core::secondsSince(t1);
    if (it == 0) continue;  // warm-up (allocations)
    f.push_back(tf);
    b.push_back(tb);
    if (it >= 5 && core::secondsSince(t_all) >= min_s) break;
  }
  return {fastest(f), fastest(b)};
}

double hostCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<double>(CPU_COUNT(&set));
  return static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace

core::Status calibrateLocalModel(const core::JobConfig& job, const std::vector<int64_t>& samples,
                                 const std::string& kind, plan::CalibrationProfile& profile,
                                 double min_seconds_per_point) {
  if (job.model.vocab_size <= 0) return core::invalidArgument("calibrateLocalModel: model.vocab_size is not resolved");
  const int64_t T = job.data.seq_len;
  const int64_t L = job.model.n_layers;
  ARCH_ASSIGN_OR_RETURN(plan::ModelSpec spec, plan::fromModelConfig(job.model));
  const std::string dtype = job.model.dtype.empty() ? "fp32" : job.model.dtype;
  // The full model and a copy with fewer layers: their difference is the
  // average decoder layer, the rest is embedding + final norm + head + loss.
  core::ModelConfig small = job.model;
  small.n_layers = L > 1 ? 1 : 2;
  ARCH_ASSIGN_OR_RETURN(auto full_net, model::buildModel(job.model, 1));
  ARCH_ASSIGN_OR_RETURN(auto small_net, model::buildModel(small, 1));
  FlatParams full_flat = FlatParams::bind(full_net->namedParameters());
  FlatParams small_flat = FlatParams::bind(small_net->namedParameters());
  std::vector<int64_t> sizes = samples;
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  sizes.erase(std::remove_if(sizes.begin(), sizes.end(), [](int64_t n) { return n < 1; }), sizes.end());
  if (sizes.empty()) return core::invalidArgument("calibrateLocalModel: no micro-batch size >= 1 to time");
  const double layers_diff = static_cast<double>(std::abs(L - small.n_layers));
  // Other runnable threads while we time (a shared machine): the timings
  // include their share of the cores; the predictor accounts for it.
  LoadSampler load;
  // Warm-up: allocator, thread pool, and (in the trainer) the other workers'
  // first step, which runs while rank 0 calibrates.
  (void)timeModel(full_net, full_flat, sizes.back(), T, job.model.vocab_size, 3 * min_seconds_per_point);
  for (int64_t n : sizes) {
    const FwdBwd a = timeModel(full_net, full_flat, n, T, job.model.vocab_size, min_seconds_per_point, &load);
    const FwdBwd b = timeModel(small_net, small_flat, n, T, job.model.vocab_size, min_seconds_per_point, &load);
    const FwdBwd& big = L > 1 ? a : b;
    const FwdBwd& little = L > 1 ? b : a;
    // Noise can make the difference tiny or negative: keep each part > 0.
    const double lf = std::max(1e-7, (big.fwd_s - little.fwd_s) / layers_diff);
    const double lb = std::max(1e-7, (big.bwd_s - little.bwd_s) / layers_diff);
    const double sl = static_cast<double>(small.n_layers);
    const double ef = std::max(1e-7, little.fwd_s - sl * lf), eb = std::max(1e-7, little.bwd_s - sl * lb);
    const double tokens = static_cast<double>(n * T);
    profile.addItemTiming(kind, plan::localPartKey("layer", spec, T, dtype), tokens, lf, lb);
    profile.addItemTiming(kind, plan::localPartKey("ends", spec, T, dtype), tokens, ef, eb);
  }
  // The optimizer step as the trainer runs it: gradient norm, then AdamW on
  // the flat buffers.
  {
    torch::NoGradGuard ng;
    FlatAdamW adam(job.train, 0, full_flat.numel());
    full_flat.grads().normal_();
    std::vector<double> t;
    const auto t_all = core::Clock::now();
    for (int it = 0; it < 1000; ++it) {
      if (it > 0) load.sample();
      const auto t0 = core::Clock::now();
      (void)full_flat.grads().norm().item<double>();
      adam.step(full_flat.params(), full_flat.grads(), full_flat.decayMask(), 1e-6);
      if (it > 0) t.push_back(core::secondsSince(t0));
      if (it >= 3 && core::secondsSince(t_all) >= 0.5 * min_seconds_per_point) break;
    }
    profile.device(kind).optimizer_s_per_param = fastest(t) / static_cast<double>(full_flat.numel());
  }
  profile.device(kind).host_cores = hostCores();
  auto& dev = profile.device(kind);
  dev.background_groups = load.groups();
  dev.background_procs = 0;
  for (double g : dev.background_groups) dev.background_procs += g;
  profile.device(kind).threads = torch::get_num_threads();
  return core::okStatus();
}

}  // namespace archipelago::runtime
