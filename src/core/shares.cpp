#include "archipelago/core/shares.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

namespace archipelago::core {

double initialShareWeight(const TrainConfig& train, const WorkerInfo& w) {
  const auto r = static_cast<size_t>(w.rank);
  if (r < train.shares.size()) return train.shares[r];
  // What is known before a step has run: a worker computes on at most its
  // intra-op threads' cores, and no more than its cgroup quota lets it
  // (runtime/cpu_quota.h). Both are upper bounds (a small GEMM does not
  // scale to every thread, a shared host may give less than the quota);
  // the rebalancer replaces them with measured speeds from its first
  // decision on, as it does for the compute dtype.
  double cores = static_cast<double>(std::max<int64_t>(1, w.threads));
  if (w.cpu_quota > 0) cores = std::min(cores, w.cpu_quota);
  return cores / w.slowdown;
}

Result<std::vector<int64_t>> sharesFromWeights(const std::vector<double>& weights, int64_t total) {
  const int64_t n = static_cast<int64_t>(weights.size());
  if (n == 0) return invalidArgument("shares: no ranks given");
  if (total < n) {
    return invalidArgument("shares: global batch " + std::to_string(total) + " is smaller than the " +
                           std::to_string(n) + " ranks; every rank needs at least one sample");
  }
  double sum_w = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double w = weights[static_cast<size_t>(i)];
    if (!(w > 0) || !std::isfinite(w)) {
      return invalidArgument("shares: weight of rank " + std::to_string(i) + " is " + std::to_string(w) +
                             "; expected a finite number > 0");
    }
    sum_w += w;
  }
  std::vector<double> quota(static_cast<size_t>(n));
  std::vector<int64_t> s(static_cast<size_t>(n));
  int64_t sum = 0;
  for (size_t i = 0; i < quota.size(); ++i) {
    quota[i] = static_cast<double>(total) * weights[i] / sum_w;
    s[i] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(quota[i])));
    sum += s[i];
  }
  // Too many (only possible through the >= 1 floor): take from the most
  // over-allocated rank that can give. Too few: largest remainder first.
  while (sum > total) {
    size_t best = quota.size();
    for (size_t i = 0; i < quota.size(); ++i) {
      if (s[i] > 1 && (best == quota.size() || static_cast<double>(s[i]) - quota[i] >
                                                    static_cast<double>(s[best]) - quota[best])) {
        best = i;
      }
    }
    ARCH_CHECK(best < quota.size());
    --s[best];
    --sum;
  }
  while (sum < total) {
    size_t best = 0;
    for (size_t i = 1; i < quota.size(); ++i) {
      if (quota[i] - static_cast<double>(s[i]) > quota[best] - static_cast<double>(s[best])) best = i;
    }
    ++s[best];
    ++sum;
  }
  return s;
}

double shareStepTime(const std::vector<int64_t>& shares, const std::vector<double>& seconds_per_sample) {
  ARCH_CHECK_MSG(shares.size() == seconds_per_sample.size(), "one time per sample for every share");
  double t = 0;
  for (size_t i = 0; i < shares.size(); ++i) t = std::max(t, static_cast<double>(shares[i]) * seconds_per_sample[i]);
  return t;
}

bool worthRebalancing(const std::vector<int64_t>& current, const std::vector<int64_t>& proposed,
                      const std::vector<double>& seconds_per_sample, double min_gain) {
  if (current == proposed) return false;
  if (current.size() != proposed.size() || current.size() != seconds_per_sample.size()) return true;
  const int64_t cur_sum = std::accumulate(current.begin(), current.end(), int64_t{0});
  const int64_t new_sum = std::accumulate(proposed.begin(), proposed.end(), int64_t{0});
  if (cur_sum != new_sum || *std::min_element(current.begin(), current.end()) < 1) return true;
  for (double s : seconds_per_sample) {
    if (!(s > 0) || !std::isfinite(s)) return false;  // no measurement yet: nothing to predict with
  }
  return shareStepTime(proposed, seconds_per_sample) * (1.0 + min_gain) < shareStepTime(current, seconds_per_sample);
}

void SpeedEstimate::observe(double seconds, int64_t samples) {
  if (samples < 1 || !(seconds >= 0) || !std::isfinite(seconds)) return;
  const double x = seconds / static_cast<double>(samples);
  ema_ = ema_ == 0 ? x : 0.7 * ema_ + 0.3 * x;
  period_s_ += seconds;
  period_samples_ += samples;
}

double SpeedEstimate::value() const {
  if (!period_mean_) return ema_;
  return period_samples_ > 0 ? period_s_ / static_cast<double>(period_samples_) : 0.0;
}

void SpeedEstimate::endPeriod() {
  period_s_ = 0;
  period_samples_ = 0;
}

Result<std::vector<int64_t>> rebalancedShares(const std::vector<int64_t>& current,
                                              const std::vector<double>& seconds_per_sample, int64_t total) {
  std::vector<double> weights;
  weights.reserve(seconds_per_sample.size());
  for (double s : seconds_per_sample) weights.push_back(s > 0 ? 1.0 / s : 1.0);
  ARCH_ASSIGN_OR_RETURN(auto proposed, sharesFromWeights(weights, total));
  if (!worthRebalancing(current, proposed, seconds_per_sample)) return current;
  return proposed;
}

}  // namespace archipelago::core
