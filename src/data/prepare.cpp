#include "archipelago/data/prepare.h"

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <functional>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "archipelago/core/clock.h"
#include "archipelago/core/files.h"
#include "archipelago/core/hash.h"
#include "archipelago/core/units.h"
#include "archipelago/data/shard.h"
#include "archipelago/data/tokenizer.h"

namespace archipelago::data {

namespace fs = std::filesystem;

std::string normalizeText(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  int blank_run = 0;
  bool seen_content = false;
  size_t i = 0;
  while (i <= text.size()) {
    // One line: [i, j), ended by \n, \r\n, \r or the end of the text.
    size_t j = i;
    while (j < text.size() && text[j] != '\n' && text[j] != '\r') ++j;
    size_t end = j;
    while (end > i && (text[end - 1] == ' ' || text[end - 1] == '\t' || text[end - 1] == '\v' || text[end - 1] == '\f')) {
      --end;
    }
    size_t begin = i;
    if (!seen_content) {  // document trim: leading blank space of the first line
      while (begin < end && (text[begin] == ' ' || text[begin] == '\t' || text[begin] == '\v' || text[begin] == '\f')) {
        ++begin;
      }
    }
    if (begin == end) {
      ++blank_run;
    } else {
      if (seen_content) {
        out.push_back('\n');
        for (int k = 0; k < std::min(blank_run, 2); ++k) out.push_back('\n');
      }
      out.append(text.data() + begin, end - begin);
      seen_content = true;
      blank_run = 0;
    }
    if (j >= text.size()) break;
    i = j + ((text[j] == '\r' && j + 1 < text.size() && text[j + 1] == '\n') ? 2 : 1);
  }
  return out;
}

bool isValidationDocument(std::string_view normalized_text, uint64_t seed, double val_fraction) {
  if (val_fraction <= 0) return false;
  uint64_t h = core::mix64(core::fnv1a64(normalized_text) ^ core::mix64(seed ^ 0x76616c5f73706c74ULL));
  double u = static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  return u < val_fraction;
}

namespace {

// ---- inputs -------------------------------------------------------------------

bool supportedExtension(const fs::path& p) {
  auto e = p.extension().string();
  return e == ".txt" || e == ".json" || e == ".jsonl";
}

core::Result<std::vector<std::string>> collectFiles(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const auto& in : inputs) {
    std::error_code ec;
    auto status = fs::status(in, ec);
    if (ec || !fs::exists(status)) {
      return core::invalidArgument("--input '" + in + "': no such file or directory");
    }
    if (fs::is_directory(status)) {
      std::vector<std::string> found;
      for (auto it = fs::recursive_directory_iterator(in, fs::directory_options::follow_directory_symlink, ec);
           !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (it->is_regular_file() && supportedExtension(it->path())) found.push_back(it->path().string());
      }
      if (ec) return core::invalidArgument("--input '" + in + "': cannot list directory: " + ec.message());
      std::sort(found.begin(), found.end());
      if (found.empty()) {
        return core::invalidArgument("--input '" + in + "': directory holds no .txt, .json or .jsonl files");
      }
      files.insert(files.end(), found.begin(), found.end());
    } else {
      if (!supportedExtension(in)) {
        return core::invalidArgument("--input '" + in + "': unsupported file type; expected .txt, .json or .jsonl");
      }
      files.push_back(in);
    }
  }
  return files;
}

core::Status textOf(const nlohmann::json& obj, const std::string& where, std::vector<std::string>& docs) {
  if (!obj.is_object()) return core::invalidArgument(where + ": expected a JSON object with a \"text\" field");
  auto it = obj.find("text");
  if (it == obj.end() || !it->is_string()) {
    return core::invalidArgument(where + ": no string field \"text\"");
  }
  docs.push_back(it->get<std::string>());
  return core::okStatus();
}

// Raw documents of one file, in file order.
core::Status parseDocuments(const std::string& path, const std::string& content, std::vector<std::string>& docs) {
  auto ext = fs::path(path).extension().string();
  if (ext == ".txt") {
    docs.push_back(content);
    return core::okStatus();
  }
  try {
    if (ext == ".json") {
      auto j = nlohmann::json::parse(content);
      if (j.is_array()) {
        for (size_t i = 0; i < j.size(); ++i) {
          ARCH_RETURN_IF_ERROR(textOf(j[i], path + "[" + std::to_string(i) + "]", docs));
        }
        return core::okStatus();
      }
      return textOf(j, path, docs);
    }
    size_t line_no = 0, pos = 0;
    while (pos < content.size()) {
      size_t nl = content.find('\n', pos);
      if (nl == std::string::npos) nl = content.size();
      ++line_no;
      std::string_view line(content.data() + pos, nl - pos);
      pos = nl + 1;
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      std::string where = path + ":" + std::to_string(line_no);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const std::exception& e) {
        return core::invalidArgument(where + ": not valid JSON (" + e.what() + ")");
      }
      ARCH_RETURN_IF_ERROR(textOf(j, where, docs));
    }
    return core::okStatus();
  } catch (const std::exception& e) {
    return core::invalidArgument(path + ": not valid JSON (" + e.what() + ")");
  }
}

