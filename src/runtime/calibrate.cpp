#include "archipelago/runtime/calibrate.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>

#include <cstdlib>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/cpu_time.h"
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

// siblings: set to the number of this job's other workers (same parent)
// running right now.
std::map<std::string, double> otherRunnableNow(const std::string& own_group, double* siblings) {
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
    if (state != 'R') continue;
    if (parent > 1 && ppid == parent) {
      *siblings += 1;
      continue;
    }
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
  double siblings = 0;  // sum over samples of this job's other workers running
  int n = 0;
  double meanSiblings() const { return n > 0 ? siblings / n : 0.0; }
  void sample() {
    double sib = 0;
    for (const auto& [g, c] : otherRunnableNow(own, &sib)) sum[g] += c;
    siblings += sib;
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

// Seconds of one timed piece of work. With one intra-op thread per worker
// (the trainer's default) this is the CPU time of the calling thread
// (core::threadCpuSeconds): the cost of the work itself, not inflated by
// time slices lost to other processes on a shared host (the predictor
// models that sharing, once). With several intra-op threads it is the wall
// time.
using core::threadCpuSeconds;

// CPU seconds (sender + receiver thread) per byte sent over loopback TCP,
// in 1 MiB writes, as the workers' gradient buckets travel between them:
// their communication threads take this from the cores the computing
// workers share. 0 if a socket call fails.
double loopbackCpuPerByte() {
  constexpr size_t kChunk = size_t{1} << 20;
  constexpr size_t kTotal = size_t{64} << 20;
  const int lst = ::socket(AF_INET, SOCK_STREAM, 0);
  if (lst < 0) return 0.0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(lst, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(lst, 1) != 0 ||
      ::getsockname(lst, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(lst);
    return 0.0;
  }
  const int tx = ::socket(AF_INET, SOCK_STREAM, 0);
  if (tx < 0 || ::connect(tx, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (tx >= 0) ::close(tx);
    ::close(lst);
    return 0.0;
  }
  const int rx = ::accept(lst, nullptr, nullptr);
  ::close(lst);
  if (rx < 0) {
    ::close(tx);
    return 0.0;
  }
  double recv_cpu = 0;
  std::thread receiver([&] {
    std::vector<char> buf(kChunk);
    const double c0 = threadCpuSeconds();
    size_t got = 0;
    while (got < kTotal) {
      const ssize_t n = ::recv(rx, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    recv_cpu = threadCpuSeconds() - c0;
    if (got < kTotal) ::shutdown(rx, SHUT_RDWR);  // a failed receive must not leave the sender blocked
  });
  std::vector<char> buf(kChunk, 1);
  const double c0 = threadCpuSeconds();
  size_t sent = 0;
  while (sent < kTotal) {
    const ssize_t n = ::send(tx, buf.data(), std::min(kChunk, kTotal - sent), MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  const double send_cpu = threadCpuSeconds() - c0;
  ::shutdown(tx, SHUT_WR);
  receiver.join();
  ::close(tx);
  ::close(rx);
  return sent == kTotal ? (send_cpu + recv_cpu) / static_cast<double>(kTotal) : 0.0;
}

class PieceTimer {
 public:
  explicit PieceTimer(bool cpu) : cpu_(cpu) { reset(); }
  void reset() {
    wall0_ = core::Clock::now();
    cpu0_ = cpu_ ? threadCpuSeconds() : 0.0;
  }
  double seconds() const { return cpu_ ? threadCpuSeconds() - cpu0_ : core::secondsSince(wall0_); }

 private:
  bool cpu_;
  core::Clock::time_point wall0_;
  double cpu0_ = 0;
};

// The typical cost: the median of the runs (the fastest one is a lucky run
// and predicts a few percent low).
double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

struct FwdBwd {
  double fwd_s = 0;
  double bwd_s = 0;
};

// Forward (loss and the scalars the trainer reads) and backward of `net`
// on n sequences, as the trainer's inner loop runs them. Every run draws
// new tokens, as training does: an MoE router then sends a different number
// of rows to each expert every time (other GEMM shapes, other allocations).
FwdBwd fwdBwdOnce(model::Transformer& net, FlatParams& flat, int64_t n, int64_t T, int64_t vocab, bool cpu) {
  auto input = torch::randint(0, vocab, {n, T}, torch::kInt64);
  auto target = torch::randint(0, vocab, {n, T}, torch::kInt64);
  flat.zeroGrad();
  PieceTimer timer(cpu);
  auto out = net->lossAndStats(input, target);
  auto loss = out.ce_sum / static_cast<double>(n * T);
  if (out.aux_loss.defined()) loss = loss + out.aux_loss;
  (void)out.ce_sum.item<double>();
  if (out.aux_loss.defined()) (void)out.aux_loss.item<double>();
  FwdBwd r;
  r.fwd_s = timer.seconds();
  timer.reset();
  loss.backward();
  r.bwd_s = timer.seconds();
  return r;
}

// The optimizer step as the trainer runs it: gradient norm, then AdamW on
// the flat buffers.
double optimizerOnce(FlatParams& flat, FlatAdamW& adam, bool cpu) {
  torch::NoGradGuard ng;
  PieceTimer timer(cpu);
  (void)flat.grads().norm().item<double>();
  adam.step(flat.params(), flat.grads(), flat.decayMask(), 1e-6);
  return timer.seconds();
}

// Median forward and backward over >= 5 runs after one warm-up run, for at
// least min_s seconds.
FwdBwd timeModel(model::Transformer& net, FlatParams& flat, int64_t n, int64_t T, int64_t vocab, double min_s, bool cpu,
                 LoadSampler* load) {
  std::vector<double> f, b;
  const auto t_all = core::Clock::now();
  for (int it = 0; it < 1000; ++it) {
    if (load && it > 0) load->sample();
    const FwdBwd r = fwdBwdOnce(net, flat, n, T, vocab, cpu);
    if (it == 0) continue;  // warm-up (allocations)
    f.push_back(r.fwd_s);
    b.push_back(r.bwd_s);
    if (it >= 5 && core::secondsSince(t_all) >= min_s) break;
  }
  return {median(f), median(b)};
}

double hostCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<double>(CPU_COUNT(&set));
  return static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
}

// `copies` workers' steps (forward+backward of n sequences, then the
// optimizer) running at once on this host, each on its own model copy in
// its own thread (the workers are processes; what they share is the
// cores' caches, memory bandwidth and, with more copies than cores, the
// cores themselves). Returns the median CPU seconds per forward+backward
// and per optimizer step over runs during which every copy was running,
// and the spread of a copy's forward+backward from run to run.
struct CorunTimes {
  double compute_s = 0;
  double optimizer_s = 0;
  double compute_cv = 0;  // robust spread of a copy's runs around its own median, relative
};

core::Result<CorunTimes> timeCorun(const core::JobConfig& job, int copies, int64_t n, int runs) {
  struct Copy {
    model::Transformer net{nullptr};
    std::unique_ptr<FlatParams> flat;
    std::unique_ptr<FlatAdamW> adam;
    std::vector<double> compute, optimizer;
  };
  std::vector<Copy> cs(static_cast<size_t>(copies));
  for (int c = 0; c < copies; ++c) {
    auto& x = cs[static_cast<size_t>(c)];
    ARCH_ASSIGN_OR_RETURN(x.net, model::buildModel(job.model, 100 + static_cast<uint64_t>(c)));
    x.flat = std::make_unique<FlatParams>(FlatParams::bind(x.net->namedParameters()));
    x.adam = std::make_unique<FlatAdamW>(job.train, x.flat->numel());
  }
  std::atomic<int> ready{0}, enough{0};
  std::atomic<bool> stop{false};
  const int64_t T = job.data.seq_len, vocab = job.model.vocab_size;
  auto body = [&](Copy& x) {
    ready.fetch_add(1);
    while (ready.load() < copies) std::this_thread::yield();
    bool counted = false;
    for (int it = 0; it < 1000 && !stop.load(); ++it) {
      const FwdBwd r = fwdBwdOnce(x.net, *x.flat, n, T, vocab, true);
      const double o = optimizerOnce(*x.flat, *x.adam, true);
      if (stop.load()) break;  // a copy may have left during this run
      if (it == 0) continue;   // warm-up
      x.compute.push_back(r.fwd_s + r.bwd_s);
      x.optimizer.push_back(o);
      if (!counted && static_cast<int>(x.compute.size()) >= runs) {
        counted = true;
        if (enough.fetch_add(1) + 1 == copies) stop.store(true);
      }
    }
  };
  std::vector<std::thread> th;
  for (auto& x : cs) th.emplace_back(body, std::ref(x));
  for (auto& t : th) t.join();
  std::vector<double> comp, opt, dev;
  for (const auto& x : cs) {
    comp.insert(comp.end(), x.compute.begin(), x.compute.end());
    opt.insert(opt.end(), x.optimizer.begin(), x.optimizer.end());
    const double m = median(x.compute);
    for (double c : x.compute) dev.push_back(std::abs(c - m) / std::max(m, 1e-12));
  }
  // 1.4826 x the median absolute deviation: the standard deviation of a
  // normal spread, not pulled up by one preempted run.
  return CorunTimes{median(comp), median(opt), 1.4826 * median(dev)};
}

}  // namespace

core::Status calibrateLocalModel(const core::JobConfig& job, const std::vector<int64_t>& samples,
                                 const std::string& kind, plan::CalibrationProfile& profile,
                                 double min_seconds_per_point) {
  if (job.model.vocab_size <= 0) return core::invalidArgument("calibrateLocalModel: model.vocab_size is not resolved");
  const int64_t T = job.data.seq_len;
  ARCH_ASSIGN_OR_RETURN(plan::ModelSpec spec, plan::fromModelConfig(job.model));
  const std::string dtype = job.model.dtype.empty() ? "fp32" : job.model.dtype;
  const bool cpu = torch::get_num_threads() == 1;
  // The whole model as the trainer runs it (the prediction needs nothing
  // finer; differences of two noisy timings were a source of error).
  ARCH_ASSIGN_OR_RETURN(auto net, model::buildModel(job.model, 1));
  FlatParams flat = FlatParams::bind(net->namedParameters());
  std::vector<int64_t> sizes = samples;
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  sizes.erase(std::remove_if(sizes.begin(), sizes.end(), [](int64_t n) { return n < 1; }), sizes.end());
  if (sizes.empty()) return core::invalidArgument("calibrateLocalModel: no micro-batch size >= 1 to time");
  // Other runnable threads while we time (a shared machine).
  LoadSampler load;
  // Warm-up: allocator, thread pool, and (in the trainer) the other workers'
  // first step, which runs while rank 0 calibrates.
  // Only its side effects count (warm caches, grown heap): its timing and
  // any error are discarded; the timed points below meet an error again.
  (void)timeModel(net, flat, sizes.back(), T, job.model.vocab_size, 3 * min_seconds_per_point, cpu, nullptr);
  const std::string key = plan::localPartKey("model", spec, T, dtype);
  double alone_hi = 0;
  const auto wall0 = core::Clock::now();
  const double cpu0 = threadCpuSeconds();
  for (int64_t n : sizes) {
    const FwdBwd a = timeModel(net, flat, n, T, job.model.vocab_size, min_seconds_per_point, cpu, &load);
    profile.addItemTiming(kind, key, static_cast<double>(n * T), std::max(1e-7, a.fwd_s), std::max(1e-7, a.bwd_s));
    alone_hi = a.fwd_s + a.bwd_s;
  }
  // The share of a core this thread got meanwhile (other load on the host).
  double share = cpu ? (threadCpuSeconds() - cpu0) / std::max(1e-9, core::secondsSince(wall0)) : 0.0;
  FlatAdamW adam(job.train, flat.numel());
  {
    flat.grads().normal_();
    std::vector<double> t;
    const auto t_all = core::Clock::now();
    for (int it = 0; it < 1000; ++it) {
      if (it > 0) load.sample();
      const double s = optimizerOnce(flat, adam, cpu);
      if (it > 0) t.push_back(s);
      if (it >= 5 && core::secondsSince(t_all) >= 0.5 * min_seconds_per_point) break;
    }
    profile.device(kind).optimizer_s_per_param = median(t) / static_cast<double>(flat.numel());
  }
  auto& dev = profile.device(kind);
  dev.host_cores = hostCores();
  dev.background_groups = load.groups();
  dev.background_procs = 0;
  for (double g : dev.background_groups) dev.background_procs += g;
  dev.threads = torch::get_num_threads();
  // Without this job's other workers that ran meanwhile (a DiLoCo island
  // of its own does not wait for rank 0's calibration): as if the load
  // were B = cores/share - 1 busy threads, of which those were ours.
  if (share > 0 && share < 1) {
    const double others = std::max(0.0, dev.host_cores / share - 1.0 - load.meanSiblings());
    share = dev.host_cores / std::max(dev.host_cores, 1.0 + others);
  }
  dev.alone_core_share = std::min(1.0, share);
  // The workers of this host running at once: as many as cores, and all of
  // them when there are more workers than cores (single-threaded workers
  // only; the factors are CPU-time ratios).
  dev.corun.clear();
  if (job.cluster.worldSize() > 1) dev.loopback_cpu_per_byte = loopbackCpuPerByte();
  const int64_t workers = std::min<int64_t>(job.cluster.worldSize(), 8);
  if (cpu && workers > 1 && alone_hi > 0) {
    const double opt_alone = dev.optimizer_s_per_param * static_cast<double>(flat.numel());
    std::vector<int64_t> counts = {std::min<int64_t>(workers, static_cast<int64_t>(dev.host_cores))};
    if (workers > counts[0]) counts.push_back(workers);
    for (int64_t k : counts) {
      if (k < 2) continue;
      ARCH_ASSIGN_OR_RETURN(CorunTimes c, timeCorun(job, static_cast<int>(k), sizes.back(), 6));
      plan::DeviceCalibration::Corun r;
      r.threads = k;
      r.compute_factor = std::max(1.0, c.compute_s / alone_hi);
      r.optimizer_factor = opt_alone > 0 ? std::max(1.0, c.optimizer_s / opt_alone) : 1.0;
      r.compute_cv = c.compute_cv;
      dev.corun.push_back(r);
    }
  }
  return core::okStatus();
}

}  // namespace archipelago::runtime
