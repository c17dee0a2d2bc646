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
