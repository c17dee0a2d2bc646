// Every trainable parameter of a model as a view into one contiguous fp32
// buffer, and every gradient as a view into a second one. The trainer then
// reduces gradients as slices of one buffer (buckets), clips by one norm,
// runs AdamW as a handful of vector ops, shards optimizer state by offset
// range, and checkpoints by name, with no per-parameter bookkeeping.
// Autograd accumulates into the existing .grad views in place (grads are
// zeroed, never reset to undefined), as DDP's gradient-as-bucket-view does.
//
// Mixed precision (docs/devices.md "Dtypes"): the flat fp32 buffers are the
// master weights and the gradients the optimizer reads. With a lower
// compute dtype the module's parameters and their .grad are views of a
// second pair of flat buffers in that dtype; syncCompute() rounds the
// masters into them, and the gradient path widens compute gradients into
// the fp32 ones (upcastGrads) after reducing them in the job's reduce dtype.
// Every buffer lives on the device the parameters were on at bind().
//
// Sharded parameters (ZeRO-3, runtime/parallel/sharded_params.h): the fp32
// masters, their gradients and the decay mask hold only this rank's slices
// of the flat offsets (one, or with expert parallelism one of the dense
// tensors and one of its experts), end to end (held()), and the module's
// parameters and gradients are views of one compute buffer per unit (a
// contiguous run of segments: a decoder layer, the embedding, the head)
// whose memory exists only while the unit is gathered.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime {

struct ParamSegment {
  std::string name;          // HF tensor name
  int64_t offset = 0;        // into the flat buffers
  int64_t numel = 0;
  std::vector<int64_t> shape;
  bool decay = true;         // weight decay applies (matrices, not norms)
  torch::Tensor param;       // the module's parameter (a view of flat)
};

// A range [begin, end) of flat offsets a rank holds.
struct FlatSlice {
  int64_t begin = 0, end = 0;
  int64_t numel() const { return end - begin; }
};

// This rank's slices of the flat offsets (ascending, disjoint) and the
// units' boundaries (unit u is [unit_offsets[u], unit_offsets[u+1]), each a
// whole number of segments).
struct ShardLayout {
  std::vector<FlatSlice> slices;
  std::vector<int64_t> unit_offsets;
};

class FlatParams {
 public:
  // Rebinds every parameter of `named` (in order) to a slice of one buffer
  // (of `compute` dtype; fp32 masters beside it when that is not fp32).
  static FlatParams bind(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                         torch::ScalarType compute = torch::kFloat32);
  // Sharded: the masters of `shard`'s slice (the parameters' values there)
  // and one compute buffer per unit, released (compat::freeStorage).
  static FlatParams bindSharded(const std::vector<std::pair<std::string, torch::Tensor>>& named,
                                torch::ScalarType compute, const ShardLayout& shard);
  bool sharded() const { return !unit_params_.empty(); }
  // Bytes of the buffers held for good: masters, gradients, decay mask and
  // the whole compute copies (not the units, whose memory comes and goes).
  int64_t bytes() const;
  // The flat ranges params()/grads() hold, end to end in this order (the
  // whole buffer unless sharded).
  const std::vector<FlatSlice>& held() const { return held_; }
  // The index in params()/grads() of flat offset `offset`, which lies in a
  // held slice (or is its end).
  int64_t localOf(int64_t offset) const;
  size_t units() const { return unit_params_.size(); }
  int64_t unitBegin(size_t u) const { return unit_offsets_[u]; }
  int64_t unitEnd(size_t u) const { return unit_offsets_[u + 1]; }
  // A unit's compute parameters / gradients (their storage may be released).
  const torch::Tensor& unitParams(size_t u) const { return unit_params_[u]; }
  const torch::Tensor& unitGrads(size_t u) const { return unit_grads_[u]; }

