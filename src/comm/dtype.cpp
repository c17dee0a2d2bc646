#include "archipelago/comm/dtype.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace archipelago::comm {

size_t dtypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF64: return 8;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
    case DType::kI8: return 1;
  }
  return 1;
}

std::string_view dtypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF64: return "f64";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
    case DType::kU8: return "u8";
    case DType::kI8: return "i8";
  }
  return "?";
}

std::string_view reduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kWeightedAvg: return "weighted_avg";
  }
  return "?";
}

core::Result<DType> parseDType(std::string_view name) {
  for (DType t : {DType::kF32, DType::kF64, DType::kF16, DType::kBF16, DType::kI32, DType::kI64, DType::kU8,
                  DType::kI8}) {
    if (dtypeName(t) == name) return t;
  }
  if (name == "fp32" || name == "float32") return DType::kF32;
  if (name == "fp16" || name == "float16") return DType::kF16;
  return core::invalidArgument("dtype '" + std::string(name) + "' is not one of f32|f64|f16|bf16|i32|i64|u8|i8");
}

bool isFloating(DType t) {
  return t == DType::kF32 || t == DType::kF64 || t == DType::kF16 || t == DType::kBF16;
}

float fp16ToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        mant <<= 1;
        ++e;
      } while (!(mant & 0x400u));
      mant &= 0x3ffu;
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t floatToFp16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (absu > 0x7f800000u ? 0x200u : 0));
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in fp16
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t e = absu >> 23;
    uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    // value = m * 2^(e-150); fp16 subnormal unit = 2^-24 -> q = m * 2^(e-126)
    uint32_t sh = 126 - e;  // >= 1
    uint32_t q = m >> sh;
    uint32_t rem = m & ((1u << sh) - 1);
    uint32_t half = 1u << (sh - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t e = (absu >> 23) - 127 + 15;
  uint32_t m = absu & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;  // may carry into exponent: correct
  return static_cast<uint16_t>(sign | h);
}

namespace {

// __restrict: the buffers never overlap (scratch vs destination), which lets
// the compiler vectorise without runtime alias checks.
template <typename T>
void reduceTyped(ReduceOp op, T* __restrict d, const T* __restrict s, size_t n) {
  if (op == ReduceOp::kMax) {
    for (size_t i = 0; i < n; ++i) d[i] = std::max(d[i], s[i]);
  } else if (op == ReduceOp::kMin) {
    for (size_t i = 0; i < n; ++i) d[i] = std::min(d[i], s[i]);
  } else {
    for (size_t i = 0; i < n; ++i) d[i] = static_cast<T>(d[i] + s[i]);
  }
}

template <float (*ToF)(uint16_t), uint16_t (*FromF)(float)>
void reduce16(ReduceOp op, uint16_t* d, const uint16_t* s, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float a = ToF(d[i]), b = ToF(s[i]);
    float r = op == ReduceOp::kMax ? std::max(a, b) : op == ReduceOp::kMin ? std::min(a, b) : a + b;
    d[i] = FromF(r);
  }
}

template <typename T>
void scaleTyped(T* d, size_t n, double f) {
  for (size_t i = 0; i < n; ++i) d[i] = static_cast<T>(d[i] * f);
}

}  // namespace

void reduceInto(DType type, ReduceOp op, void* dst, const void* src, size_t count) {
  switch (type) {
    case DType::kF32: return reduceTyped(op, static_cast<float*>(dst), static_cast<const float*>(src), count);
    case DType::kF64: return reduceTyped(op, static_cast<double*>(dst), static_cast<const double*>(src), count);
    case DType::kI32: return reduceTyped(op, static_cast<int32_t*>(dst), static_cast<const int32_t*>(src), count);
    case DType::kI64: return reduceTyped(op, static_cast<int64_t*>(dst), static_cast<const int64_t*>(src), count);
    case DType::kU8: return reduceTyped(op, static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), count);
    case DType::kI8: return reduceTyped(op, static_cast<int8_t*>(dst), static_cast<const int8_t*>(src), count);
    case DType::kBF16:
      return reduce16<bf16ToFloat, floatToBf16>(op, static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src),
                                                count);
    case DType::kF16:
      return reduce16<fp16ToFloat, floatToFp16>(op, static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src),
                                                count);
  }
}

void scaleInPlace(DType type, void* data, size_t count, double factor) {
  switch (type) {
    case DType::kF32: {
      auto* d = static_cast<float*>(data);
      float f = static_cast<float>(factor);
      for (size_t i = 0; i < count; ++i) d[i] *= f;
      return;
    }
    case DType::kF64: return scaleTyped(static_cast<double*>(data), count, factor);
    case DType::kI32: return scaleTyped(static_cast<int32_t*>(data), count, factor);
    case DType::kI64: return scaleTyped(static_cast<int64_t*>(data), count, factor);
    case DType::kU8: return scaleTyped(static_cast<uint8_t*>(data), count, factor);
    case DType::kI8: return scaleTyped(static_cast<int8_t*>(data), count, factor);
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = floatToBf16(bf16ToFloat(d[i]) * static_cast<float>(factor));
      return;
    }
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = floatToFp16(fp16ToFloat(d[i]) * static_cast<float>(factor));
      return;
    }
  }
}

void divideInPlace(DType type, void* data, size_t count, double divisor) {
  switch (type) {
    case DType::kF32: {
      auto* d = static_cast<float*>(data);
      float v = static_cast<float>(divisor);
      for (size_t i = 0; i < count; ++i) d[i] /= v;
      return;
    }
    case DType::kF64: {
      auto* d = static_cast<double*>(data);
      for (size_t i = 0; i < count; ++i) d[i] /= divisor;
      return;
    }
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = floatToBf16(bf16ToFloat(d[i]) / static_cast<float>(divisor));
      return;
    }
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = floatToFp16(fp16ToFloat(d[i]) / static_cast<float>(divisor));
      return;
    }
    case DType::kI32: {
      auto* d = static_cast<int32_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = static_cast<int32_t>(d[i] / static_cast<int64_t>(divisor));
      return;
    }
    case DType::kI64: {
      auto* d = static_cast<int64_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = d[i] / static_cast<int64_t>(divisor);
      return;
    }
    case DType::kU8: {
      auto* d = static_cast<uint8_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = static_cast<uint8_t>(d[i] / static_cast<int64_t>(divisor));
      return;
    }
    case DType::kI8: {
      auto* d = static_cast<int8_t*>(data);
      for (size_t i = 0; i < count; ++i) d[i] = static_cast<int8_t>(d[i] / static_cast<int64_t>(divisor));
      return;
    }
  }
}

}  // namespace archipelago::comm
