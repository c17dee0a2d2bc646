#include "archipelago/data/hf_tokenizer.h"

#include <nlohmann/json.hpp>

#include "archipelago/core/files.h"
#include "archipelago/data/tokenizer.h"

namespace archipelago::data {

namespace {

using json = nlohmann::json;

bool standsForItself(uint8_t b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174; }

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

json specialToken(int64_t id, const std::string& content) {
  return {{"id", id},         {"content", content}, {"single_word", false}, {"lstrip", false},
          {"rstrip", false},  {"normalized", false}, {"special", true}};
}

json byteLevel() { return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}; }

}  // namespace

uint32_t byteLevelCodePoint(uint8_t b) {
  if (standsForItself(b)) return b;
  // The others take 256, 257, ... in byte order.
  uint32_t n = 0;
  for (int x = 0; x < b; ++x) n += standsForItself(static_cast<uint8_t>(x)) ? 0 : 1;
  return 256 + n;
}

std::string byteTokenizerJson() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[utf8(byteLevelCodePoint(static_cast<uint8_t>(b)))] = b;
  json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = {specialToken(ByteTokenizer::kBos, "<s>"), specialToken(ByteTokenizer::kEos, "</s>"),
                       specialToken(ByteTokenizer::kPad, "<pad>")};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = byteLevel();
  j["post_processor"] = nullptr;
  j["decoder"] = byteLevel();
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"vocab", vocab},
                {"merges", json::array()}};
  return j.dump(1) + "\n";
}

core::Status writeHfTokenizer(const Manifest& manifest, const std::filesystem::path& dir, int64_t model_max_length) {
  const TokenizerInfo& t = manifest.tokenizer;
  json config = {{"bos_token", "<s>"},
                 {"eos_token", "</s>"},
                 {"pad_token", "<pad>"},
                 {"add_bos_token", false},
                 {"add_eos_token", false},
                 {"clean_up_tokenization_spaces", false},
                 {"model_max_length", model_max_length}};
  json special = {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"pad_token", "<pad>"}};
  if (t.kind == "byte") {
    config["tokenizer_class"] = "PreTrainedTokenizerFast";
    ARCH_RETURN_IF_ERROR(core::writeFileAtomic(dir / "tokenizer.json", byteTokenizerJson()));
  } else if (t.kind == "spm") {
    // Loading checks the model file against the manifest's sha256.
    ARCH_RETURN_IF_ERROR(loadTokenizer(manifest).status());
    ARCH_ASSIGN_OR_RETURN(std::string model, core::readFile(manifest.dir / t.file));
    ARCH_RETURN_IF_ERROR(core::writeFileAtomic(dir / "tokenizer.model", model));
    config["tokenizer_class"] = "LlamaTokenizer";
    config["unk_token"] = "<unk>";
    special["unk_token"] = "<unk>";
    // Trained without a dummy prefix (docs/data.md): the tokenizer must not add one.
    config["add_prefix_space"] = false;
    config["legacy"] = false;
    config["sp_model_kwargs"] = json::object();
  } else {
    return core::invalidArgument("tokenizer kind '" + t.kind + "' of dataset '" + manifest.dir.string() +
                                 "' has no Hugging Face form; expected byte or spm");
  }
  ARCH_RETURN_IF_ERROR(core::writeFileAtomic(dir / "tokenizer_config.json", config.dump(2) + "\n"));
  return core::writeFileAtomic(dir / "special_tokens_map.json", special.dump(2) + "\n");
}

}  // namespace archipelago::data
