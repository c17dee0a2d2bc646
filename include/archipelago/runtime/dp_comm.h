// The communication the data-parallel trainer needs, as a narrow seam:
// summing gradient buckets (asynchronously, so buckets reduce while backward
// still runs), summing/gathering a few control values, and broadcasting.
// GroupDp (dp_comm_group.cpp) implements it over the comm layer's groups with the
// hierarchical allreduce; LocalDp is the single-process identity, which is
// also the reference every multi-worker result is checked against.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "archipelago/core/status.h"

namespace archipelago::runtime {

class PendingReduce {
 public:
  virtual ~PendingReduce() = default;
  virtual core::Status wait() = 0;
};

class DpComm {
 public:
  virtual ~DpComm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Sums `data` over all ranks in place; the caller keeps `data` alive and
  // untouched until wait() returns.
  virtual std::unique_ptr<PendingReduce> allreduceSumAsync(std::span<float> data) = 0;
  // The same over bf16 bit patterns (train.reduce_dtype: bf16): summed in
  // fp32 and rounded once, bit-identical on every rank. By default an error.
  virtual std::unique_ptr<PendingReduce> allreduceSumBf16Async(std::span<uint16_t> data);
  // Sums `data` over all ranks, keeping only this rank's block (ZeRO-2):
  // `data` is size() consecutive blocks, counts[r] elements for rank r; when
  // wait() returns, block rank() holds the sum and the others are clobbered.
  // Same lifetime rule as allreduceSumAsync. By default an error.
  virtual std::unique_ptr<PendingReduce> reduceScatterSumAsync(std::span<float> data, std::span<const size_t> counts);
  virtual std::unique_ptr<PendingReduce> reduceScatterSumBf16Async(std::span<uint16_t> data,
                                                                   std::span<const size_t> counts);
  virtual core::Status allreduceSum(std::span<double> data) = 0;
  // The largest of each element over all ranks (exact, so the same on
  // every rank); FP8's amaxes of a step. By default an error.
  virtual core::Status allreduceMax(std::span<double> data);
  // all[r * mine.size() + i] = rank r's mine[i].
  virtual core::Status allgather(std::span<const double> mine, std::span<double> all) = 0;
  // Rank r contributes data[offsets[r], offsets[r+1]); everybody ends with all of it.
  virtual core::Status allgatherSlices(std::span<float> data, std::span<const int64_t> offsets) = 0;
  virtual core::Status broadcast(std::span<float> data, int root) = 0;
  // Short description for logs ("hierarchical allreduce over 2 islands").
  virtual std::string describe() const = 0;
};

// One process, nothing to talk to.
class LocalDp final : public DpComm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::unique_ptr<PendingReduce> allreduceSumAsync(std::span<float>) override;
  std::unique_ptr<PendingReduce> allreduceSumBf16Async(std::span<uint16_t>) override;
  std::unique_ptr<PendingReduce> reduceScatterSumAsync(std::span<float>, std::span<const size_t>) override;
  std::unique_ptr<PendingReduce> reduceScatterSumBf16Async(std::span<uint16_t>, std::span<const size_t>) override;
  core::Status allreduceSum(std::span<double>) override { return core::okStatus(); }
  core::Status allreduceMax(std::span<double>) override { return core::okStatus(); }
  core::Status allgather(std::span<const double> mine, std::span<double> all) override;
  core::Status allgatherSlices(std::span<float>, std::span<const int64_t>) override { return core::okStatus(); }
  core::Status broadcast(std::span<float>, int) override { return core::okStatus(); }
  std::string describe() const override { return "single process"; }
};

}  // namespace archipelago::runtime
