// A batch of random token ids (targets: the next id), seeded, for the
// in-process part tests (parts_test, sharded_params_test).
#pragma once

#include <cstdint>

#include <torch/torch.h>

#include "archipelago/data/sampler.h"

namespace archipelago::runtime::testutil {

inline data::Batch randomBatch(int64_t n, int64_t t, int64_t vocab, uint64_t seed) {
  torch::manual_seed(seed);
  data::Batch b;
  b.n = n;
  b.seq_len = t;
  auto ids = torch::randint(0, vocab, {n, t + 1}, torch::kLong).contiguous();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < t; ++j) {
      b.input.push_back(ids[i][j].item<int64_t>());
      b.target.push_back(ids[i][j + 1].item<int64_t>());
    }
  }
  return b;
}

}  // namespace archipelago::runtime::testutil
