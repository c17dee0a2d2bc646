// libFuzzer target: a safetensors file (model::parseSafetensors), the
// format of every checkpoint's weights and of imported Hugging Face models.
// Corpus: tests/fuzz/corpus/safetensors. CI runs it through
// tests/model/safetensors_fuzz_smoke_test.cpp. Needs libtorch.
//
// Invariants of an accepted file: tensor names sorted and unique; every
// tensor's byte size is product(shape) x dtype size; the tensors cover the
// data section exactly once (their sizes add up to it); and writing them
// back gives a file that parses to the same names, shapes, dtypes, bytes
// and metadata.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "archipelago/model/safetensors.h"

namespace archipelago::fuzz {

inline uint64_t dataBytes(std::string_view file) {
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(file[i])) << (8 * i);
  return file.size() - 8 - n;
}

inline void checkSameTensors(const model::SafetensorsFile& a, const model::SafetensorsFile& b) {
  if (a.tensors.size() != b.tensors.size() || a.metadata != b.metadata) __builtin_trap();
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const auto& [na, ta] = a.tensors[i];
    const auto& [nb, tb] = b.tensors[i];
    if (na != nb || ta.sizes() != tb.sizes() || ta.scalar_type() != tb.scalar_type()) __builtin_trap();
    if (ta.nbytes() != tb.nbytes() || std::memcmp(ta.data_ptr(), tb.data_ptr(), ta.nbytes()) != 0) __builtin_trap();
  }
}

inline int fuzzSafetensors(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto f = model::parseSafetensors(bytes);
  if (!f.isOk()) return 0;
  uint64_t total = 0;
  for (size_t i = 0; i < f->tensors.size(); ++i) {
    const auto& [name, t] = f->tensors[i];
    if (i > 0 && !(f->tensors[i - 1].first < name)) __builtin_trap();
    if (!t.is_contiguous() || t.device() != torch::kCPU) __builtin_trap();
    uint64_t numel = 1;
    for (int64_t d : t.sizes()) {
      if (d < 0) __builtin_trap();
      numel *= static_cast<uint64_t>(d);
    }
    if (t.nbytes() != numel * t.element_size()) __builtin_trap();
    total += t.nbytes();
  }
  if (total != dataBytes(bytes)) __builtin_trap();
  auto again = model::serializeSafetensors(f->tensors, f->metadata);
  if (!again.isOk()) return 0;  // names the writer refuses ("" or "__metadata__" as a tensor)
  auto back = model::parseSafetensors(*again);
  if (!back.isOk()) __builtin_trap();
  checkSameTensors(*f, *back);
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzSafetensors themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzSafetensors(data, size);
}
#endif
