// Tensor parallelism inside the model: the slicing rule, the two conjugate
// operators and the vocab-parallel cross-entropy (model/tensor_parallel.h).
#include "archipelago/model/tensor_parallel.h"

#include <algorithm>
#include <cstdint>
#include <string>

namespace archipelago::model {

std::pair<int64_t, int64_t> splitRange(int64_t n, int parts, int rank) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

namespace {

bool endsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

TensorSlice cut(int64_t dim, int64_t n, int64_t unit, TensorParallelRank tp) {
  const auto [b, e] = splitRange(n, tp.size, tp.rank);
  return {dim, b * unit, (e - b) * unit, n * unit};
}

}  // namespace

TensorSlice tensorSlice(const core::ModelConfig& c, const std::string& name, TensorParallelRank tp) {
  if (tp.size <= 1) return {};
  const int64_t hd = c.dim / c.n_heads;
  // Attention and the dense MLP of a decoder layer (an MoE layer's experts,
  // router and shared expert are replicated: their names do not match).
  if (endsWith(name, ".self_attn.q_proj.weight")) return cut(0, c.n_heads, hd, tp);
  if (endsWith(name, ".self_attn.k_proj.weight") || endsWith(name, ".self_attn.v_proj.weight")) {
    return cut(0, c.n_kv_heads, hd, tp);
  }
  if (endsWith(name, ".self_attn.o_proj.weight")) return cut(1, c.n_heads, hd, tp);
  if (endsWith(name, ".mlp.gate_proj.weight") || endsWith(name, ".mlp.up_proj.weight")) {
    return cut(0, c.ffn_hidden, 1, tp);
  }
  if (endsWith(name, ".mlp.down_proj.weight")) return cut(1, c.ffn_hidden, 1, tp);
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return cut(0, c.vocab_size, 1, tp);
  return {};
}

torch::Tensor sliceOf(const torch::Tensor& full, const TensorSlice& slice) {
  return slice.sliced() ? full.narrow(slice.dim, slice.begin, slice.length) : full;
}

core::Status checkTensorParallel(const core::ModelConfig& c, int64_t tp) {
  if (tp <= 1) return core::okStatus();
  if (c.n_kv_heads % tp != 0) {
    return core::invalidArgument("strategy.tensor_parallel (" + std::to_string(tp) + ") must divide model.n_kv_heads (" +
                                 std::to_string(c.n_kv_heads) + "): every rank holds whole key/value heads and the "
                                 "query heads that read them");
  }
  if (c.ffn_hidden < tp || c.vocab_size < tp) {
    return core::invalidArgument("strategy.tensor_parallel (" + std::to_string(tp) +
                                 ") exceeds model.ffn_hidden or model.vocab_size: every rank needs >= 1 row of each");
  }
  return core::okStatus();
}

namespace {

intptr_t handle(TensorParallelComm* comm) { return reinterpret_cast<intptr_t>(comm); }
TensorParallelComm* commOf(torch::autograd::AutogradContext* ctx) {
  return reinterpret_cast<TensorParallelComm*>(static_cast<intptr_t>(ctx->saved_data["comm"].toInt()));
}

torch::Tensor summed(const torch::Tensor& t, TensorParallelComm* comm) {
  torch::Tensor out = t.contiguous().clone();
  comm->allreduceSum(out);
  return out;
}

// f: identity forward, sum of the gradients backward.
class CopyToGroup : public torch::autograd::Function<CopyToGroup> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, TensorParallelComm* comm) {
    // The comm outlives every graph built during a step (the trainer owns it).
    ctx->saved_data["comm"] = static_cast<int64_t>(handle(comm));
    return x.view_as(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {summed(grads[0], commOf(ctx)), torch::Tensor()};
  }
};

// g: sum forward, identity backward.
class ReduceFromGroup : public torch::autograd::Function<ReduceFromGroup> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* /*ctx*/, const torch::Tensor& x,
                               TensorParallelComm* comm) {
    return summed(x, comm);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* /*ctx*/,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], torch::Tensor()};
  }
};

constexpr int64_t kSeqDim = 1;

// Sequence-parallel f: allgather forward, reduce-scatter backward.
class GatherSequence : public torch::autograd::Function<GatherSequence> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, TensorParallelComm* comm) {
    ctx->saved_data["comm"] = static_cast<int64_t>(handle(comm));
    return comm->allgather(x, kSeqDim);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {commOf(ctx)->reduceScatter(grads[0], kSeqDim), torch::Tensor()};
  }
};

// Sequence-parallel g: reduce-scatter forward, allgather backward.
class ReduceScatterSequence : public torch::autograd::Function<ReduceScatterSequence> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, TensorParallelComm* comm) {
    ctx->saved_data["comm"] = static_cast<int64_t>(handle(comm));
    TORCH_CHECK(x.size(kSeqDim) % comm->size() == 0, "sequence parallelism: ", x.size(kSeqDim),
                " positions do not split into ", comm->size(), " equal blocks");
    return comm->reduceScatter(x, kSeqDim);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {commOf(ctx)->allgather(grads[0], kSeqDim), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor gatherSequence(const torch::Tensor& x, TensorParallelComm* comm) {
  if (comm == nullptr || comm->size() == 1) return x;
  return GatherSequence::apply(x, comm);
}

torch::Tensor reduceScatterSequence(const torch::Tensor& x, TensorParallelComm* comm) {
  if (comm == nullptr || comm->size() == 1) return x;
  return ReduceScatterSequence::apply(x, comm);
}

torch::Tensor TensorParallelContext::enter(const torch::Tensor& x) const {
  return sequence ? gatherSequence(x, comm.get()) : copyToTensorParallel(x, comm.get());
}

torch::Tensor TensorParallelContext::leave(const torch::Tensor& y) const {
  return sequence ? reduceScatterSequence(y, comm.get()) : reduceFromTensorParallel(y, comm.get());
}

torch::Tensor copyToTensorParallel(const torch::Tensor& x, TensorParallelComm* comm) {
  if (comm == nullptr || comm->size() == 1) return x;
  return CopyToGroup::apply(x, comm);
}

torch::Tensor reduceFromTensorParallel(const torch::Tensor& x, TensorParallelComm* comm) {
  if (comm == nullptr || comm->size() == 1) return x;
  return ReduceFromGroup::apply(x, comm);
}

torch::Tensor vocabParallelCrossEntropySum(const torch::Tensor& logits, const torch::Tensor& target,
                                           int64_t vocab_begin, TensorParallelComm* comm) {
  const auto compute = logits.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const torch::Tensor lf = logits.reshape({-1, logits.size(-1)}).to(compute);
  const torch::Tensor tgt = target.reshape({-1}).to(torch::kLong);
  // The shift only keeps exp() finite: the loss does not depend on it.
  torch::Tensor m = std::get<0>(lf.detach().max(-1)).contiguous();
  if (comm != nullptr && comm->size() > 1) comm->allreduceMax(m);
  const torch::Tensor shifted = lf - m.unsqueeze(1);
  const torch::Tensor sum_exp = reduceFromTensorParallel(shifted.exp().sum(-1), comm);
  const torch::Tensor local = tgt - vocab_begin;
  const torch::Tensor mine = (local >= 0).logical_and(local < lf.size(1));
  const torch::Tensor picked_here =
      shifted.gather(1, local.masked_fill(mine.logical_not(), 0).unsqueeze(1)).squeeze(1).masked_fill(mine.logical_not(), 0);
  const torch::Tensor picked = reduceFromTensorParallel(picked_here, comm);
  return (sum_exp.log() - picked).masked_fill(tgt < 0, 0).sum();
}

}  // namespace archipelago::model
