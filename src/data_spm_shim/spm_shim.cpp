// libarchipelago_spm: the only code in Archipelago that calls SentencePiece.
// See spm_shim.h for why it is a separately dlopen()ed library. Everything
// here is compiled with hidden visibility; only arch_spm_get_api is exported,
// and no C++ exception or type crosses the C boundary.
#include "data_spm_shim/spm_shim.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

struct ArchSpmModel {
  sentencepiece::SentencePieceProcessor sp;
};

namespace {

void* mallocOrDie(size_t n) {
  void* p = std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) {
    std::fprintf(stderr, "archipelago_spm: fatal: out of memory (%zu bytes)\n", n);
    std::abort();
  }
  return p;
}

// A caller-owned copy of `s` (the error / buffer convention of spm_shim.h).
char* copyOut(const std::string& s, size_t* len_out = nullptr) {
  char* p = static_cast<char*>(mallocOrDie(s.size() + 1));
  std::memcpy(p, s.data(), s.size());
  p[s.size()] = '\0';
  if (len_out != nullptr) *len_out = s.size();
  return p;
}

char* error(const std::string& msg) { return copyOut(msg); }

char* currentException() {
  try {
    throw;
  } catch (const std::exception& e) {
    return error(std::string("exception in SentencePiece: ") + e.what());
  } catch (...) {
    return error("unknown exception in SentencePiece");
  }
}

// Feeds the caller's (pointer, length) sentences to the trainer one at a time,
// so the corpus is never copied as a whole.
class SpanIterator : public sentencepiece::SentenceIterator {
 public:
  SpanIterator(const char* const* s, const size_t* lens, size_t n) : s_(s), lens_(lens), n_(n) { fill(); }
  bool done() const override { return i_ >= n_; }
  void Next() override {
    ++i_;
    fill();
  }
  const std::string& value() const override { return current_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void fill() {
    if (i_ < n_) current_.assign(s_[i_], lens_[i_]);
  }
  const char* const* s_;
  const size_t* lens_;
  size_t n_;
  size_t i_ = 0;
  std::string current_;
};

char* train(const char* const* sentences, const size_t* sentence_lens, size_t n_sentences,
            const char* const* option_keys, const char* const* option_values, size_t n_options, uint32_t seed,
            char** model_out, size_t* model_len) {
  try {
    std::unordered_map<std::string, std::string> kw;
    for (size_t i = 0; i < n_options; ++i) kw[option_keys[i]] = option_values[i];
    // The trainer keeps global state (random seed, log level): one at a time.
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    sentencepiece::SetRandomGeneratorSeed(seed);
    SpanIterator it(sentences, sentence_lens, n_sentences);
    std::string model;
    auto st = sentencepiece::SentencePieceTrainer::Train(kw, &it, &model);
    if (!st.ok()) return error(st.ToString());
    *model_out = copyOut(model, model_len);
    return nullptr;
  } catch (...) {
    return currentException();
  }
}

char* loadFile(const char* path, ArchSpmModel** model_out) {
  try {
    auto m = std::make_unique<ArchSpmModel>();
    auto st = m->sp.Load(path);
    if (!st.ok()) return error(st.ToString());
    *model_out = m.release();
    return nullptr;
  } catch (...) {
    return currentException();
  }
}

char* loadBytes(const char* data, size_t len, ArchSpmModel** model_out) {
  try {
    auto m = std::make_unique<ArchSpmModel>();
    auto st = m->sp.LoadFromSerializedProto(std::string_view(data, len));
    if (!st.ok()) return error(st.ToString());
    *model_out = m.release();
    return nullptr;
  } catch (...) {
    return currentException();
  }
}

void freeModel(ArchSpmModel* model) { delete model; }

char* encode(const ArchSpmModel* model, const char* text, size_t len, int32_t** ids_out, size_t* n_out) {
  try {
    std::vector<int> ids;
    auto st = model->sp.Encode(std::string_view(text, len), &ids);
    if (!st.ok()) return error(st.ToString());
    auto* out = static_cast<int32_t*>(mallocOrDie(ids.size() * sizeof(int32_t)));
    for (size_t i = 0; i < ids.size(); ++i) out[i] = static_cast<int32_t>(ids[i]);
    *ids_out = out;
    *n_out = ids.size();
    return nullptr;
  } catch (...) {
    return currentException();
  }
}

char* decode(const ArchSpmModel* model, const int32_t* ids, size_t n, char** text_out, size_t* len_out) {
  try {
    std::vector<int> in(ids, ids + n);
    std::string out;
    auto st = model->sp.Decode(in, &out);
    if (!st.ok()) return error(st.ToString());
    *text_out = copyOut(out, len_out);
    return nullptr;
  } catch (...) {
    return currentException();
  }
}

int32_t pieceSize(const ArchSpmModel* model) { return model->sp.GetPieceSize(); }
int32_t bosId(const ArchSpmModel* model) { return model->sp.bos_id(); }
int32_t eosId(const ArchSpmModel* model) { return model->sp.eos_id(); }
int32_t padId(const ArchSpmModel* model) { return model->sp.pad_id(); }
int32_t unkId(const ArchSpmModel* model) { return model->sp.unk_id(); }
void freeBuffer(void* p) { std::free(p); }

constexpr ArchSpmApi kApi = {
    ARCH_SPM_ABI_VERSION, &train,  &loadFile, &loadBytes, &freeModel, &encode, &decode,
    &pieceSize,           &bosId,  &eosId,    &padId,     &unkId,     &freeBuffer,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const ArchSpmApi* arch_spm_get_api(uint32_t abi_version) {
  return abi_version == ARCH_SPM_ABI_VERSION ? &kApi : nullptr;
}

static_assert(std::is_same_v<decltype(&arch_spm_get_api), ArchSpmGetApiFn>,
              "arch_spm_get_api must match the ArchSpmGetApiFn the data layer resolves");
