#include "archipelago/data/manifest.h"

#include <limits>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "archipelago/core/files.h"

namespace archipelago::data {
namespace {

using nlohmann::json;

json splitToJson(const SplitInfo& s) {
  json shards = json::array();
  for (const auto& sh : s.shards) {
    shards.push_back({{"file", sh.file}, {"tokens", sh.tokens}, {"documents", sh.documents},
                      {"bytes", sh.bytes}, {"sha256", sh.sha256}});
  }
  return {{"tokens", s.tokens}, {"documents", s.documents}, {"shards", shards}};
}

template <typename T>
bool fitsInteger(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
  if (!v.is_number_integer()) return false;
  const int64_t x = v.get<int64_t>();
  if constexpr (std::is_unsigned_v<T>) {
    return x >= 0;
  } else {
    return x >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
           x <= static_cast<int64_t>(std::numeric_limits<T>::max());
  }
}

// Field access that reports "<origin>: field '<path>' ..." instead of throwing.
class Reader {
 public:
  explicit Reader(std::string origin) : origin_(std::move(origin)) {}
  core::Status error() const { return err_; }

  template <typename T>
  T get(const json& j, const char* key, const std::string& path, T fallback = T{}) {
    if (!err_.isOk()) return fallback;
    auto it = j.find(key);
    if (it == j.end()) {
      err_ = core::dataLoss(origin_ + ": missing field '" + path + key + "'; re-run `archipelago data prepare`");
      return fallback;
    }
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      // nlohmann converts a float or an out-of-range integer with a plain
      // cast (undefined for 1e300, a silent wrap for 2^32 + 2 as an int):
      // only an integer that fits is taken.
      if (!fitsInteger<T>(*it)) {
        err_ = core::dataLoss(origin_ + ": field '" + path + key + "' is " + it->dump() + ", expected an integer in [" +
                              std::to_string(std::numeric_limits<T>::min()) + ", " +
                              std::to_string(std::numeric_limits<T>::max()) + "]");
        return fallback;
      }
    }
    try {
      return it->template get<T>();
    } catch (const std::exception& e) {
      err_ = core::dataLoss(origin_ + ": field '" + path + key + "' has the wrong type (" + e.what() + ")");
      return fallback;
    }
  }
  const json& obj(const json& j, const char* key, const std::string& path) {
    static const json kEmpty = json::object();
    if (!err_.isOk()) return kEmpty;
    auto it = j.find(key);
    if (it == j.end() || !(it->is_object() || it->is_array())) {
      err_ = core::dataLoss(origin_ + ": missing object '" + path + key + "'");
      return kEmpty;
    }
    return *it;
  }

 private:
  std::string origin_;
  core::Status err_;
};

SplitInfo splitFromJson(Reader& r, const json& j, const std::string& path) {
  SplitInfo s;
  s.tokens = r.get<int64_t>(j, "tokens", path);
  s.documents = r.get<int64_t>(j, "documents", path);
  const json& shards = r.obj(j, "shards", path);
  if (!shards.is_array()) return s;
  for (size_t i = 0; i < shards.size(); ++i) {
    std::string p = path + "shards[" + std::to_string(i) + "].";
    ShardInfo sh;
    sh.file = r.get<std::string>(shards[i], "file", p);
    sh.tokens = r.get<int64_t>(shards[i], "tokens", p);
    sh.documents = r.get<int64_t>(shards[i], "documents", p);
    sh.bytes = r.get<int64_t>(shards[i], "bytes", p);
    sh.sha256 = r.get<std::string>(shards[i], "sha256", p);
    s.shards.push_back(std::move(sh));
  }
  return s;
}

// Internal consistency of one split, so later code can trust the numbers:
// every count is >= 0 and the sums cannot overflow (a shard of 2^62 tokens
// once made 64 + tokens * width wrap around to a plausible byte count).
core::Status checkSplit(const SplitInfo& s, int token_bytes, const std::string& origin, const std::string& name) {
  constexpr int64_t kMaxTokens = (std::numeric_limits<int64_t>::max() - 64) / 4;
  int64_t tokens = 0, docs = 0;
  for (size_t i = 0; i < s.shards.size(); ++i) {
    const ShardInfo& sh = s.shards[i];
    const std::string field = name + ".shards[" + std::to_string(i) + "]";
    if (sh.tokens < 0 || sh.tokens > kMaxTokens) {
      return core::dataLoss(origin + ": field '" + field + ".tokens' is " + std::to_string(sh.tokens) +
                            ", expected a count in [0, " + std::to_string(kMaxTokens) + "]");
    }
    if (sh.documents < 0) {
      return core::dataLoss(origin + ": field '" + field + ".documents' is " + std::to_string(sh.documents) +
                            ", expected a count >= 0");
    }
    if (sh.bytes != 64 + sh.tokens * token_bytes) {
      return core::dataLoss(origin + ": shard '" + sh.file + "' has inconsistent bytes/tokens");
    }
    if (sh.file.empty() || sh.file.find('/') != std::string::npos || sh.file.find("..") != std::string::npos) {
      return core::dataLoss(origin + ": shard file name '" + sh.file + "' is not a plain file name");
    }
    if (__builtin_add_overflow(tokens, sh.tokens, &tokens) || __builtin_add_overflow(docs, sh.documents, &docs)) {
      return core::dataLoss(origin + ": field '" + name + ".shards' sums to more tokens or documents than fit in 64 bits");
    }
  }
  if (tokens != s.tokens || docs != s.documents) {
    return core::dataLoss(origin + ": split totals do not match the sum of its shards");
  }
  return core::okStatus();
}

}  // namespace

