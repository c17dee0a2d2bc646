// One checkpoint scheme for every layout (docs/runtime.md "Checkpoints"):
// a checkpoint holds the single-process model by tensor name; a rank holds
// pieces of it. A piece is the elements [begin, end) of one tensor
// (flattened) found at `local` in the rank's flat buffer: a whole tensor of
// a data-parallel replica or a pipeline stage, an expert of an expert
// group, a slice cut at a ZeRO-1 shard's ends, a tensor-parallel slice (a
// column-parallel one is contiguous in the whole tensor: one piece; a
// row-parallel [R, C/tp] one is R pieces, one per row).
//
// Saving: the writer assembles each kind of state ("weight", "exp_avg",
// ...) from its own pieces and asks the other ranks only for the elements
// it still lacks (AssembledState::wants), so a replicated layout moves
// nothing and a split one moves each element once. Loading: every rank
// copies its pieces out of the single-process layout by name. So a run
// saved under one layout resumes under any other.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/status.h"
#include "archipelago/model/tensor_parallel.h"
#include "archipelago/runtime/flat_params.h"

namespace archipelago::runtime {

// Tensor names and shapes in the single-process flat order.
using TensorLayout = std::vector<std::pair<std::string, std::vector<int64_t>>>;

struct ShardPiece {
  std::string name;
  int64_t begin = 0, end = 0;  // elements of the flattened tensor
  int64_t local = 0;           // where element `begin` is in this rank's flat buffer
  int64_t numel() const { return end - begin; }
};

class ShardMap {
 public:
  // `full`: the single-process parameter layout; `segments`: this rank's
  // flat buffer; `slices`: the tensors it holds a tensor-parallel slice of.
  // Fails if a segment is not in `full` or has another shape than the whole
  // tensor (or its slice).
  static core::Result<ShardMap> build(TensorLayout full, const std::vector<ParamSegment>& segments,
                                      const std::map<std::string, model::TensorSlice>& slices = {});

  // The pieces of this rank's flat range [begin, end), in buffer order.
  std::vector<ShardPiece> pieces(int64_t begin, int64_t end) const;
  const TensorLayout& full() const { return full_; }
  int64_t fullNumel() const { return full_numel_; }
  // Offset of tensor `name` in the single-process flat layout; -1 if none.
  int64_t fullOffset(const std::string& name) const;

  // Copies each piece from a single-process flat vector into `local` (a
  // tensor over this rank's flat buffer starting at flat offset `local_base`).
  void load(const std::vector<ShardPiece>& pieces, const torch::Tensor& full_flat, torch::Tensor local,
            int64_t local_base = 0) const;

 private:
  struct Segment {
    std::string name;
    int64_t offset = 0, numel = 0;
    // Where local element i of the segment is in the whole tensor:
    // first + i (whole or dim-0 slice), or, for a dim-1 slice, row
    // i / cols at column first + i % cols of a row of full_cols.
    int64_t first = 0;
    int64_t cols = 0, full_cols = 0;  // dim-1 slices only
  };
  TensorLayout full_;
  std::map<std::string, int64_t> full_offset_;
  int64_t full_numel_ = 0;
  std::vector<Segment> segments_;  // this rank's, by offset
};

// The single-process state assembled from pieces, per kind of state (each
// a flat fp32 vector in the full layout), and whole buffers (persistent
// tensors that are not parameters, such as router biases) by name.
class AssembledState {
 public:
  explicit AssembledState(const ShardMap& map) : map_(&map) {}

  // Whether some element of `piece` is still missing for `kind`.
  bool wants(const std::string& kind, const ShardPiece& piece) const;
  void put(const std::string& kind, const ShardPiece& piece, const torch::Tensor& values);
  bool wantsBuffer(const std::string& name) const { return !buffers_.count(name); }
  void putBuffer(const std::string& name, const torch::Tensor& values) { buffers_[name] = values.detach().clone(); }

  // Ok when every element of every tensor of `kind` was given; otherwise
  // kInternal naming the first tensor with a gap.
  core::Status complete(const std::string& kind) const;
  torch::Tensor flat(const std::string& kind) const;
  // `kind` by tensor name, shaped, in the full layout's order.
  std::vector<std::pair<std::string, torch::Tensor>> tensors(const std::string& kind) const;
  const std::map<std::string, torch::Tensor>& buffers() const { return buffers_; }

 private:
  using Intervals = std::vector<std::pair<int64_t, int64_t>>;  // disjoint, sorted
  const ShardMap* map_;
  std::map<std::string, torch::Tensor> flat_;
  std::map<std::string, std::map<std::string, Intervals>> covered_;  // kind -> tensor -> element ranges
  std::map<std::string, torch::Tensor> buffers_;
};

}  // namespace archipelago::runtime
