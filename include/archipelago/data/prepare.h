// `archipelago data prepare`: text corpora -> a prepared dataset directory
// (token shards + tokenizer model + manifest.json). Pipeline, per document in
// input order (files sorted, directories recursed): parse (.txt = one
// document; .json = one object or an array of objects with a "text" string;
// .jsonl = one object per line) -> normalise -> drop empty -> drop exact
// duplicates (SHA-256 of the normalised text, first occurrence wins) -> split
// train/val by a seeded hash of the text -> tokenize -> shard.
// The output is written into OUT.tmp-XXXXXX and renamed to OUT at the end, so
// a failure never leaves a half-written dataset.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "archipelago/core/status.h"
#include "archipelago/data/manifest.h"

namespace archipelago::data {

// CRLF and lone CR -> LF; trailing spaces/tabs stripped from every line;
// leading/trailing blank space of the document trimmed; runs of 3 or more
// blank lines collapsed to 2 blank lines.
std::string normalizeText(std::string_view text);

// True if the document goes to the validation split: a seeded 64-bit hash of
// the normalised text, mapped to [0,1), is below val_fraction.
bool isValidationDocument(std::string_view normalized_text, uint64_t seed, double val_fraction);

struct PrepareReport {
  Manifest manifest;
  int64_t input_bytes = 0;
  double seconds = 0;
  double spm_train_seconds = 0;
};

// Validates the options (errors name the flag), runs the pipeline, returns the
// manifest written to options.out.
core::Result<PrepareReport> prepareDataset(const PrepareOptions& options);

}  // namespace archipelago::data