std::string manifestToJson(const Manifest& m) {
  json inputs = json::array();
  for (const auto& in : m.inputs) {
    inputs.push_back({{"path", in.path}, {"sha256", in.sha256}, {"bytes", in.bytes}, {"documents", in.documents}});
  }
  json j = {
      {"format", "archipelago-tokens"},
      {"version", m.version},
      {"tokenizer",
       {{"kind", m.tokenizer.kind},
        {"file", m.tokenizer.file},
        {"sha256", m.tokenizer.sha256},
        {"vocab_size", m.tokenizer.vocab_size},
        {"bos_id", m.tokenizer.bos_id},
        {"eos_id", m.tokenizer.eos_id},
        {"pad_id", m.tokenizer.pad_id},
        {"unk_id", m.tokenizer.unk_id}}},
      {"vocab_size", m.vocab_size},
      {"dtype", m.dtype},
      {"token_bytes", m.token_bytes},
      {"train", splitToJson(m.train)},
      {"val", splitToJson(m.val)},
      {"dedup",
       {{"documents_read", m.dedup.documents_read},
        {"empty_dropped", m.dedup.empty_dropped},
        {"duplicates_removed", m.dedup.duplicates_removed},
        {"documents_kept", m.dedup.documents_kept}}},
      {"inputs", inputs},
      {"options",
       {{"inputs", m.options.inputs},
        {"tokenizer", m.options.tokenizer},
        {"vocab", m.options.vocab},
        {"val_fraction", m.options.val_fraction},
        {"seed", m.options.seed},
        {"shard_bytes", m.options.shard_bytes},
        {"spm_threads", m.options.spm_threads},
        {"spm_model_type", m.options.spm_model_type}}},
  };
  return j.dump(2) + "\n";
}

