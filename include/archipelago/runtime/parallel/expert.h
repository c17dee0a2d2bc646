// Expert parallelism as a part: the members of an expert group hold
// disjoint ranges of every MoE layer's experts; token rows travel to the
// expert owners and back through all-to-all(v) inside the model
// (model::ExpertExchange, implemented here over a comm group, optionally
// compressed by strategy.dispatch_codec, or over c10d). This part's
// tensors, the experts (the tail of the flat buffer from `expert_begin`),
// are summed over the ranks holding the same experts; the rest of the
// model is a DataParallel part's.
#pragma once

#include <memory>
#include <vector>

#include "archipelago/comm/codec.h"
#include "archipelago/comm/communicator.h"
#include "archipelago/model/moe.h"
#include "archipelago/runtime/dp_comm.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/island_backend.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

bool isExpertTensor(const std::string& name);

// Micro-batches every member of an expert group runs (the all-to-alls are
// collective): ceil(largest share / micro_batch) (pipelines: 2 per stage
// without micro_batch), at most the smallest share, at least 1.
int64_t expertMicroCount(const std::vector<int64_t>& shares, int64_t micro_batch, int stages);

// model::ExpertExchange as the runtime builds it: over the comm layer
// (CommExpertExchange) or c10d (parallel/c10d_expert_exchange.h). Failures
// throw (the model calls it inside autograd); the loop turns them into a
// Status at the step boundary.
class RuntimeExpertExchange : public model::ExpertExchange {
 public:
  // Bytes this member sent to the others (the step records' dispatch_bytes).
  uint64_t bytesSent() const { return bytes_; }
  // The failure behind the last exception thrown (its code and context
  // survive the trip through autograd); ok if none.
  const core::Status& failure() const { return failure_; }

 protected:
  [[noreturn]] void fail(const core::Status& st);
  uint64_t bytes_ = 0;
  core::Status failure_;
};

// Over a comm group (the expert-parallel group).
class CommExpertExchange final : public RuntimeExpertExchange {
 public:
  CommExpertExchange(std::shared_ptr<comm::Group> group, std::vector<int64_t> expert_begin, comm::CodecKind codec)
      : group_(std::move(group)), eb_(std::move(expert_begin)), codec_(codec) {}
  int size() const override { return group_->size(); }
  int rank() const override { return group_->rank(); }
  const std::vector<int64_t>& expertBegin() const override { return eb_; }

  std::vector<int64_t> alltoallvInt64(const std::vector<int64_t>& in, const std::vector<int64_t>& send_counts,
                                      const std::vector<int64_t>& recv_counts) override;
  torch::Tensor alltoallvRows(const torch::Tensor& rows, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows) override;

 private:
  core::Status exchangeEncoded(const float* src, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows, int64_t dim, float* dst);
  std::shared_ptr<comm::Group> group_;
  std::vector<int64_t> eb_;
  comm::CodecKind codec_;
};

class ExpertParallel final : public Part {
 public:
  // `expert_dp`: the ranks holding the same experts (null: nobody else).
  // `norm_owner`: this rank counts the experts in the global norm (one
  // expert group of the step group does). `shard_offsets` (ZeRO-2): the
  // optimizer slices of expert_dp's ranks (size+1 flat offsets); the
  // gradients are reduce-scattered along them and this rank counts its own
  // slice in the norm. Empty: every rank gets the whole sum.
  ExpertParallel(FlatParams& flat, int64_t expert_begin, DpComm* expert_dp, bool norm_owner,
                 std::shared_ptr<RuntimeExpertExchange> exchange, std::vector<int64_t> shard_offsets = {})
      : flat_(flat),
        begin_(expert_begin),
        dp_(expert_dp),
        norm_owner_(norm_owner),
        exchange_(std::move(exchange)),
        shards_(std::move(shard_offsets)) {}
  std::string name() const override { return "expert"; }
  DpComm* group() const { return dp_; }
  // A native island backend (runtime/island_backend.h) over the same
  // ranks as expert_dp, in the same order, for the experts' gradients;
  // null: ours through comm. The caller keeps it alive while set.
  void setBackend(IslandBackend* native) { native_ = native; }
  core::Status reduceGradients(StepStats& stats) override;
  NormShare gradNormSquared() const override;
  std::vector<StateRange> stateRanges() const override;
  const RuntimeExpertExchange& exchange() const { return *exchange_; }

 private:
  FlatParams& flat_;
  int64_t begin_;
  DpComm* dp_;
  IslandBackend* native_ = nullptr;
  bool norm_owner_;
  std::shared_ptr<RuntimeExpertExchange> exchange_;
  std::vector<int64_t> shards_;  // ZeRO-2 slice boundaries; empty: allreduce
};

}  // namespace archipelago::runtime::parallel
