// A prepared dataset directory opened for training: manifest + memory-mapped
// train/val streams (checksums verified) + tokenizer. This is what the
// runtime holds; samplers are made from it.
//
//   ARCH_ASSIGN_OR_RETURN(auto ds, data::PreparedDataset::open(dir));
//   ARCH_ASSIGN_OR_RETURN(auto train, ds->trainSampler(seed, seq_len));
//   train.setPosition(saved_position);
//   data::Batch b = train.nextBatch(shares, rank);   // b.input, b.target: [n, seq_len] int64
//   ARCH_ASSIGN_OR_RETURN(auto val, ds->valSampler(seq_len));
//   data::Batch v = val.batchAt(i * B, shares, rank); // i-th validation batch
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/data/manifest.h"
#include "archipelago/data/sampler.h"
#include "archipelago/data/shard.h"
#include "archipelago/data/tokenizer.h"

namespace archipelago::data {

class PreparedDataset {
 public:
  static core::Result<std::unique_ptr<PreparedDataset>> open(const std::filesystem::path& dir,
                                                             bool verify_checksums = true);
  // The job file's `data:` section: opens cfg.dir, or, when it holds no
  // manifest and cfg.inputs is set, prepares it first (tokenizer, vocab,
  // val_fraction, seed from cfg).
  static core::Result<std::unique_ptr<PreparedDataset>> openOrPrepare(const core::DataConfig& cfg,
                                                                      bool progress = true);

  const Manifest& manifest() const { return manifest_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  int64_t vocabSize() const { return manifest_.vocab_size; }
  const TokenReader& train() const { return *train_; }
  // Null when the validation split is empty.
  const TokenReader* val() const { return val_.get(); }

  // Shuffled training samples (seed picks the order).
  core::Result<Sampler> trainSampler(uint64_t seed, int64_t seq_len) const;
  // Sequential validation samples; kFailedPrecondition if the split is too small.
  core::Result<Sampler> valSampler(int64_t seq_len) const;

 private:
  Manifest manifest_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<TokenReader> train_;
  std::unique_ptr<TokenReader> val_;
};

}  // namespace archipelago::data
