#include "archipelago/data/dataset.h"

#include "archipelago/data/prepare.h"

namespace archipelago::data {

core::Result<std::unique_ptr<PreparedDataset>> PreparedDataset::open(const std::filesystem::path& dir,
                                                                     bool verify_checksums) {
  std::unique_ptr<PreparedDataset> ds(new PreparedDataset());
  ARCH_ASSIGN_OR_RETURN(ds->manifest_, loadManifest(dir));
  ARCH_ASSIGN_OR_RETURN(ds->tokenizer_, loadTokenizer(ds->manifest_));
  ARCH_ASSIGN_OR_RETURN(ds->train_, TokenReader::open(ds->manifest_, ds->manifest_.train, verify_checksums));
  if (!ds->manifest_.val.shards.empty()) {
    ARCH_ASSIGN_OR_RETURN(ds->val_, TokenReader::open(ds->manifest_, ds->manifest_.val, verify_checksums));
  }
  return ds;
}

core::Result<std::unique_ptr<PreparedDataset>> PreparedDataset::openOrPrepare(const core::DataConfig& cfg,
                                                                              bool progress) {
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::path(cfg.dir) / kManifestFile, ec) && !cfg.inputs.empty()) {
    PrepareOptions o;
    o.inputs = cfg.inputs;
    o.out = cfg.dir;
    o.tokenizer = cfg.tokenizer;
    o.vocab = cfg.vocab;
    o.val_fraction = cfg.val_fraction;
    o.seed = static_cast<uint64_t>(cfg.seed);
    o.progress = progress;
    auto r = prepareDataset(o);
    if (!r.isOk()) return r.status().withContext("data.dir '" + cfg.dir + "' is missing; preparing it from data.inputs");
  }
  auto ds = open(cfg.dir);
  if (!ds.isOk()) return ds.status().withContext("data.dir");
  return ds;
}

core::Result<Sampler> PreparedDataset::trainSampler(uint64_t seed, int64_t seq_len) const {
  auto s = Sampler::create(*train_, seed, seq_len, SampleOrder::kShuffled);
  if (!s.isOk()) return s.status().withContext("train split of '" + manifest_.dir.string() + "'");
  return s;
}

core::Result<Sampler> PreparedDataset::valSampler(int64_t seq_len) const {
  if (val_ == nullptr) {
    return core::failedPrecondition("'" + manifest_.dir.string() +
                                    "' has no validation split; prepare it with --val-fraction > 0");
  }
  auto s = Sampler::create(*val_, 0, seq_len, SampleOrder::kSequential);
  if (!s.isOk()) return s.status().withContext("val split of '" + manifest_.dir.string() + "'");
  return s;
}

}  // namespace archipelago::data
