// Element types and reduction operators of the comm layer. The comm layer
// works on raw byte spans tagged with a DType (no libtorch); reductions of
// bf16/fp16 convert each element to fp32, add in fp32 and round back
// (round-to-nearest-even), so no intermediate is summed in 16-bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "archipelago/core/status.h"

namespace archipelago::comm {

enum class DType : uint8_t { kF32 = 0, kF64, kF16, kBF16, kI32, kI64, kU8, kI8 };

enum class ReduceOp : uint8_t {
  kSum = 0,
  kAvg,          // sum / group size
  kMax,
  kMin,
  kWeightedAvg,  // sum(w_i x_i) / sum(w_i); each rank passes its weight
};

size_t dtypeSize(DType t);
std::string_view dtypeName(DType t);
std::string_view reduceOpName(ReduceOp op);
core::Result<DType> parseDType(std::string_view name);
bool isFloating(DType t);

// ---- 16-bit float conversions (bit-exact, round-to-nearest-even) -------------
inline float bf16ToFloat(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t floatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}
float fp16ToFloat(uint16_t h);
uint16_t floatToFp16(float f);

// dst[i] = dst[i] (op) src[i] for `count` elements of `type`. kAvg and
// kWeightedAvg reduce as kSum (the division happens once, at the owner).
void reduceInto(DType type, ReduceOp op, void* dst, const void* src, size_t count);
// x[i] *= factor (floating types; integer types: truncating division when
// factor = 1/n is requested through divideBy).
void scaleInPlace(DType type, void* data, size_t count, double factor);
// x[i] /= divisor; integer types use integer division.
void divideInPlace(DType type, void* data, size_t count, double divisor);

}  // namespace archipelago::comm
