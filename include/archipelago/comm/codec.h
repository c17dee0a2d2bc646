// Compression codecs for the slow legs (straits): the cross-island step of
// the hierarchical allreduce and DiLoCo pseudo-gradients.
//
// What they are for: a strait carries 10-100x less than an island's fabric,
// so fp32 gradients are shrunk to 2 bytes (bf16/fp16), 1 byte (int8, fp8) or
// half a byte (int4) per value before they cross it. Every rank must end with
// bit-identical tensors, so encode/decode are pure functions of their input
// bytes with fixed rounding (no fast-math, no FMA-sensitive expressions,
// no dependence on the CPU's vector width): the owner of a chunk calls
// roundTrip() on its own copy and gets exactly what the receivers decode.
//
// Wire format (all little-endian; docs/codecs.md has the full description):
//
//   [16-byte header][scales: nblocks x fp32][payload]
//
//   header  = magic "AQ" (0x41 0x51), version (1), codec id (CodecKind value),
//             block size (u32, kBlockSize), element count n (u64)
//   scales  = one fp32 per block of kBlockSize elements (last block may be
//             short); only for the scaled codecs int8, int4, fp8_e4m3,
//             fp8_e5m2; none/bf16/fp16 have no scales
//   payload = n elements: fp32 (none), 2 bytes (bf16/fp16), 1 byte
//             (int8/fp8), or 2 per byte (int4: element 2i in the low nibble,
//             2i+1 in the high nibble; a block's odd tail pads a zero nibble)
//
// Non-finite inputs are handled deterministically and never spread to the
// finite values of their block (scales come from the finite values only):
//   none/bf16/fp16/fp8_e5m2: +-Inf -> +-Inf, NaN -> NaN
//   fp8_e4m3 (no Inf in the format): +-Inf and NaN -> NaN
//   int8/int4: +-Inf and NaN -> NaN (reserved codes -128 / -8)
// Finite values never become Inf: every format saturates finite overflow.
// A chunk containing Inf/NaN thus still reports it after decoding, which is
// what loss-scaling (skip the step on non-finite gradients) needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::comm {

enum class CodecKind : uint8_t { kNone = 0, kBF16, kFP16, kInt8, kFP8E4M3, kFP8E5M2, kInt4 };

// Elements per scale block of the scaled codecs.
inline constexpr size_t kCodecBlockSize = 256;
inline constexpr size_t kCodecHeaderBytes = 16;

// "none","bf16","fp16","int8","fp8_e4m3","fp8_e5m2","int4" (case-insensitive);
// an unknown name is kInvalidArgument with a message listing the valid names.
core::Result<CodecKind> parseCodec(std::string_view name);
std::string_view codecName(CodecKind kind);
// "none, bf16, fp16, int8, fp8_e4m3, fp8_e5m2, int4" (for CLI help and errors).
std::string codecNameList();

// Bytes on the wire for n fp32 values, header and per-block scales included.
size_t encodedSize(CodecKind kind, size_t n_floats);

// Encodes in into out; out.size() must equal encodedSize(kind, in.size())
// (checked: a mismatch is a caller bug and aborts).
void encode(CodecKind kind, std::span<const float> in, std::span<uint8_t> out);
// Decodes into out (out.size() = element count the caller expects). Returns
// kDataLoss, without touching memory outside the spans, if in is not exactly
// encodedSize(kind, out.size()) bytes, the header does not match (magic,
// version, codec, block size, count), a scale is negative/zero/non-finite, or
// an int4 padding nibble is set. Everything is validated before the first
// write: on error `out` is untouched.
core::Status decode(CodecKind kind, std::span<const uint8_t> in, std::span<float> out);
// acc[i] += decoded[i], without a full-size temporary: for reducing received
// chunks into an fp32 accumulator. Same validation as decode(); on error
// (kDataLoss) acc is untouched. Bit-identical to
// decode() into a temporary followed by acc[i] += tmp[i].
core::Status decodeAdd(CodecKind kind, std::span<const uint8_t> in, std::span<float> acc);
// inout <- decode(encode(inout)), bit-identical to what a receiver decodes.
void roundTrip(CodecKind kind, std::span<float> inout);

// ErrorFeedback keeps, for ONE buffer (e.g. one shard of one gradient bucket,
// or one DiLoCo fragment), the residual r = (x + r) - decode(encode(x + r))
// left over by the last encode and adds it to the next input, so that the
// quantisation error is carried forward instead of lost: the running sum of
// what was decoded tracks the running sum of inputs within one step's error.
//
// The residual is sized on first use; every later call must pass the same
// number of elements (checked). Residual elements whose compensated or
// decoded value is non-finite are reset to 0 (a NaN must not poison every
// later step). Not thread-safe: one owner thread per instance.
class ErrorFeedback {
 public:
  explicit ErrorFeedback(CodecKind kind) : kind_(kind) {}

  CodecKind kind() const { return kind_; }
  size_t size() const { return residual_.size(); }
  std::span<const float> residual() const { return residual_; }
  // Forget the residual (e.g. the buffer was re-sharded after a membership change).
  void reset() { residual_.clear(); }

  // Sender side: out <- encode(in + r); r <- (in + r) - decode(out).
  // out.size() must be encodedSize(kind(), in.size()).
  void encode(std::span<const float> in, std::span<uint8_t> out);
  // Owner side: inout <- decode(encode(inout + r)); r updated as in encode().
  // Yields exactly the floats a receiver decodes from encode()'s bytes.
  void roundTrip(std::span<float> inout);

  // The two halves, for callers that encode themselves:
  // compensate: inout += r.  update: r <- compensated - decoded.
  void compensate(std::span<float> inout);
  void update(std::span<const float> compensated, std::span<const float> decoded);

 private:
  void ensureSize(size_t n);

  CodecKind kind_;
  std::vector<float> residual_;
  std::vector<float> compensated_;  // scratch, reused across calls
  std::vector<float> decoded_;      // scratch
  std::vector<uint8_t> wire_;       // scratch (roundTrip)
};

}  // namespace archipelago::comm
