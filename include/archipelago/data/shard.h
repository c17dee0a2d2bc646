// Token shards: flat little-endian arrays of token ids behind a fixed 64-byte
// header, written by `data prepare` and memory-mapped by TokenReader.
//
// Header (all little-endian):
//   0  char[8]  magic "ARCHTOK\0"
//   8  uint32   version (1)
//  12  uint32   token width in bytes (2 = uint16, 4 = uint32)
//  16  uint64   token count
//  24  uint64   document count (EOS tokens in this shard)
//  32  uint64   vocabulary size
//  40  uint32   header size (64)
//  44  byte[20] zero
// Then `count` tokens. Documents are separated (terminated) by EOS.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/data/manifest.h"

namespace archipelago::data {

inline constexpr char kShardMagic[8] = {'A', 'R', 'C', 'H', 'T', 'O', 'K', '\0'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t token_bytes = 2;
  uint64_t count = 0;
  uint64_t documents = 0;
  uint64_t vocab_size = 0;

  void encode(uint8_t out[kShardHeaderBytes]) const;
  // Checks magic, version, width and header size; `origin` names the file in errors.
  static core::Result<ShardHeader> decode(const uint8_t* in, size_t n, const std::string& origin);
};

// "uint16" when vocab_size <= 65535, else "uint32".
int tokenBytesForVocab(int64_t vocab_size);

// Accumulates one split's documents and writes numbered shards
// (<prefix>-00000.bin, ...) into a directory. A shard is closed at the first
// document boundary at or past `shard_bytes` of payload, so a document never
// straddles two shards. Not thread-safe (one writer per split).
class ShardWriter {
 public:
  ShardWriter(std::filesystem::path dir, std::string prefix, int64_t vocab_size, uint64_t shard_bytes);
  // Appends the document's tokens followed by `eos`.
  core::Status addDocument(std::span<const int32_t> tokens, int32_t eos);
  // Flushes the last shard; returns the split's shard list.
  core::Result<SplitInfo> finish();

 private:
  core::Status flush();
  std::filesystem::path dir_;
  std::string prefix_;
  int64_t vocab_size_;
  int token_bytes_;
  uint64_t shard_bytes_;
  std::vector<uint8_t> buf_;  // payload of the open shard
  int64_t buf_docs_ = 0;
  SplitInfo split_;
};

// Read-only, memory-mapped view of one split (all its shards as one stream).
// Opening verifies each shard's size, header and SHA-256 against the
// manifest; any mismatch is kDataLoss naming the file. Thread-safe after open.
class TokenReader {
 public:
  ~TokenReader();
  TokenReader(const TokenReader&) = delete;
  TokenReader& operator=(const TokenReader&) = delete;

  // `split` is manifest.train or manifest.val. verify_checksums=false skips
  // the SHA-256 pass (size and header are always checked).
  static core::Result<std::unique_ptr<TokenReader>> open(const Manifest& manifest, const SplitInfo& split,
                                                         bool verify_checksums = true);

  int64_t size() const { return total_; }
  int64_t numShards() const { return static_cast<int64_t>(shards_.size()); }
  // Token i of the concatenated stream; i must be in [0, size()).
  int32_t token(int64_t i) const;
  // Copies tokens [begin, begin + out.size()) into out (crosses shard borders).
  void read(int64_t begin, std::span<int64_t> out) const;
  void read(int64_t begin, std::span<int32_t> out) const;

 private:
  TokenReader() = default;
  struct Mapped {
    std::string path;
    const uint8_t* base = nullptr;  // mmap base (whole file)
    size_t bytes = 0;
    const uint8_t* tokens = nullptr;
    int64_t count = 0;
  };
  template <typename T>
  void readImpl(int64_t begin, std::span<T> out) const;
  std::vector<Mapped> shards_;
  std::vector<int64_t> starts_;  // first global token index of each shard
  int64_t total_ = 0;
  int token_bytes_ = 2;
};

}  // namespace archipelago::data