// ---- progress -----------------------------------------------------------------

// Throttled progress on stderr: "\r"-updated on a terminal, one line every
// few seconds otherwise (logs), and always a final line.
class Progress {
 public:
  Progress(bool enabled, std::string label, int64_t total_bytes)
      : enabled_(enabled),
        tty_(::isatty(fileno(stderr)) == 1),
        label_(std::move(label)),
        total_(total_bytes),
        t0_(core::Clock::now()),
        last_(t0_) {}
  void update(int64_t bytes, int64_t docs, bool final = false) {
    if (!enabled_) return;
    auto now = core::Clock::now();
    if (!final && now - last_ < (tty_ ? std::chrono::milliseconds(250) : std::chrono::milliseconds(5000))) return;
    last_ = now;
    double s = std::max(1e-9, core::secondsSince(t0_));
    std::fprintf(stderr, "%s%s: %.1f / %.1f MB, %lld docs, %.1f MB/s%s", tty_ ? "\r" : "", label_.c_str(),
                 bytes / 1e6, total_ / 1e6, static_cast<long long>(docs), bytes / 1e6 / s,
                 (final || !tty_) ? "\n" : "");
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  bool tty_;
  std::string label_;
  int64_t total_;
  core::TimePoint t0_, last_;
};

// ---- the two passes -------------------------------------------------------------

enum Decision : uint8_t { kDropEmpty, kDropDuplicate, kTrain, kVal };

struct Scan {
  std::vector<InputInfo> inputs;
  std::vector<uint8_t> decisions;  // one per parsed document, in input order
  DedupStats dedup;
  int64_t total_bytes = 0;
};

// Calls visit(file index, normalised text, decision index) for every parsed
// document; `check_inputs` re-verifies the files against the first pass.
core::Status forEachDocument(const std::vector<std::string>& files, const std::vector<InputInfo>* check_inputs,
                             Progress& progress,
                             const std::function<core::Status(size_t file, const std::string& raw, std::string& text,
                                                               int64_t doc_index)>& visit,
                             std::vector<InputInfo>* inputs_out) {
  int64_t bytes = 0, doc_index = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    ARCH_ASSIGN_OR_RETURN(std::string content, core::readFile(files[f]));
    std::string sha = core::sha256Hex(content);
    if (check_inputs != nullptr && (*check_inputs)[f].sha256 != sha) {
      return core::aborted("input '" + files[f] + "' changed while it was being prepared; run again");
    }
    std::vector<std::string> docs;
    ARCH_RETURN_IF_ERROR(parseDocuments(files[f], content, docs));
    if (inputs_out != nullptr) {
      inputs_out->push_back(InputInfo{files[f], sha, static_cast<int64_t>(content.size()),
                                      static_cast<int64_t>(docs.size())});
    }
    for (const auto& raw : docs) {
      std::string text = normalizeText(raw);
      ARCH_RETURN_IF_ERROR(visit(f, raw, text, doc_index++));
    }
    bytes += static_cast<int64_t>(content.size());
    progress.update(bytes, doc_index);
  }
  progress.update(bytes, doc_index, true);
  return core::okStatus();
}

// Splits a long line at whitespace into SentencePiece training sentences.
void addTrainingSentences(const std::string& text, std::vector<std::string>& out) {
  constexpr size_t kMax = 2048;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string_view line(text.data() + pos, nl - pos);
    pos = nl + 1;
    while (line.size() > kMax) {
      size_t cut = line.rfind(' ', kMax);
      if (cut == std::string_view::npos || cut == 0) cut = kMax;
      out.emplace_back(line.substr(0, cut));
      line.remove_prefix(cut);
    }
    if (!line.empty()) out.emplace_back(line);
  }
}

