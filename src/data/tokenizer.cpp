#include "archipelago/data/tokenizer.h"

#include <dlfcn.h>

#include <string>
#include <system_error>
#include <utility>

#include "archipelago/core/hash.h"
#include "data_spm_shim/spm_shim.h"

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

// ---- SentencePiece shim ---------------------------------------------------------
//
// SentencePiece lives in libarchipelago_spm, opened here with RTLD_LOCAL |
// RTLD_DEEPBIND instead of being linked: Debian's libsentencepiece exports a
// bundled protobuf-lite that, in the global scope of a binary that also links
// libtorch (and so libprotobuf.so.32), interposes on libprotobuf's own symbols
// and crashes its static initialisers before main(). See spm_shim.h.

namespace {

// ASan and TSan abort a process that dlopen()s with RTLD_DEEPBIND: the shim
// would bind malloc and friends to libc ahead of the sanitizer's interceptors.
// Sanitizer builds are torch-free (cmake/Sanitizers.cmake), so the protobuf
// clash that DEEPBIND prevents cannot arise in them.
#ifdef ARCHIPELAGO_SANITIZED
constexpr int kShimOpenFlags = RTLD_NOW | RTLD_LOCAL;
#else
constexpr int kShimOpenFlags = RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND;
#endif

// The process-wide handle on the shim: loaded on first use, never unloaded
// (models may outlive any owner we could pick). Immutable after construction.
struct SpmShim {
  const ArchSpmApi* api = nullptr;  // null when loading failed
  core::Status status;              // why it failed
};

std::filesystem::path executableDir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::filesystem::path() : exe.parent_path();
}

// Where the shim may be, in order: next to the running binary, where this
// build tree put it, and the install layout's <prefix>/lib beside <prefix>/bin.
std::vector<std::filesystem::path> shimCandidates() {
  std::vector<std::filesystem::path> out;
  const auto exe_dir = executableDir();
  if (!exe_dir.empty()) out.push_back(exe_dir / ARCHIPELAGO_SPM_SHIM_FILE_NAME);
  out.emplace_back(ARCHIPELAGO_SPM_SHIM_BUILD_PATH);
  if (!exe_dir.empty()) out.push_back(exe_dir.parent_path() / "lib" / ARCHIPELAGO_SPM_SHIM_FILE_NAME);
  return out;
}

SpmShim loadShim() {
  SpmShim shim;
  std::string tried;
  for (const auto& path : shimCandidates()) {
    if (!tried.empty()) tried += "; ";
    tried += "'" + path.string() + "' ";
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) {
      tried += "(not found)";
      continue;
    }
    void* handle = ::dlopen(path.c_str(), kShimOpenFlags);
    if (handle == nullptr) {
      const char* err = ::dlerror();
      tried += std::string("(") + (err != nullptr ? err : "dlopen failed") + ")";
      continue;
    }
    auto get_api = reinterpret_cast<ArchSpmGetApiFn>(::dlsym(handle, ARCH_SPM_GET_API_SYMBOL));
    const ArchSpmApi* api = get_api != nullptr ? get_api(ARCH_SPM_ABI_VERSION) : nullptr;
    if (api == nullptr) {
      tried += get_api == nullptr ? "(no symbol " ARCH_SPM_GET_API_SYMBOL ")"
                                  : "(ABI version differs from " + std::to_string(ARCH_SPM_ABI_VERSION) + ")";
      ::dlclose(handle);
      continue;
    }
    shim.api = api;  // the handle stays open for the life of the process
    return shim;
  }
  shim.status = core::unavailable(
      std::string("cannot load the SentencePiece shim " ARCHIPELAGO_SPM_SHIM_FILE_NAME " (needed by spm tokenizers); tried ") +
      tried + "; build the `archipelago_spm` target, or install the library next to the binary or in ../lib");
  return shim;
}

// Thread-safe: the first caller loads, the others wait (static init).
core::Result<const ArchSpmApi*> spmApi() {
  static const SpmShim shim = loadShim();
  if (shim.api == nullptr) return shim.status;
  return shim.api;
}

// Takes ownership of a shim error message (NULL = success).
std::string takeError(const ArchSpmApi* api, char* err) {
  std::string msg = err != nullptr ? err : "";
  api->free_buffer(err);
  return msg;
}

}  // namespace

// ---- SpmTokenizer -------------------------------------------------------------

struct SpmTokenizer::Impl {
  const ArchSpmApi* api = nullptr;
  ArchSpmModel* model = nullptr;  // owned
  int32_t piece_size = 0;

