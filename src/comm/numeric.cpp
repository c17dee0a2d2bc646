// Bulk fp32 <-> bf16/fp16 conversions. The scalar conversions are inline in
// numeric.h; these loops exist so callers get one auto-vectorised pass.
#include "archipelago/comm/numeric.h"

#include "archipelago/core/status.h"

namespace archipelago::comm {

void floatToBf16(std::span<const float> in, std::span<uint16_t> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "floatToBf16: spans differ in size");
  const float* __restrict src = in.data();
  uint16_t* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = floatToBf16(src[i]);
}

void bf16ToFloat(std::span<const uint16_t> in, std::span<float> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "bf16ToFloat: spans differ in size");
  const uint16_t* __restrict src = in.data();
  float* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = bf16ToFloat(src[i]);
}

void floatToFp16(std::span<const float> in, std::span<uint16_t> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "floatToFp16: spans differ in size");
  const float* __restrict src = in.data();
  uint16_t* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = floatToFp16(src[i]);
}

void fp16ToFloat(std::span<const uint16_t> in, std::span<float> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "fp16ToFloat: spans differ in size");
  const uint16_t* __restrict src = in.data();
  float* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = fp16ToFloat(src[i]);
}

}  // namespace archipelago::comm