core::Status validateOptions(const PrepareOptions& o) {
  if (o.inputs.empty()) return core::invalidArgument("--input: at least one file or directory is needed");
  if (o.out.empty()) return core::invalidArgument("--out: an output directory is needed");
  if (o.tokenizer != "byte" && o.tokenizer != "spm") {
    return core::invalidArgument("--tokenizer '" + o.tokenizer + "' is not one of byte|spm");
  }
  if (o.tokenizer == "byte" && o.vocab != 0 && o.vocab < ByteTokenizer::kMinVocab) {
    return core::invalidArgument("--vocab " + std::to_string(o.vocab) +
                                 ": the byte tokenizer needs 259 ids (256 bytes + BOS/EOS/PAD); pass 0 or >= 259");
  }
  if (o.tokenizer == "spm" && (o.vocab < 300 || o.vocab > (1 << 20))) {
    return core::invalidArgument("--vocab " + std::to_string(o.vocab) +
                                 ": SentencePiece needs a vocabulary in [300, 1048576] (256 byte-fallback pieces + "
                                 "specials + merges), e.g. --vocab 8000");
  }
  if (!(o.val_fraction >= 0 && o.val_fraction < 1)) {
    return core::invalidArgument("--val-fraction " + std::to_string(o.val_fraction) + ": expected a value in [0, 1)");
  }
  if (o.shard_bytes < 1024) return core::invalidArgument("--shard-size: expected at least 1KB");
  if (o.spm_threads < 1 || o.spm_threads > 256) return core::invalidArgument("--spm-threads: expected 1..256");
  if (o.spm_model_type != "unigram" && o.spm_model_type != "bpe") {
    return core::invalidArgument("--spm-model-type '" + o.spm_model_type + "' is not one of unigram|bpe");
  }
  return core::okStatus();
}

// --out is replaced as a whole, so it must never hold what we read: not an
// input, not a directory containing one, not a directory inside one (its
// shards would be read as corpus next time). With --force an existing
// --out is replaced only if it is a prepared dataset (has a manifest):
// a typo'd --out must not delete a directory of someone's files.
core::Status checkOutputIsSafe(const fs::path& out, const std::vector<std::string>& inputs, bool force) {
  std::error_code ec;
  const fs::path o = fs::weakly_canonical(fs::absolute(out, ec), ec);
  auto inside = [](const fs::path& child, const fs::path& parent) {
    auto c = child.begin(), p = parent.begin();
    for (; p != parent.end() && !p->empty(); ++p, ++c) {
      if (c == child.end() || *c != *p) return false;
    }
    return true;
  };
  for (const auto& in : inputs) {
    const fs::path i = fs::weakly_canonical(fs::absolute(in, ec), ec);
    if (inside(i, o)) {
      return core::invalidArgument("--out '" + out.string() + "' is or contains the input '" + in +
                                   "'; preparing would replace it: choose an --out outside the inputs");
    }
    if (fs::is_directory(i, ec) && inside(o, i)) {
      return core::invalidArgument("--out '" + out.string() + "' is inside the input directory '" + in +
                                   "' (its shards would be read as corpus): choose an --out outside the inputs");
    }
  }
  if (!fs::exists(out, ec)) return core::okStatus();
  if (!force) {
    return core::Status(core::StatusCode::kAlreadyExists,
                        "--out '" + out.string() + "' already exists; pass --force to replace it or choose another directory");
  }
  if (!fs::is_directory(out, ec) || !fs::exists(out / kManifestFile, ec)) {
    return core::failedPrecondition("--out '" + out.string() + "' exists and is not a prepared dataset (no " +
                                    std::string(kManifestFile) + "); --force only replaces a prepared dataset: "
                                    "remove it yourself or choose another directory");
  }
  return core::okStatus();
}

// Removes the temporary directory unless released.
class TempDirGuard {
 public:
  explicit TempDirGuard(fs::path p) : path_(std::move(p)) {}
  ~TempDirGuard() {
    if (!path_.empty()) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  void release() { path_.clear(); }

 private:
  fs::path path_;
};

}  // namespace

