// Gradient buckets of a data-parallel reduction: contiguous ranges of the
// flat gradient buffer, formed from the last parameter backwards (the order
// in which backward produces gradients), each summed over a DpComm group:
// allreduced, or with ZeRO-2 (shard offsets given) reduce-scattered so that
// each rank receives the sum only over its optimizer slice of the bucket.
//
// With overlap, a bucket's allreduce starts from the autograd thread as soon
// as every parameter in it has its final gradient and every earlier bucket
// has started, so all ranks issue the same collectives in the same order
// even if their backward order differs. Without overlap (a pipeline stage,
// whose backward runs interleaved with its neighbours'), finish() starts
// every bucket after backward.
//
// What travels (docs/devices.md "Dtypes" and "Devices"): a bucket is
// reduced in the reduce dtype (fp32, or bf16 with train.reduce_dtype) by an
// island backend (runtime/island_backend.h: ours through the comm layer
// from host memory, or a native library on the device). The compute
// gradients are reduced in place when they already lie where the backend
// wants them, in that dtype; otherwise they are first copied into a staging
// buffer (host memory, page-locked for CUDA devices, for ours; the device
// for a native one), and the sum is copied back into the fp32 gradients.
// Either way every rank ends with the same fp32 gradient, whatever dtype or
// device it computed in. ZeRO-2's reduce-scatters take the same backend.
//
// Threads: arm() and finish() run on the trainer's thread, the ready hooks
// on the autograd thread; mu_ guards the launch state shared by both.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "archipelago/core/status.h"
#include "archipelago/runtime/dp_comm.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/island_backend.h"

namespace archipelago::model {
class GradReadyHooks;
}

namespace archipelago::runtime::parallel {

class GradientBucketer {
 public:
  // Buckets cover the segments [seg_begin, seg_end) of `flat` (all of them
  // when seg_end < 0), about bucket_bytes of fp32 each; a parameter is never
  // split. `overlap`: start reductions from gradient-ready hooks.
  GradientBucketer(FlatParams& flat, DpComm* dp, int64_t bucket_bytes, bool overlap, int seg_begin = 0,
                   int seg_end = -1, torch::ScalarType reduce_dtype = torch::kFloat32);
  // ZeRO-2: rank r of the group owns the flat range [offsets[r], offsets[r+1])
  // (size()+1 ascending offsets over the whole buffer, the optimizer's
  // slices); every bucket is reduce-scattered along them. Empty: allreduce.
  void setShards(std::vector<int64_t> offsets) { shards_ = std::move(offsets); }
  bool sharded() const { return !shards_.empty(); }
  // ZeRO-2: the range [first, second) this rank owns (sharded() only).
  std::pair<int64_t, int64_t> ownSlice() const;
  ~GradientBucketer();

  struct Range {
    int64_t begin = 0;
    int64_t end = 0;
  };
  // Flat-buffer ranges of the buckets, in launch order (descending offsets).
  std::vector<Range> buckets() const;
  size_t bucketCount() const { return buckets_.size(); }
  // The gradient group of the next steps (a new epoch's group).
  void setDp(DpComm* dp);
  DpComm* dp() const { return comm_.dp(); }
  // A native island backend for the buckets (null: ours over the DpComm),
  // over the same ranks in the same order. The caller keeps it alive while
  // it is set.
  void setBackend(IslandBackend* backend);

  // Called before the backward pass whose gradients are final (the last
  // micro-batch of a step); a no-op without overlap.
  void arm();
  // After backward: launches what has not started and waits for everything.
  core::Status finish();

 private:
  struct Bucket {
    int64_t begin = 0;
    int64_t end = 0;
    std::vector<int> segments;
    size_t ready = 0;
    std::unique_ptr<PendingReduce> op;
    torch::Tensor staging;  // buffer in the reduce dtype where the backend sums, when not reduced in place
    bool staged = false;    // this step's reduction ran in `staging`
  };
  void onGradReady(size_t seg);
  void launch(size_t b);
  // The bucket's compute gradients where `options` says (a staging copy
  // when they lie elsewhere or in another dtype).
  torch::Tensor wireOf(Bucket& b, const torch::TensorOptions& options);
  // ZeRO-2: elements of bucket b in each rank's slice, in rank order.
  std::vector<size_t> sliceCounts(const Bucket& b) const;
  // After the reduction: the fp32 gradients of bucket b from what was reduced.
  void land(Bucket& b);

  FlatParams& flat_;
  CommBackend comm_;  // ours, over the DpComm group
  IslandBackend* native_ = nullptr;
  std::mutex mu_;
  bool armed_ = false;
  size_t next_launch_ = 0;
  std::vector<Bucket> buckets_;
  std::vector<int> seg_bucket_;  // by segment index - seg_begin
  int seg_begin_ = 0;
  torch::ScalarType reduce_dtype_;
  std::vector<int64_t> shards_;  // ZeRO-2 slice offsets; empty = allreduce
  std::unique_ptr<model::GradReadyHooks> hooks_;
};

}  // namespace archipelago::runtime::parallel
