// Tokenizers: text <-> token ids. Two kinds exist:
//  - ByteTokenizer: zero setup; ids 0..255 are the bytes of the UTF-8 text,
//    then BOS=256, EOS=257, PAD=258 (vocabulary 259, optionally padded).
//  - SpmTokenizer: a SentencePiece model trained on the corpus by
//    `data prepare --tokenizer spm` (identity normalisation, byte fallback, so
//    decode(encode(text)) == text for any text).
// The prepared directory's manifest says which one to load (loadTokenizer).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/data/manifest.h"

namespace archipelago::data {

// Thread-safety: encode/decode are const and safe to call concurrently.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;
  // Does not add BOS/EOS; the caller decides.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Special ids (BOS/EOS/PAD/UNK) decode to nothing.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocabSize() const = 0;
  virtual int32_t bosId() const = 0;
  virtual int32_t eosId() const = 0;
  virtual int32_t padId() const = 0;
};

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kBos = 256;
  static constexpr int32_t kEos = 257;
  static constexpr int32_t kPad = 258;
  static constexpr int64_t kMinVocab = 259;

  // vocab_size >= 259; ids above 258 are never produced (padding for kernels).
  explicit ByteTokenizer(int64_t vocab_size = kMinVocab);
  std::string kind() const override { return "byte"; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocabSize() const override { return vocab_size_; }
  int32_t bosId() const override { return kBos; }
  int32_t eosId() const override { return kEos; }
  int32_t padId() const override { return kPad; }

 private:
  int64_t vocab_size_;
};

class SpmTokenizer final : public Tokenizer {
 public:
  ~SpmTokenizer() override;
  static core::Result<std::unique_ptr<SpmTokenizer>> load(const std::filesystem::path& model_file);
  static core::Result<std::unique_ptr<SpmTokenizer>> fromSerialized(const std::string& model_proto);
  std::string kind() const override { return "spm"; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocabSize() const override;
  int32_t bosId() const override;
  int32_t eosId() const override;
  int32_t padId() const override;
  int32_t unkId() const;

 private:
  SpmTokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Options of SentencePiece training (deterministic for fixed values).
struct SpmTrainOptions {
  int64_t vocab_size = 8000;
  std::string model_type = "unigram";  // unigram | bpe
  int threads = 2;
  uint64_t seed = 1234;
};

// Trains a SentencePiece model on `sentences` (one training sentence each,
// no newlines; long lines should be pre-split) and returns the serialised
// model proto. Ids: UNK=0, BOS=1, EOS=2, PAD=3, "\n" is a user symbol, byte
// fallback on. Errors (e.g. vocab too large for the corpus) are kInvalidArgument.
core::Result<std::string> trainSpm(const std::vector<std::string>& sentences, const SpmTrainOptions& options);

// The tokenizer named by a manifest (spm: loads and checks the sha256 of the
// model file in manifest.dir).
core::Result<std::unique_ptr<Tokenizer>> loadTokenizer(const Manifest& manifest);

}  // namespace archipelago::data
