// Tensor parallelism inside the model (Megatron-LM style, docs/parallelism.md
// "Tensor parallelism"): the ranks of a tensor-parallel group each hold a
// slice of every large matrix and compute on the same tokens.
//
//   attention: q/k/v_proj column-parallel (rank r: its query heads and
//              their kv heads), o_proj row-parallel
//   MLP:       gate/up_proj column-parallel, down_proj row-parallel
//   embedding: vocab-parallel (rank r: a range of token rows)
//   LM head:   vocab-parallel, with a vocab-parallel cross-entropy
//   norms:     replicated (identical values and gradients on every rank)
//
// Two conjugate operators join the slices (f and g in Megatron's paper):
// copyToTensorParallel is the identity forward and sums the gradient over
// the group backward (the input of a column-parallel layer); reduceFrom-
// TensorParallel sums forward and is the identity backward (the output of a
// row-parallel layer). Every rank back-propagates the same loss, so the
// replicated tensors' gradients are the single-process ones on every rank
// and each slice's gradient is the single-process gradient of that slice.
//
// Sequence parallelism (Korthikanti et al.): between those regions (norms,
// residual adds, the embedding's output) each rank keeps only its block of
// the sequence, so f becomes an allgather along the sequence (backward: a
// reduce-scatter) and g a reduce-scatter (backward: an allgather): the same
// bytes as the two allreduces, and activations outside the matmuls cut by
// the group size. The replicated norms then see a rank's tokens only: their
// gradients are partial and the trainer sums them over the group.
//
// A tensor keeps its Hugging Face name and its full-model initial value
// (the slice of the seeded full tensor), so checkpoints assemble slices by
// name (runtime/shard_map.h) and a run saved at one TP size resumes at any.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::model {

// [begin, end) of part `rank` when n items are cut into `parts` contiguous
// near-equal ranges (the first n % parts ranges hold one more).
std::pair<int64_t, int64_t> splitRange(int64_t n, int parts, int rank);

// The collectives a tensor-parallel group gives the model. Called inside
// autograd: failures are thrown (the trainer's guardStep turns them back
// into a Status, as for the expert exchange).
class TensorParallelComm {
 public:
  virtual ~TensorParallelComm() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // In place over the group: elementwise sum, or elementwise max. The result
  // is bitwise identical on every rank.
  virtual void allreduceSum(torch::Tensor& t) = 0;
  virtual void allreduceMax(torch::Tensor& t) = 0;
  // Sequence parallelism. `t` cut into size() equal blocks along `dim`:
  // this rank's block of the sum over the group.
  virtual torch::Tensor reduceScatter(const torch::Tensor& t, int64_t dim) = 0;
  // Every rank's block (equal sizes) concatenated along `dim` in rank order.
  virtual torch::Tensor allgather(const torch::Tensor& t, int64_t dim) = 0;
};

// This rank's place in its tensor-parallel group (size 1: no TP).
struct TensorParallelRank {
  int rank = 0;
  int size = 1;
};

// How a tensor of the whole model is cut for one TP rank: along `dim`
// (0: rows of [out, in] = column-parallel and vocab rows; 1: columns =
// row-parallel), the range [begin, begin + length); dim -1: held whole.
struct TensorSlice {
  int64_t dim = -1;
  int64_t begin = 0;
  int64_t length = 0;
  int64_t full = 0;  // the whole tensor's size along dim
  bool sliced() const { return dim >= 0; }
};
// The one rule for every tensor name of the model (resolved config).
TensorSlice tensorSlice(const core::ModelConfig& c, const std::string& name, TensorParallelRank tp);
// `full` cut by `slice` (a view; `full` itself when not sliced).
torch::Tensor sliceOf(const torch::Tensor& full, const TensorSlice& slice);

// Why `c` cannot be cut into `tp` ranks (heads must divide), naming the
// field; ok otherwise. MoE layers are replicated across a TP group.
core::Status checkTensorParallel(const core::ModelConfig& c, int64_t tp);

// f: identity forward, gradient summed over the group backward.
torch::Tensor copyToTensorParallel(const torch::Tensor& x, TensorParallelComm* comm);
// g: summed over the group forward, identity backward.
torch::Tensor reduceFromTensorParallel(const torch::Tensor& x, TensorParallelComm* comm);
// Sequence-parallel f: [B, T/n, D] -> [B, T, D] (backward: reduce-scatter).
torch::Tensor gatherSequence(const torch::Tensor& x, TensorParallelComm* comm);
// Sequence-parallel g: [B, T, D] partial sums -> this rank's [B, T/n, D]
// of their sum (backward: allgather).
torch::Tensor reduceScatterSequence(const torch::Tensor& x, TensorParallelComm* comm);

// What a module of a tensor-parallel shard needs: the group, and whether
// activations between the parallel regions are cut along the sequence.
struct TensorParallelContext {
  std::shared_ptr<TensorParallelComm> comm;  // null: no tensor parallelism
  bool sequence = false;
  explicit operator bool() const { return comm != nullptr; }
  // Into a parallel region (f) and out of it (g).
  torch::Tensor enter(const torch::Tensor& x) const;
  torch::Tensor leave(const torch::Tensor& y) const;
};

// Summed token cross-entropy over the whole vocabulary from this rank's
// logits [N, V_r] for token ids [vocab_begin, vocab_begin + V_r) and target
// [N] (ids < 0 ignored); differentiable in the local logits. Same value on
// every rank (softmax max and denominator and the target logit are
// combined over the group).
torch::Tensor vocabParallelCrossEntropySum(const torch::Tensor& logits, const torch::Tensor& target,
                                           int64_t vocab_begin, TensorParallelComm* comm);

}  // namespace archipelago::model
