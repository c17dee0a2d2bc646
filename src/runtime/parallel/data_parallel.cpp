#include "archipelago/runtime/parallel/data_parallel.h"

#include <algorithm>

#include "archipelago/core/clock.h"

namespace archipelago::runtime::parallel {

namespace {
int segEnd(const FlatParams& flat, int seg_end) {
  return seg_end < 0 ? static_cast<int>(flat.segments().size()) : seg_end;
}
int64_t offsetOf(const FlatParams& flat, int seg) {
  const auto& segs = flat.segments();
  return static_cast<size_t>(seg) < segs.size() ? segs[static_cast<size_t>(seg)].offset : flat.numel();
}
}  // namespace

DataParallel::DataParallel(FlatParams& flat, DpComm* dp, const DataParallelOptions& options)
    : flat_(flat),
      opt_(options),
      begin_(offsetOf(flat, options.seg_begin)),
      end_(offsetOf(flat, segEnd(flat, options.seg_end))),
      bucketer_(flat, dp, options.bucket_bytes, options.overlap, options.seg_begin, segEnd(flat, options.seg_end),
                options.reduce_dtype) {
  if (!opt_.shard_offsets.empty()) bucketer_.setShards(opt_.shard_offsets);
}

core::Status DataParallel::reduceGradients(StepStats& stats) {
  const auto t0 = core::Clock::now();
  core::Status st = bucketer_.finish();
  stats.wait_s += core::secondsSince(t0);
  return st.isOk() ? st : st.withContext(bucketer_.sharded() ? "gradient reduce-scatter (ZeRO-2)" : "gradient allreduce");
}

NormShare DataParallel::gradNormSquared() const {
  if (end_ <= begin_ || !opt_.norm_owner) return {0.0, opt_.replicated_norm};
  int64_t lo = begin_, hi = end_;
  bool replicated = opt_.replicated_norm;
  if (bucketer_.sharded()) {
    // Only this rank's slice holds summed gradients: its share, summed over the group.
    const auto [first, second] = bucketer_.ownSlice();
    lo = std::max(lo, first);
    hi = std::min(hi, second);
    replicated = false;
    if (hi <= lo) return {0.0, false};
  }
  // Counted per segment (tensor parallelism), the shares are summed over the group.
  return {gradSumOfSquares(flat_, lo, hi, opt_.norm_segments), replicated && opt_.norm_segments.empty()};
}

std::vector<StateRange> DataParallel::stateRanges() const {
  std::vector<StateRange> out;
  const auto& segs = flat_.segments();
  for (int i = opt_.seg_begin; i < segEnd(flat_, opt_.seg_end); ++i) {
    const auto& s = segs[static_cast<size_t>(i)];
    out.push_back({s.name, s.offset, s.offset + s.numel});
  }
  return out;
}

}  // namespace archipelago::runtime::parallel
