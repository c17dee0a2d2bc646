// Bulk fp32 <-> bf16/fp16 conversions. The scalar conversions are inline in
// numeric.h; these loops exist so callers get one auto-vectorised pass.
#include "archipelago/comm/numeric.h"

#include "archipelago/core/status.h"

namespace archipelago::comm {

void floatToBf16Sat(std::span<const float> in, std::span<uint16_t> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "floatToBf16Sat: spans differ in size");
  const float* __restrict src = in.data();
  uint16_t* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = floatToBf16Sat(src[i]);
}

void bf16BitsToFloat(std::span<const uint16_t> in, std::span<float> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "bf16BitsToFloat: spans differ in size");
  const uint16_t* __restrict src = in.data();
  float* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = bf16BitsToFloat(src[i]);
}

void floatToFp16Sat(std::span<const float> in, std::span<uint16_t> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "floatToFp16Sat: spans differ in size");
  const float* __restrict src = in.data();
  uint16_t* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = floatToFp16Sat(src[i]);
}

void fp16BitsToFloat(std::span<const uint16_t> in, std::span<float> out) {
  ARCH_CHECK_MSG(in.size() == out.size(), "fp16BitsToFloat: spans differ in size");
  const uint16_t* __restrict src = in.data();
  float* __restrict dst = out.data();
  for (size_t i = 0; i < in.size(); ++i) dst[i] = fp16BitsToFloat(src[i]);
}

}  // namespace archipelago::comm
