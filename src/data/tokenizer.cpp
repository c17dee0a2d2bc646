#include "archipelago/data/tokenizer.h"

#include <mutex>
#include <unordered_map>

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "archipelago/core/hash.h"

namespace archipelago::data {

// ---- ByteTokenizer ------------------------------------------------------------

ByteTokenizer::ByteTokenizer(int64_t vocab_size) : vocab_size_(vocab_size) {
  ARCH_CHECK_MSG(vocab_size >= kMinVocab, "byte tokenizer needs a vocabulary of at least 259");
}

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<uint8_t>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < 256) out.push_back(static_cast<char>(id));
  }
  return out;
}

// ---- SpmTokenizer -------------------------------------------------------------

struct SpmTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SpmTokenizer::SpmTokenizer() : impl_(std::make_unique<Impl>()) {}
SpmTokenizer::~SpmTokenizer() = default;

core::Result<std::unique_ptr<SpmTokenizer>> SpmTokenizer::load(const std::filesystem::path& model_file) {
  std::unique_ptr<SpmTokenizer> t(new SpmTokenizer());
  auto st = t->impl_->sp.Load(model_file.string());
  if (!st.ok()) {
    return core::dataLoss("cannot load SentencePiece model '" + model_file.string() + "': " + st.ToString());
  }
  return t;
}

core::Result<std::unique_ptr<SpmTokenizer>> SpmTokenizer::fromSerialized(const std::string& model_proto) {
  std::unique_ptr<SpmTokenizer> t(new SpmTokenizer());
  auto st = t->impl_->sp.LoadFromSerializedProto(model_proto);
  if (!st.ok()) return core::dataLoss("cannot parse SentencePiece model: " + st.ToString());
  return t;
}

std::vector<int32_t> SpmTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  auto st = impl_->sp.Encode(std::string(text), &ids);
  ARCH_CHECK_MSG(st.ok(), "SentencePiece encode failed: " + st.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string SpmTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> in;
  in.reserve(ids.size());
  const int n = impl_->sp.GetPieceSize();
  for (int32_t id : ids) {
    if (id >= 0 && id < n) in.push_back(id);
  }
  std::string out;
  auto st = impl_->sp.Decode(in, &out);
  ARCH_CHECK_MSG(st.ok(), "SentencePiece decode failed: " + st.ToString());
  return out;
}

int64_t SpmTokenizer::vocabSize() const { return impl_->sp.GetPieceSize(); }
int32_t SpmTokenizer::bosId() const { return impl_->sp.bos_id(); }
int32_t SpmTokenizer::eosId() const { return impl_->sp.eos_id(); }
int32_t SpmTokenizer::padId() const { return impl_->sp.pad_id(); }
int32_t SpmTokenizer::unkId() const { return impl_->sp.unk_id(); }

// ---- training -----------------------------------------------------------------

namespace {

class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& v) : v_(v) {}
  bool done() const override { return i_ >= v_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return v_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& v_;
  size_t i_ = 0;
};

}  // namespace

core::Result<std::string> trainSpm(const std::vector<std::string>& sentences, const SpmTrainOptions& options) {
  if (options.model_type != "unigram" && options.model_type != "bpe") {
    return core::invalidArgument("spm model type '" + options.model_type + "' is not one of unigram|bpe");
  }
  if (sentences.empty()) return core::invalidArgument("no training text for SentencePiece");
  // The trainer keeps global state (random seed, log level): one at a time.
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned int>(options.seed & 0xffffffffu));
  std::unordered_map<std::string, std::string> kw = {
      {"model_type", options.model_type},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"num_threads", std::to_string(options.threads)},
      // Identity normalisation + byte fallback + kept whitespace: decode(encode(x)) == x.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"character_coverage", "0.9995"},
      {"input_sentence_size", "0"},      // use every sentence: no sampling
      {"shuffle_input_sentence", "false"},
      {"max_sentence_length", "65536"},
      {"hard_vocab_limit", "true"},
      {"user_defined_symbols", "\n"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "3"},
      {"minloglevel", "2"},
  };
  VectorIterator it(sentences);
  std::string model;
  auto st = sentencepiece::SentencePieceTrainer::Train(kw, &it, &model);
  if (!st.ok()) {
    return core::invalidArgument("SentencePiece training failed (vocab " + std::to_string(options.vocab_size) +
                                 "): " + st.ToString() + "; try a smaller --vocab");
  }
  return model;
}

core::Result<std::unique_ptr<Tokenizer>> loadTokenizer(const Manifest& manifest) {
  const auto& t = manifest.tokenizer;
  if (t.kind == "byte") {
    if (t.vocab_size < ByteTokenizer::kMinVocab) {
      return core::dataLoss("manifest in '" + manifest.dir.string() + "': byte tokenizer vocab_size " +
                            std::to_string(t.vocab_size) + " < 259");
    }
    return std::unique_ptr<Tokenizer>(new ByteTokenizer(t.vocab_size));
  }
  if (t.kind == "spm") {
    auto path = manifest.dir / t.file;
    ARCH_ASSIGN_OR_RETURN(std::string sha, core::sha256File(path));
    if (sha != t.sha256) {
      return core::dataLoss("tokenizer model '" + path.string() + "' does not match the manifest's sha256 (" + sha +
                            " != " + t.sha256 + "); the file is corrupted or replaced, re-run `archipelago data prepare`");
    }
    ARCH_ASSIGN_OR_RETURN(auto spm, SpmTokenizer::load(path));
    if (spm->vocabSize() != t.vocab_size) {
      return core::dataLoss("tokenizer model '" + path.string() + "' has " + std::to_string(spm->vocabSize()) +
                            " pieces, manifest says " + std::to_string(t.vocab_size));
    }
    return std::unique_ptr<Tokenizer>(std::move(spm));
  }
  return core::dataLoss("manifest in '" + manifest.dir.string() + "': unknown tokenizer kind '" + t.kind + "'");
}

}  // namespace archipelago::data