  ~Impl() {
    if (model != nullptr) api->free_model(model);
  }
};

SpmTokenizer::SpmTokenizer() : impl_(std::make_unique<Impl>()) {}
SpmTokenizer::~SpmTokenizer() = default;

core::Result<std::unique_ptr<SpmTokenizer>> SpmTokenizer::load(const std::filesystem::path& model_file) {
  ARCH_ASSIGN_OR_RETURN(const ArchSpmApi* api, spmApi());
  std::unique_ptr<SpmTokenizer> t(new SpmTokenizer());
  t->impl_->api = api;
  if (char* err = api->load_file(model_file.c_str(), &t->impl_->model)) {
    return core::dataLoss("cannot load SentencePiece model '" + model_file.string() + "': " + takeError(api, err));
  }
  t->impl_->piece_size = api->piece_size(t->impl_->model);
  return t;
}

core::Result<std::unique_ptr<SpmTokenizer>> SpmTokenizer::fromSerialized(const std::string& model_proto) {
  ARCH_ASSIGN_OR_RETURN(const ArchSpmApi* api, spmApi());
  std::unique_ptr<SpmTokenizer> t(new SpmTokenizer());
  t->impl_->api = api;
  if (char* err = api->load_bytes(model_proto.data(), model_proto.size(), &t->impl_->model)) {
    return core::dataLoss("cannot parse SentencePiece model: " + takeError(api, err));
  }
  t->impl_->piece_size = api->piece_size(t->impl_->model);
  return t;
}

std::vector<int32_t> SpmTokenizer::encode(std::string_view text) const {
  const ArchSpmApi* api = impl_->api;
  int32_t* ids = nullptr;
  size_t n = 0;
  char* err = api->encode(impl_->model, text.data(), text.size(), &ids, &n);
  ARCH_CHECK_MSG(err == nullptr, "SentencePiece encode failed: " + takeError(api, err));
  std::vector<int32_t> out(ids, ids + n);
  api->free_buffer(ids);
  return out;
}

std::string SpmTokenizer::decode(const std::vector<int32_t>& ids) const {
  const ArchSpmApi* api = impl_->api;
  std::vector<int32_t> in;
  in.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < impl_->piece_size) in.push_back(id);
  }
  char* text = nullptr;
  size_t len = 0;
  char* err = api->decode(impl_->model, in.data(), in.size(), &text, &len);
  ARCH_CHECK_MSG(err == nullptr, "SentencePiece decode failed: " + takeError(api, err));
  std::string out(text, len);
  api->free_buffer(text);
  return out;
}

int64_t SpmTokenizer::vocabSize() const { return impl_->piece_size; }
int32_t SpmTokenizer::bosId() const { return impl_->api->bos_id(impl_->model); }
int32_t SpmTokenizer::eosId() const { return impl_->api->eos_id(impl_->model); }
int32_t SpmTokenizer::padId() const { return impl_->api->pad_id(impl_->model); }
int32_t SpmTokenizer::unkId() const { return impl_->api->unk_id(impl_->model); }

// ---- training -----------------------------------------------------------------

core::Result<std::string> trainSpm(const std::vector<std::string>& sentences, const SpmTrainOptions& options) {
  if (options.model_type != "unigram" && options.model_type != "bpe") {
    return core::invalidArgument("spm model type '" + options.model_type + "' is not one of unigram|bpe");
  }
  if (sentences.empty()) return core::invalidArgument("no training text for SentencePiece");
  ARCH_ASSIGN_OR_RETURN(const ArchSpmApi* api, spmApi());
  const std::vector<std::pair<std::string, std::string>> kw = {
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
  std::vector<const char*> keys, values;
  for (const auto& [k, v] : kw) {
    keys.push_back(k.c_str());
    values.push_back(v.c_str());
  }
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  ptrs.reserve(sentences.size());
  lens.reserve(sentences.size());
  for (const auto& s : sentences) {
    ptrs.push_back(s.data());
    lens.push_back(s.size());
  }
  char* model = nullptr;
  size_t model_len = 0;
  // The shim serialises training (the trainer's seed and log level are global).
  char* err = api->train(ptrs.data(), lens.data(), ptrs.size(), keys.data(), values.data(), keys.size(),
                         static_cast<uint32_t>(options.seed & 0xffffffffu), &model, &model_len);
  if (err != nullptr) {
    return core::invalidArgument("SentencePiece training failed (vocab " + std::to_string(options.vocab_size) +
                                 "): " + takeError(api, err) + "; try a smaller --vocab");
  }
  std::string out(model, model_len);
  api->free_buffer(model);
  return out;
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
