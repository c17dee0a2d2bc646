// C ABI of libarchipelago_spm, the SentencePiece shim.
//
// Why it exists: Debian's libsentencepiece.so.0 bundles its own protobuf-lite
// and exports those google::protobuf symbols. A binary that also links
// libtorch loads the system libprotobuf.so.32, whose static initialisers then
// bind to sentencepiece's copies (symbol interposition) and crash before
// main(). The data layer therefore never links sentencepiece: it dlopen()s
// this shim with RTLD_LOCAL | RTLD_DEEPBIND, so sentencepiece's symbols stay
// out of the global scope and sentencepiece binds to its own protobuf.
//
// Only plain C types cross this boundary. The one exported symbol is
// arch_spm_get_api(); everything else is reached through the returned table.
// Error convention: functions returning `char*` return NULL on success, or a
// NUL-terminated message owned by the caller, released with free_buffer().
// Output buffers (model bytes, ids, text) are likewise released with
// free_buffer().
#ifndef ARCHIPELAGO_DATA_SPM_SHIM_SPM_SHIM_H_
#define ARCHIPELAGO_DATA_SPM_SHIM_SPM_SHIM_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever ArchSpmApi changes layout or meaning; a shim of another
// version refuses to hand out its table.
#define ARCH_SPM_ABI_VERSION 1u

// A loaded SentencePiece model (opaque; owned by the caller, free_model()).
typedef struct ArchSpmModel ArchSpmModel;

typedef struct ArchSpmApi {
  uint32_t abi_version;
  // Trains a model on n sentences (bytes + lengths, no terminator needed)
  // with SentencePieceTrainer's key/value options and the random seed.
  // Serialised under one process-wide lock (the trainer's state is global).
  // On success *model_out / *model_len hold the serialised ModelProto.
  char* (*train)(const char* const* sentences, const size_t* sentence_lens, size_t n_sentences,
                 const char* const* option_keys, const char* const* option_values, size_t n_options,
                 uint32_t seed, char** model_out, size_t* model_len);
  // Loads a model from a file (path NUL-terminated) or from serialised bytes.
  char* (*load_file)(const char* path, ArchSpmModel** model_out);
  char* (*load_bytes)(const char* data, size_t len, ArchSpmModel** model_out);
  void (*free_model)(ArchSpmModel* model);
  // encode/decode and the queries are const on the model: safe concurrently.
  char* (*encode)(const ArchSpmModel* model, const char* text, size_t len, int32_t** ids_out, size_t* n_out);
  // ids must lie in [0, piece_size).
  char* (*decode)(const ArchSpmModel* model, const int32_t* ids, size_t n, char** text_out, size_t* len_out);
  int32_t (*piece_size)(const ArchSpmModel* model);
  int32_t (*bos_id)(const ArchSpmModel* model);
  int32_t (*eos_id)(const ArchSpmModel* model);
  int32_t (*pad_id)(const ArchSpmModel* model);
  int32_t (*unk_id)(const ArchSpmModel* model);
  void (*free_buffer)(void* p);
} ArchSpmApi;

// The function table, or NULL when abi_version differs from the shim's.
typedef const ArchSpmApi* (*ArchSpmGetApiFn)(uint32_t abi_version);
#define ARCH_SPM_GET_API_SYMBOL "arch_spm_get_api"

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // ARCHIPELAGO_DATA_SPM_SHIM_SPM_SHIM_H_