core::Result<Manifest> manifestFromJson(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return core::dataLoss(origin + ": not valid JSON (" + e.what() + "); re-run `archipelago data prepare`");
  }
  if (!j.is_object()) return core::dataLoss(origin + ": expected a JSON object");
  Reader r(origin);
  Manifest m;
  std::string format = r.get<std::string>(j, "format", "");
  if (r.error().isOk() && format != "archipelago-tokens") {
    return core::dataLoss(origin + ": field 'format' is '" + format + "', expected 'archipelago-tokens'");
  }
  m.version = r.get<int>(j, "version", "");
  if (r.error().isOk() && m.version != kManifestVersion) {
    return core::failedPrecondition(origin + ": manifest version " + std::to_string(m.version) +
                                    " is not supported (this build reads " + std::to_string(kManifestVersion) + ")");
  }
  const json& t = r.obj(j, "tokenizer", "");
  m.tokenizer.kind = r.get<std::string>(t, "kind", "tokenizer.");
  m.tokenizer.file = r.get<std::string>(t, "file", "tokenizer.");
  m.tokenizer.sha256 = r.get<std::string>(t, "sha256", "tokenizer.");
  m.tokenizer.vocab_size = r.get<int64_t>(t, "vocab_size", "tokenizer.");
  m.tokenizer.bos_id = r.get<int64_t>(t, "bos_id", "tokenizer.");
  m.tokenizer.eos_id = r.get<int64_t>(t, "eos_id", "tokenizer.");
  m.tokenizer.pad_id = r.get<int64_t>(t, "pad_id", "tokenizer.");
  m.tokenizer.unk_id = r.get<int64_t>(t, "unk_id", "tokenizer.");
  m.vocab_size = r.get<int64_t>(j, "vocab_size", "");
  m.dtype = r.get<std::string>(j, "dtype", "");
  m.token_bytes = r.get<int>(j, "token_bytes", "");
  m.train = splitFromJson(r, r.obj(j, "train", ""), "train.");
  m.val = splitFromJson(r, r.obj(j, "val", ""), "val.");
  const json& d = r.obj(j, "dedup", "");
  m.dedup.documents_read = r.get<int64_t>(d, "documents_read", "dedup.");
  m.dedup.empty_dropped = r.get<int64_t>(d, "empty_dropped", "dedup.");
  m.dedup.duplicates_removed = r.get<int64_t>(d, "duplicates_removed", "dedup.");
  m.dedup.documents_kept = r.get<int64_t>(d, "documents_kept", "dedup.");
  const json& ins = r.obj(j, "inputs", "");
  if (ins.is_array()) {
    for (size_t i = 0; i < ins.size(); ++i) {
      std::string p = "inputs[" + std::to_string(i) + "].";
      InputInfo in;
      in.path = r.get<std::string>(ins[i], "path", p);
      in.sha256 = r.get<std::string>(ins[i], "sha256", p);
      in.bytes = r.get<int64_t>(ins[i], "bytes", p);
      in.documents = r.get<int64_t>(ins[i], "documents", p);
      m.inputs.push_back(std::move(in));
    }
  }
  const json& o = r.obj(j, "options", "");
  m.options.inputs = r.get<std::vector<std::string>>(o, "inputs", "options.");
  m.options.tokenizer = r.get<std::string>(o, "tokenizer", "options.");
  m.options.vocab = r.get<int64_t>(o, "vocab", "options.");
  m.options.val_fraction = r.get<double>(o, "val_fraction", "options.");
  m.options.seed = r.get<uint64_t>(o, "seed", "options.");
  m.options.shard_bytes = r.get<uint64_t>(o, "shard_bytes", "options.");
  m.options.spm_threads = r.get<int>(o, "spm_threads", "options.");
  m.options.spm_model_type = r.get<std::string>(o, "spm_model_type", "options.");
  ARCH_RETURN_IF_ERROR(r.error());

  // Internal consistency, so later code can trust the numbers.
  if (m.token_bytes != 2 && m.token_bytes != 4) {
    return core::dataLoss(origin + ": field 'token_bytes' is " + std::to_string(m.token_bytes) + ", expected 2 or 4");
  }
  if (m.dtype != (m.token_bytes == 2 ? "uint16" : "uint32")) {
    return core::dataLoss(origin + ": field 'dtype' '" + m.dtype + "' does not match token_bytes");
  }
  ARCH_RETURN_IF_ERROR(checkSplit(m.train, m.token_bytes, origin, "train"));
  ARCH_RETURN_IF_ERROR(checkSplit(m.val, m.token_bytes, origin, "val"));
  return m;
}

core::Result<Manifest> loadManifest(const std::filesystem::path& dir) {
  auto path = dir / kManifestFile;
  auto text = core::readFile(path);
  if (!text.isOk()) {
    return text.status().withContext("dataset '" + dir.string() + "' (the output of `archipelago data prepare`)");
  }
  ARCH_ASSIGN_OR_RETURN(Manifest m, manifestFromJson(*text, path.string()));
  m.dir = dir;
  return m;
}

}  // namespace archipelago::data