core::Result<PrepareReport> prepareDataset(const PrepareOptions& options) {
  ARCH_RETURN_IF_ERROR(validateOptions(options));
  auto t0 = core::Clock::now();
  fs::path out(options.out);
  while (!out.empty() && out.filename().empty()) out = out.parent_path();  // "dir/" -> "dir"
  std::error_code ec;
  ARCH_RETURN_IF_ERROR(checkOutputIsSafe(out, options.inputs, options.force));
  ARCH_ASSIGN_OR_RETURN(std::vector<std::string> files, collectFiles(options.inputs));

  PrepareReport report;
  Manifest& m = report.manifest;
  m.options = options;
  m.options.out.clear();
  m.options.force = false;
  m.options.progress = false;
  m.options.cache_bytes = 0;

  // Pass 1: read, hash, normalise, dedup, split; collect spm training text.
  Scan scan;
  std::unordered_set<std::string> seen;
  std::vector<std::string> spm_sentences;
  const bool spm = options.tokenizer == "spm";
  // Kept documents stay in memory up to a budget, so pass 2 need not read,
  // parse and normalise the inputs again; above it, pass 2 re-reads them.
  const int64_t kCacheBudget = options.cache_bytes;
  std::vector<std::pair<int64_t, std::string>> cache;  // (decision index, normalised text)
  int64_t cache_bytes = 0;
  bool cache_ok = true;
  {
    int64_t total = 0;
    for (const auto& f : files) total += static_cast<int64_t>(fs::file_size(f, ec));
    scan.total_bytes = total;
    Progress progress(options.progress, "prepare: scan", total);
    auto visit = [&](size_t, const std::string&, std::string& text, int64_t) -> core::Status {
      ++scan.dedup.documents_read;
      if (text.empty()) {
        ++scan.dedup.empty_dropped;
        scan.decisions.push_back(kDropEmpty);
        return core::okStatus();
      }
      auto digest = core::sha256(text.data(), text.size());
      if (!seen.insert(std::string(reinterpret_cast<const char*>(digest.data()), digest.size())).second) {
        ++scan.dedup.duplicates_removed;
        scan.decisions.push_back(kDropDuplicate);
        return core::okStatus();
      }
      ++scan.dedup.documents_kept;
      bool val = isValidationDocument(text, options.seed, options.val_fraction);
      scan.decisions.push_back(val ? kVal : kTrain);
      if (spm && !val) addTrainingSentences(text, spm_sentences);
      if (cache_ok) {
        cache_bytes += static_cast<int64_t>(text.size());
        if (cache_bytes > kCacheBudget) {
          cache_ok = false;
          cache.clear();
          cache.shrink_to_fit();
        } else {
          cache.emplace_back(static_cast<int64_t>(scan.decisions.size()) - 1, std::move(text));
        }
      }
      return core::okStatus();
    };
    ARCH_RETURN_IF_ERROR(forEachDocument(files, nullptr, progress, visit, &scan.inputs));
  }
  if (scan.dedup.documents_kept == 0) {
    return core::invalidArgument("--input: no non-empty documents found in " + std::to_string(files.size()) + " file(s)");
  }
  // A requested validation split is never empty: if the hash picked no
  // document, the kept document that comes last in input order moves to val
  // (deterministic); with a single document, val stays empty.
  {
    int64_t n_val = std::count(scan.decisions.begin(), scan.decisions.end(), kVal);
    if (options.val_fraction > 0 && n_val == 0 && scan.dedup.documents_kept >= 2) {
      for (auto it = scan.decisions.rbegin(); it != scan.decisions.rend(); ++it) {
        if (*it == kTrain) {
          *it = kVal;
          break;
        }
      }
      // spm sentences from that document stay in the training text: harmless.
    }
  }
  m.inputs = scan.inputs;
  m.dedup = scan.dedup;

  // Output goes to a temporary sibling directory first.
  if (out.has_parent_path()) {
    fs::create_directories(out.parent_path(), ec);
    if (ec) return core::unavailable("cannot create '" + out.parent_path().string() + "': " + ec.message());
  }
  ARCH_ASSIGN_OR_RETURN(fs::path tmp, core::makeSiblingTempDir(out, ".tmp-"));
  TempDirGuard guard(tmp);

  // Tokenizer.
  std::unique_ptr<Tokenizer> tok;
  if (spm) {
    auto ts = core::Clock::now();
    if (options.progress) std::fprintf(stderr, "prepare: training SentencePiece (%zu sentences, vocab %lld)\n",
                                       spm_sentences.size(), static_cast<long long>(options.vocab));
    SpmTrainOptions so;
    so.vocab_size = options.vocab;
    so.model_type = options.spm_model_type;
    so.threads = options.spm_threads;
    so.seed = options.seed;
    ARCH_ASSIGN_OR_RETURN(std::string model, trainSpm(spm_sentences, so));
    spm_sentences.clear();
    spm_sentences.shrink_to_fit();
    report.spm_train_seconds = core::secondsSince(ts);
    ARCH_RETURN_IF_ERROR(core::writeFile(tmp / "tokenizer.model", model));
    ARCH_ASSIGN_OR_RETURN(auto sp, SpmTokenizer::fromSerialized(model));
    m.tokenizer.kind = "spm";
    m.tokenizer.file = "tokenizer.model";
    m.tokenizer.sha256 = core::sha256Hex(model);
    m.tokenizer.unk_id = sp->unkId();
    tok = std::move(sp);
  } else {
    tok = std::make_unique<ByteTokenizer>(options.vocab == 0 ? ByteTokenizer::kMinVocab : options.vocab);
    m.tokenizer.kind = "byte";
  }
  m.tokenizer.vocab_size = tok->vocabSize();
  m.tokenizer.bos_id = tok->bosId();
  m.tokenizer.eos_id = tok->eosId();
  m.tokenizer.pad_id = tok->padId();
  m.vocab_size = tok->vocabSize();
  m.token_bytes = tokenBytesForVocab(m.vocab_size);
  m.dtype = m.token_bytes == 2 ? "uint16" : "uint32";

  // Pass 2: tokenize kept documents into shards.
  {
    ShardWriter train(tmp, "train", m.vocab_size, options.shard_bytes);
    ShardWriter val(tmp, "val", m.vocab_size, options.shard_bytes);
    Progress progress(options.progress, "prepare: tokenize", cache_ok ? cache_bytes : scan.total_bytes);
    const int32_t eos = tok->eosId();
    auto visit = [&](size_t, const std::string&, std::string& text, int64_t idx) -> core::Status {
      if (idx >= static_cast<int64_t>(scan.decisions.size())) {
        return core::aborted("inputs changed while they were being prepared; run again");
      }
      uint8_t d = scan.decisions[static_cast<size_t>(idx)];
      if (d != kTrain && d != kVal) return core::okStatus();
      std::vector<int32_t> ids = tok->encode(text);
      return (d == kVal ? val : train).addDocument(ids, eos);
    };
    if (cache_ok) {
      int64_t done = 0;
      for (auto& [idx, text] : cache) {
        ARCH_RETURN_IF_ERROR(visit(0, text, text, idx));
        done += static_cast<int64_t>(text.size());
        std::string().swap(text);  // release as we go
        progress.update(done, idx + 1);
      }
      progress.update(done, static_cast<int64_t>(scan.decisions.size()), true);
    } else {
      ARCH_RETURN_IF_ERROR(forEachDocument(files, &scan.inputs, progress, visit, nullptr));
    }
    ARCH_ASSIGN_OR_RETURN(m.train, train.finish());
    ARCH_ASSIGN_OR_RETURN(m.val, val.finish());
  }
  if (m.train.tokens == 0) return core::invalidArgument("--val-fraction: every document went to validation");

  ARCH_RETURN_IF_ERROR(core::writeFile(tmp / kManifestFile, manifestToJson(m)));
  fs::permissions(tmp, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                           fs::perms::others_read | fs::perms::others_exec, ec);

  // Publish: rename into place (replacing an old directory only with --force).
  if (fs::exists(out, ec) && !options.force) {
    return core::Status(core::StatusCode::kAlreadyExists, "--out '" + out.string() + "' appeared while preparing");
  }
  ARCH_RETURN_IF_ERROR(checkOutputIsSafe(out, options.inputs, options.force).withContext("before publishing"));
  ARCH_RETURN_IF_ERROR(core::replaceDirectoryAtomic(tmp, out));
  guard.release();
  m.dir = out;
  report.input_bytes = scan.total_bytes;
  report.seconds = core::secondsSince(t0);
  return report;
}

}  // namespace archipelago::data
