// libFuzzer target: a token shard file (the 64-byte header, then tokens),
// through ShardHeader::decode and through TokenReader::open the way a worker
// maps it. Corpus: tests/fuzz/corpus/shard. CI runs it through
// tests/data/fuzz_smoke_test.cpp.
//
// The input is the whole shard file. It is written to a private scratch
// directory (fuzz/scratch_dir.h) and opened through a manifest entry that
// agrees with the file's size (what manifestFromJson guarantees), so what
// is fuzzed is the header against the file, not a manifest that lies about
// sizes.
//
// Invariants: a decoded header has version 1, width 2 or 4, and encodes back
// to the same 44 meaningful bytes; a reader that opens serves exactly the
// tokens that lie in the file.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "archipelago/core/files.h"
#include "archipelago/data/manifest.h"
#include "archipelago/data/shard.h"
#include "fuzz/scratch_dir.h"

namespace archipelago::fuzz {

inline void checkDecodedHeader(const data::ShardHeader& h, const uint8_t* data) {
  if (h.version != data::kShardVersion || (h.token_bytes != 2 && h.token_bytes != 4)) __builtin_trap();
  uint8_t again[data::kShardHeaderBytes];
  h.encode(again);
  if (std::memcmp(again, data, 44) != 0) __builtin_trap();
}

inline int fuzzShard(const uint8_t* data, size_t size) {
  auto h = data::ShardHeader::decode(data, size, "fuzz");
  if (!h.isOk()) return 0;
  checkDecodedHeader(*h, data);
  const uint64_t payload = size - data::kShardHeaderBytes;
  if (payload % h->token_bytes != 0) return 0;  // such a manifest entry could not exist
  // The manifest entry a consistent manifest would hold for this file. The
  // header's own count and document number are what the reader must check.
  data::Manifest m;
  m.dir = scratchDir();
  m.token_bytes = static_cast<int>(h->token_bytes);
  m.vocab_size = static_cast<int64_t>(h->vocab_size);
  data::SplitInfo split;
  data::ShardInfo info;
  info.file = "train-00000.bin";
  info.tokens = static_cast<int64_t>(payload / h->token_bytes);
  info.documents = static_cast<int64_t>(h->documents);
  info.bytes = static_cast<int64_t>(size);
  split.shards.push_back(info);
  split.tokens = info.tokens;
  if (!core::writeFile(m.dir / info.file, std::string_view(reinterpret_cast<const char*>(data), size)).isOk()) return 0;
  auto reader = data::TokenReader::open(m, split, /*verify_checksums=*/false);
  if (!reader.isOk()) return 0;
  if ((*reader)->size() != info.tokens || h->count != payload / h->token_bytes) __builtin_trap();
  std::vector<int64_t> tokens(static_cast<size_t>(info.tokens));
  (*reader)->read(0, tokens);
  for (size_t i = 0; i < tokens.size(); ++i) {
    uint64_t want = 0;
    for (uint32_t b = 0; b < h->token_bytes; ++b) {
      want |= static_cast<uint64_t>(data[data::kShardHeaderBytes + i * h->token_bytes + b]) << (8 * b);
    }
    if (static_cast<uint64_t>(tokens[i]) != want) __builtin_trap();
  }
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzShard themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzShard(data, size);
}
#endif
