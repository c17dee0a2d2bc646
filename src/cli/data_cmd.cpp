// archipelago data prepare | inspect: the data layer's verbs.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "archipelago/core/units.h"
#include "archipelago/data/dataset.h"
#include "archipelago/data/prepare.h"
#include "cli/commands.h"

namespace archipelago::cli {
namespace {

struct PrepareFlags {
  data::PrepareOptions options;
  std::string shard_size = "64MiB";
  bool quiet = false;
};

core::Status runPrepare(const PrepareFlags& flags) {
  data::PrepareOptions o = flags.options;
  auto shard = core::parseByteSize(flags.shard_size);
  if (!shard.isOk()) {
    return core::invalidArgument("--shard-size '" + flags.shard_size + "': " + shard.status().message() +
                                 " (e.g. 64MB, 16MiB)");
  }
  o.shard_bytes = *shard;
  o.progress = !flags.quiet;
  ARCH_ASSIGN_OR_RETURN(data::PrepareReport r, data::prepareDataset(o));
  const auto& m = r.manifest;
  std::printf("prepared %s: tokenizer %s (vocab %lld, %s)\n", o.out.c_str(), m.tokenizer.kind.c_str(),
              static_cast<long long>(m.vocab_size), m.dtype.c_str());
  std::printf("  inputs     %zu files, %s\n", m.inputs.size(), core::formatBytes(static_cast<double>(r.input_bytes)).c_str());
  std::printf("  documents  %lld read, %lld empty dropped, %lld exact duplicates removed, %lld kept\n",
              static_cast<long long>(m.dedup.documents_read), static_cast<long long>(m.dedup.empty_dropped),
              static_cast<long long>(m.dedup.duplicates_removed), static_cast<long long>(m.dedup.documents_kept));
  std::printf("  train      %lld docs, %lld tokens, %zu shards\n", static_cast<long long>(m.train.documents),
              static_cast<long long>(m.train.tokens), m.train.shards.size());
  std::printf("  val        %lld docs, %lld tokens, %zu shards\n", static_cast<long long>(m.val.documents),
              static_cast<long long>(m.val.tokens), m.val.shards.size());
  std::printf("  time       %.2f s (%.1f MB/s of input)\n", r.seconds, r.input_bytes / 1e6 / r.seconds);
  if (r.spm_train_seconds > 0) std::printf("  spm train  %.2f s\n", r.spm_train_seconds);
  return core::okStatus();
}

struct InspectFlags {
  std::string dir;
  int64_t samples = 2;
  int64_t seq_len = 64;
  uint64_t seed = 1234;
  bool no_verify = false;
};

core::Status runInspect(const InspectFlags& f) {
  if (f.samples < 0) return core::invalidArgument("--samples must be >= 0");
  ARCH_ASSIGN_OR_RETURN(auto ds, data::PreparedDataset::open(f.dir, !f.no_verify));
  const auto& m = ds->manifest();
  std::printf("dataset %s (%s)\n", f.dir.c_str(), f.no_verify ? "checksums not verified" : "checksums verified");
  std::printf("  tokenizer  %s%s%s, vocab %lld, bos %lld, eos %lld, pad %lld\n", m.tokenizer.kind.c_str(),
              m.tokenizer.file.empty() ? "" : " ", m.tokenizer.file.c_str(), static_cast<long long>(m.vocab_size),
              static_cast<long long>(m.tokenizer.bos_id), static_cast<long long>(m.tokenizer.eos_id),
              static_cast<long long>(m.tokenizer.pad_id));
  std::printf("  dtype      %s\n", m.dtype.c_str());
  std::printf("  inputs     %zu files\n", m.inputs.size());
  std::printf("  documents  %lld read, %lld empty dropped, %lld exact duplicates removed, %lld kept\n",
              static_cast<long long>(m.dedup.documents_read), static_cast<long long>(m.dedup.empty_dropped),
              static_cast<long long>(m.dedup.duplicates_removed), static_cast<long long>(m.dedup.documents_kept));
  for (const auto* split : {&m.train, &m.val}) {
    std::printf("  %-10s %lld docs, %lld tokens, %zu shards\n", split == &m.train ? "train" : "val",
                static_cast<long long>(split->documents), static_cast<long long>(split->tokens), split->shards.size());
    for (const auto& sh : split->shards) {
      std::printf("    %s  %lld tokens  %lld docs  sha256 %.16s...\n", sh.file.c_str(),
                  static_cast<long long>(sh.tokens), static_cast<long long>(sh.documents), sh.sha256.c_str());
    }
  }
  if (f.samples == 0) return core::okStatus();
  ARCH_ASSIGN_OR_RETURN(data::Sampler sampler, ds->trainSampler(f.seed, f.seq_len));
  std::printf("samples (seed %llu, seq_len %lld, %lld per pass):\n", static_cast<unsigned long long>(f.seed),
              static_cast<long long>(f.seq_len), static_cast<long long>(sampler.slotsPerPass()));
  std::vector<int64_t> in(static_cast<size_t>(f.seq_len)), tg(static_cast<size_t>(f.seq_len));
  for (int64_t g = 0; g < f.samples; ++g) {
    sampler.sample(g, in.data(), tg.data());
    std::vector<int32_t> ids(in.begin(), in.end());
    ids.push_back(static_cast<int32_t>(tg.back()));
    std::string text = ds->tokenizer().decode(ids);
    std::printf("--- sample %lld (tokens %lld..%lld)\n%s\n", static_cast<long long>(g),
                static_cast<long long>(sampler.sampleStart(g)),
                static_cast<long long>(sampler.sampleStart(g) + f.seq_len), text.c_str());
  }
  return core::okStatus();
}

}  // namespace

void addDataCommands(CLI::App& app) {
  auto* data_cmd = app.add_subcommand("data", "prepare and inspect tokenized datasets");
  data_cmd->require_subcommand(1);

  auto prepare = std::make_shared<PrepareFlags>();
  auto* p = data_cmd->add_subcommand("prepare", "text/JSON/JSONL corpora -> token shards + manifest.json");
  p->add_option("--input", prepare->options.inputs, "files or directories (.txt, .json, .jsonl; recursed, sorted)")
      ->required()
      ->expected(1, -1);
  p->add_option("--out", prepare->options.out, "output directory (written atomically)")->required();
  p->add_option("--tokenizer", prepare->options.tokenizer, "byte | spm")->capture_default_str();
  p->add_option("--vocab", prepare->options.vocab, "spm vocabulary size (required for spm); byte: 0 or >= 259 to pad")
      ->capture_default_str();
  p->add_option("--val-fraction", prepare->options.val_fraction, "fraction of documents held out for validation")
      ->capture_default_str();
  p->add_option("--seed", prepare->options.seed, "seed of the validation split and SentencePiece")->capture_default_str();
  p->add_option("--shard-size", prepare->shard_size, "target shard size (e.g. 64MB)")->capture_default_str();
  p->add_option("--spm-threads", prepare->options.spm_threads,
                "SentencePiece trainer threads (fixed, part of the reproducible output)")
      ->capture_default_str();
  p->add_option("--spm-model-type", prepare->options.spm_model_type, "unigram | bpe")->capture_default_str();
  p->add_flag("--force", prepare->options.force, "replace an existing output directory");
  p->add_flag("--quiet", prepare->quiet, "no progress lines on stderr");
  setAction(p, [prepare] { return runPrepare(*prepare); });

  auto inspect = std::make_shared<InspectFlags>();
  auto* i = data_cmd->add_subcommand("inspect", "print a prepared dataset's manifest and decode a few samples");
  i->add_option("dir", inspect->dir, "prepared dataset directory")->required();
  i->add_option("--samples", inspect->samples, "training samples to decode")->capture_default_str();
  i->add_option("--seq-len", inspect->seq_len, "tokens per sample")->capture_default_str();
  i->add_option("--seed", inspect->seed, "sampler seed")->capture_default_str();
  i->add_flag("--no-verify", inspect->no_verify, "skip the SHA-256 check of the shards");
  setAction(i, [inspect] { return runInspect(*inspect); });
}

}  // namespace archipelago::cli