  // The fp32 masters and gradients (sharded: this rank's slice only).
  torch::Tensor& params() { return params_; }
  torch::Tensor& grads() { return grads_; }
  const torch::Tensor& grads() const { return grads_; }
  // The buffers autograd reads and writes: the compute-dtype twins, or the
  // fp32 ones themselves.
  bool mixed() const { return compute_dtype_ != torch::kFloat32; }
  torch::ScalarType computeDtype() const { return compute_dtype_; }
  // The whole buffers autograd uses (not when sharded: see unitParams).
  torch::Tensor& computeParams();
  torch::Tensor& computeGrads();
  torch::Device device() const { return params_.device(); }
  // Rounds the fp32 masters into the compute copy (no-op without one).
  void syncCompute();
  // grads[begin, end) = widened compute grads (no-op without a compute copy).
  void upcastGrads(int64_t begin, int64_t end);
  const std::vector<ParamSegment>& segments() const { return segments_; }
  // Elements of the whole flat buffer (sharded: of every rank's slices).
  int64_t numel() const { return numel_; }
  // 1 where weight decay applies, 0 elsewhere (sharded: this rank's slice).
  const torch::Tensor& decayMask() const { return decay_mask_; }
  // Sharded: a unit's gradients are zeroed when its memory is taken back.
  void zeroGrad() {
    grads_.zero_();
    if (compute_grads_.defined()) compute_grads_.zero_();
  }

 private:
  torch::Tensor params_;
  torch::Tensor grads_;
  torch::Tensor compute_params_, compute_grads_;  // undefined when computing in fp32
  torch::Tensor decay_mask_;
  std::vector<ParamSegment> segments_;
  torch::ScalarType compute_dtype_ = torch::kFloat32;
  int64_t numel_ = 0;
  std::vector<FlatSlice> held_;
  std::vector<int64_t> unit_offsets_;
  std::vector<torch::Tensor> unit_params_, unit_grads_;  // sharded only
};

// AdamW (decoupled weight decay, bias-corrected, as in Loshchilov & Hutter)
// with `numel` elements of state: the whole flat buffer without optimizer
// sharding, this rank's slices with it (ZeRO, parallel/optimizer_shard.h).
// With train.optimizer = sgd it is plain SGD with decoupled weight decay
// (no state), whose update is linear in the gradient.
class FlatAdamW {
 public:
  // State on `device` (the parameters').
  FlatAdamW(const core::TrainConfig& cfg, int64_t numel, torch::Device device = torch::kCPU);

  // Slices of the flat parameters, gradients and decay mask updated with the
  // moments [state_offset, state_offset + numel) of the state.
  struct Piece {
    torch::Tensor params, grads, decay_mask;
    int64_t state_offset = 0;
  };
  // One step over the pieces (one bias correction for all of them).
  void step(const std::vector<Piece>& pieces, double lr);
  // One step over the whole state: params/grads/mask of its size.
  void step(torch::Tensor params, const torch::Tensor& grads, const torch::Tensor& decay_mask, double lr);

  int64_t numel() const { return m_.numel(); }
  int64_t stepCount() const { return t_; }
  // Bytes of the moments and the update's scratch.
  int64_t bytes() const;
  void setStepCount(int64_t t) { t_ = t; }
  torch::Tensor& expAvg() { return m_; }
  torch::Tensor& expAvgSq() { return v_; }

 private:
  void update(const Piece& p, double lr);
  bool sgd_;
  double beta1_, beta2_, eps_, wd_;
  int64_t t_ = 0;
  torch::Tensor m_, v_;
  torch::Tensor scratch_;  // the update's temporaries, reused every step
};

// Warmup (linear from lr/warmup to lr) then cosine decay to min_lr at `steps`.
double learningRate(const core::TrainConfig& cfg, int64_t step);

// The sum of squares of `t` (a flat gradient range) in fp64, as a 0-dim
// tensor on t's device: a chunk at a time, so the widened copy and its
// square are never more than a few MB on a host (the whole range at once
// held 16 B per element beside the gradients: 4x a stage's gradient buffer
// at the step's peak, bench/memory.sh); an accelerator takes 16x larger
// chunks (fewer kernel launches). Every layout's global norm is summed
// this way, so a split layout's norm equals one process's (an fp32 norm
// of 2e5 elements was 2e-5 off).
torch::Tensor sumOfSquaresFp64(const torch::Tensor& t);

// A part's share of the global norm: the fp64 sum of squares of `flat`'s
// gradients at flat offsets [lo, hi) (inside one slice this rank holds), only
// those in the segments `counted` marks (empty: all), read back once.
double gradSumOfSquares(const FlatParams& flat, int64_t lo, int64_t hi, const std::vector<bool>& counted = {});

}  // namespace archipelago::runtime
