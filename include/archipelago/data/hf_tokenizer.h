// A prepared dataset's tokenizer as the files Hugging Face loads:
//
//   spm   tokenizer.model (the SentencePiece model, byte for byte) and a
//         tokenizer_config.json for LlamaTokenizer;
//   byte  tokenizer.json in the `tokenizers` format: a byte-level
//         pre-tokenizer without splitting and a BPE over the 256 byte
//         symbols with no merges, so byte b is id b as in ByteTokenizer;
//         BOS/EOS/PAD (256/257/258) as special added tokens.
//
// Both also get special_tokens_map.json. Documents were prepared with an
// EOS after each and no BOS, so neither adds BOS or EOS on its own.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "archipelago/core/status.h"
#include "archipelago/data/manifest.h"

namespace archipelago::data {

// The unicode code point the byte-level pre-tokenizer writes for byte b
// (printable Latin-1 bytes stand for themselves, the others move to 256+).
uint32_t byteLevelCodePoint(uint8_t b);

// The `tokenizers` JSON of ByteTokenizer (vocabulary ids 0..258).
std::string byteTokenizerJson();

// Writes the tokenizer files of `manifest` into `dir` (which exists);
// model_max_length goes into tokenizer_config.json.
core::Status writeHfTokenizer(const Manifest& manifest, const std::filesystem::path& dir, int64_t model_max_length);

}  // namespace archipelago::data
