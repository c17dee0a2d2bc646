// The manifest of a prepared dataset directory (`manifest.json`): what
// `archipelago data prepare` wrote, with a SHA-256 per file so that a reader
// can refuse corrupted data, and the options and inputs that produced it so a
// person can reproduce it. The manifest holds no timestamps: preparing the
// same inputs with the same options gives a byte-identical directory.
// Field-by-field description: docs/data.md.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::data {

inline constexpr int kManifestVersion = 1;
inline constexpr const char* kManifestFile = "manifest.json";

// How `data prepare` was asked to run (recorded verbatim in the manifest).
struct PrepareOptions {
  std::vector<std::string> inputs;       // files or directories (recursed, sorted)
  std::string out;                       // output directory (not recorded)
  std::string tokenizer = "byte";        // byte | spm
  int64_t vocab = 0;                     // spm: vocabulary size (required); byte: 0 or >= 259 (padding)
  double val_fraction = 0.02;            // expected fraction of documents held out for validation
  uint64_t seed = 1234;                  // validation split + SentencePiece sampling
  uint64_t shard_bytes = 64ull << 20;    // target shard payload size; shards end at document boundaries
  int spm_threads = 2;                   // fixed (not hardware-dependent) so re-runs are byte-identical
  std::string spm_model_type = "unigram";  // unigram | bpe
  bool force = false;                    // replace an existing output directory (not recorded)
  bool progress = false;                 // progress lines on stderr (not recorded)
  // Normalised documents kept in memory between the two passes up to this
  // many bytes; above it the inputs are read again (not recorded).
  int64_t cache_bytes = int64_t{1} << 30;
};

struct ShardInfo {
  std::string file;      // relative to the dataset directory
  int64_t tokens = 0;
  int64_t documents = 0; // documents whose EOS lies in this shard
  int64_t bytes = 0;     // file size including the header
  std::string sha256;    // of the whole file
};

struct SplitInfo {
  int64_t tokens = 0;
  int64_t documents = 0;
  std::vector<ShardInfo> shards;
};

struct InputInfo {
  std::string path;
  std::string sha256;
  int64_t bytes = 0;
  int64_t documents = 0;  // documents parsed from the file, before dedup
};

struct DedupStats {
  int64_t documents_read = 0;
  int64_t empty_dropped = 0;       // empty after normalisation
  int64_t duplicates_removed = 0;  // exact duplicates (after normalisation) of an earlier document
  int64_t documents_kept = 0;
};

struct TokenizerInfo {
  std::string kind;      // byte | spm
  std::string file;      // model file relative to the directory (spm), empty for byte
  std::string sha256;    // of `file` (spm)
  int64_t vocab_size = 0;
  int64_t bos_id = -1;
  int64_t eos_id = -1;
  int64_t pad_id = -1;
  int64_t unk_id = -1;
};

struct Manifest {
  int version = kManifestVersion;
  TokenizerInfo tokenizer;
  int64_t vocab_size = 0;     // ids are in [0, vocab_size)
  std::string dtype;          // uint16 | uint32
  int token_bytes = 0;        // 2 | 4
  SplitInfo train;
  SplitInfo val;
  DedupStats dedup;
  std::vector<InputInfo> inputs;
  PrepareOptions options;     // inputs/tokenizer/vocab/val_fraction/seed/shard_bytes/spm_*

  std::filesystem::path dir;  // where it was loaded from (not serialised)
};

// Serialises deterministically (sorted keys, fixed indentation, trailing newline).
std::string manifestToJson(const Manifest& m);
core::Result<Manifest> manifestFromJson(const std::string& text, const std::string& origin);
// Reads DIR/manifest.json; errors name the file and the field.
core::Result<Manifest> loadManifest(const std::filesystem::path& dir);

}  // namespace archipelago::data
