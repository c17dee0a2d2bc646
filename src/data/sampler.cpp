#include "archipelago/data/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "archipelago/core/hash.h"

namespace archipelago::data {

ShareRange shareRange(const std::vector<int64_t>& shares, int rank) {
  ARCH_CHECK_MSG(rank >= 0 && rank < static_cast<int>(shares.size()), "rank outside the share list");
  ShareRange r;
  for (int i = 0; i < rank; ++i) {
    ARCH_CHECK_MSG(shares[static_cast<size_t>(i)] >= 0, "negative share");
    r.begin += shares[static_cast<size_t>(i)];
  }
  r.count = shares[static_cast<size_t>(rank)];
  ARCH_CHECK_MSG(r.count >= 0, "negative share");
  return r;
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
    if (!(s > 0) || !std::isfinite(s)) return true;  // no measurement yet: the caller's weights decide
  }
  return shareStepTime(proposed, seconds_per_sample) * (1.0 + min_gain) < shareStepTime(current, seconds_per_sample);
}

core::Result<std::vector<int64_t>> sharesFromWeights(const std::vector<double>& weights, int64_t global_batch) {
  const int64_t n = static_cast<int64_t>(weights.size());
  if (n == 0) return core::invalidArgument("shares: no ranks given");
  if (global_batch < n) {
    return core::invalidArgument("shares: global batch " + std::to_string(global_batch) + " is smaller than the " +
                                 std::to_string(n) + " ranks; every rank needs at least one sample");
  }
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    double w = weights[static_cast<size_t>(i)];
    if (!(w > 0) || !std::isfinite(w)) {
      return core::invalidArgument("shares: weight of rank " + std::to_string(i) + " is " + std::to_string(w) +
                                   "; expected a finite number > 0");
    }
    total += w;
  }
  std::vector<double> quota(static_cast<size_t>(n));
  std::vector<int64_t> s(static_cast<size_t>(n));
  int64_t sum = 0;
  for (size_t i = 0; i < quota.size(); ++i) {
    quota[i] = static_cast<double>(global_batch) * weights[i] / total;
    s[i] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(quota[i])));
    sum += s[i];
  }
  // Too many (only possible through the >= 1 floor): take from the most
  // over-allocated rank that can give. Too few: largest remainder first.
  // Ties go to the lower rank, so the result is deterministic.
  while (sum > global_batch) {
    size_t best = quota.size();
    for (size_t i = 0; i < quota.size(); ++i) {
      if (s[i] > 1 && (best == quota.size() || s[i] - quota[i] > s[best] - quota[best])) best = i;
    }
    ARCH_CHECK(best < quota.size());
    --s[best];
    --sum;
  }
  while (sum < global_batch) {
    size_t best = 0;
    for (size_t i = 1; i < quota.size(); ++i) {
      if (quota[i] - s[i] > quota[best] - s[best]) best = i;
    }
    ++s[best];
    ++sum;
  }
  return s;
}

core::Result<Sampler> Sampler::create(const TokenReader& reader, uint64_t seed, int64_t seq_len, SampleOrder order) {
  if (seq_len < 1) return core::invalidArgument("seq_len " + std::to_string(seq_len) + " must be >= 1");
  int64_t slots = reader.size() > 0 ? (reader.size() - 1) / seq_len : 0;
  if (slots < 1) {
    return core::failedPrecondition("split has " + std::to_string(reader.size()) + " tokens, fewer than one sample of " +
                                    std::to_string(seq_len + 1) + " tokens; use a shorter seq_len or more data");
  }
  return Sampler(&reader, seed, seq_len, order, slots);
}

Sampler::Sampler(const TokenReader* reader, uint64_t seed, int64_t seq_len, SampleOrder order, int64_t slots)
    : reader_(reader), seed_(seed), seq_len_(seq_len), order_(order), slots_(slots) {
  int bits = 2;
  while ((int64_t{1} << bits) < slots_) ++bits;
  domain_bits_ = bits + (bits & 1);  // balanced Feistel halves
}

// A keyed bijection on [0, 2^domain_bits) (4-round balanced Feistel network),
// restricted to [0, slots) by cycle walking: re-apply until the value lands
// inside. Walking stays inside the cycle of the start value, so the
// restriction is itself a bijection. Expected walks < 4.
uint64_t Sampler::permute(uint64_t pass, uint64_t slot) const {
  const int half = domain_bits_ / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  const uint64_t key = core::mix64(seed_ ^ core::mix64(pass ^ 0x5a17e5a17e5a17e5ULL));
  uint64_t x = slot;
  do {
    uint64_t l = x >> half, r = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      uint64_t f = core::mix64(key + round * 0x9e3779b97f4a7c15ULL + r) & mask;
      uint64_t nl = r;
      r = l ^ f;
      l = nl;
    }
    x = (l << half) | r;
  } while (x >= static_cast<uint64_t>(slots_));
  return x;
}

int64_t Sampler::sampleStart(int64_t g) const {
  ARCH_CHECK_MSG(g >= 0, "negative sample index");
  int64_t pass = g / slots_;
  int64_t j = g % slots_;
  int64_t slot = order_ == SampleOrder::kShuffled
                     ? static_cast<int64_t>(permute(static_cast<uint64_t>(pass), static_cast<uint64_t>(j)))
                     : j;
  return slot * seq_len_;
}

void Sampler::sample(int64_t g, int64_t* input, int64_t* target) const {
  int64_t start = sampleStart(g);
  // Targets are the inputs shifted by one token.
  reader_->read(start, std::span<int64_t>(input, static_cast<size_t>(seq_len_)));
  reader_->read(start + 1, std::span<int64_t>(target, static_cast<size_t>(seq_len_)));
}

Batch Sampler::batchAt(int64_t position, const std::vector<int64_t>& shares, int rank) const {
  ShareRange r = shareRange(shares, rank);
  Batch b;
  b.n = r.count;
  b.seq_len = seq_len_;
  b.indices.resize(static_cast<size_t>(r.count));
  b.input.resize(static_cast<size_t>(r.count * seq_len_));
  b.target.resize(static_cast<size_t>(r.count * seq_len_));
  for (int64_t k = 0; k < r.count; ++k) {
    int64_t g = position + r.begin + k;
    b.indices[static_cast<size_t>(k)] = g;
    sample(g, b.input.data() + k * seq_len_, b.target.data() + k * seq_len_);
  }
  return b;
}

Batch Sampler::batchForRank(int64_t step, const std::vector<int64_t>& shares, int rank) const {
  int64_t global = std::accumulate(shares.begin(), shares.end(), int64_t{0});
  return batchAt(step * global, shares, rank);
}

Batch Sampler::nextBatch(const std::vector<int64_t>& shares, int rank) {
  Batch b = batchAt(position_, shares, rank);
  position_ += std::accumulate(shares.begin(), shares.end(), int64_t{0});
  return b;
}

}  // namespace archipelago::data
