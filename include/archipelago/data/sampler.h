// Deterministic training samples and their split across ranks.
//
// Contract (docs/data.md "Sampler contract"):
//  - A sample is seq_len+1 consecutive tokens of a split's concatenated token
//    stream: input = tokens[0..seq_len), target = tokens[1..seq_len].
//    Slot k starts at token k*seq_len; there are (T-1)/seq_len slots.
//  - Global sample index g (0, 1, 2, ...) maps to pass p = g / slots and slot
//    perm_p(g % slots), where perm_p is a bijection keyed by (seed, p) and
//    computed on the fly (Feistel network + cycle walking; no O(N) state).
//    Sequential order (validation) uses slot = g % slots.
//  - A step's global batch is the B consecutive indices [pos, pos+B). Rank r
//    gets the slice shareRange(shares, r) of it; shares are integers >= 0
//    summing to B (uneven allowed). Concatenating the ranks' slices gives
//    the same B samples whatever the number of ranks.
//  - The position (samples consumed) is one integer; saving it and building a
//    new Sampler with setPosition() continues exactly.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/data/shard.h"

namespace archipelago::data {

// [begin, begin+count) of rank `rank` inside a global batch of sum(shares).
struct ShareRange {
  int64_t begin = 0;
  int64_t count = 0;
};
ShareRange shareRange(const std::vector<int64_t>& shares, int rank);

// The split itself (weights -> shares, the rebalancer's margin) is
// core::sharesFromWeights / core::worthRebalancing (core/shares.h).

// Token buffers for n samples, row-major [n, seq_len].
struct Batch {
  int64_t n = 0;
  int64_t seq_len = 0;
  std::vector<int64_t> indices;  // global sample indices
  std::vector<int64_t> input;
  std::vector<int64_t> target;
};

enum class SampleOrder { kShuffled, kSequential };

// Samples of one split. Holds a reference to the reader (which must outlive
// it). Const methods are thread-safe; the position cursor is not.
class Sampler {
 public:
  static core::Result<Sampler> create(const TokenReader& reader, uint64_t seed, int64_t seq_len,
                                      SampleOrder order = SampleOrder::kShuffled);

  int64_t seqLen() const { return seq_len_; }
  // Samples per pass over the split.
  int64_t slotsPerPass() const { return slots_; }
  // First token (in the split's stream) of global sample g.
  int64_t sampleStart(int64_t g) const;
  // Writes sample g's seq_len inputs and seq_len targets.
  void sample(int64_t g, int64_t* input, int64_t* target) const;

  // Stateless: rank `rank`'s slice of the global batch that starts at sample
  // `position` (global batch size = sum(shares)).
  Batch batchAt(int64_t position, const std::vector<int64_t>& shares, int rank) const;
  // Stateless, for a constant global batch: position = step * sum(shares).
  Batch batchForRank(int64_t step, const std::vector<int64_t>& shares, int rank) const;

  // Cursor: nextBatch returns batchAt(position(), ...) and advances the
  // position by sum(shares). Every rank calls it with the same shares.
  Batch nextBatch(const std::vector<int64_t>& shares, int rank);
  int64_t position() const { return position_; }
  void setPosition(int64_t position) { position_ = position; }

 private:
  Sampler(const TokenReader* reader, uint64_t seed, int64_t seq_len, SampleOrder order, int64_t slots);
  uint64_t permute(uint64_t pass, uint64_t slot) const;

  const TokenReader* reader_;
  uint64_t seed_;
  int64_t seq_len_;
  SampleOrder order_;
  int64_t slots_;
  int domain_bits_;  // Feistel domain is 2^domain_bits >= slots_
  int64_t position_ = 0;
};

}  // namespace archipelago::data
