// Expert parallelism as a part: the members of an expert group hold
// disjoint ranges of every MoE layer's experts; token rows travel to the
// expert owners and back through all-to-all(v) inside the model
// (model::ExpertExchange, implemented here over a comm group, optionally
// compressed by strategy.dispatch_codec). This part's tensors, the experts
// (the tail of the flat buffer from `expert_begin`), are summed over the
// ranks holding the same experts; the rest of the model is a DataParallel
// part's.
#pragma once

#include <memory>
#include <vector>

#include "archipelago/comm/codec.h"
#include "archipelago/comm/communicator.h"
#include "archipelago/model/moe.h"
#include "archipelago/runtime/dp_comm.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

bool isExpertTensor(const std::string& name);

// Micro-batches every member of an expert group runs (the all-to-alls are
// collective): ceil(largest share / micro_batch) (pipelines: 2 per stage
// without micro_batch), at most the smallest share, at least 1.
int64_t expertMicroCount(const std::vector<int64_t>& shares, int64_t micro_batch, int stages);

// model::ExpertExchange over a comm group (the expert-parallel group).
// Failures throw (the model calls it inside autograd); the loop turns them
// into a Status at the step boundary.
class CommExpertExchange final : public model::ExpertExchange {
 public:
  CommExpertExchange(std::shared_ptr<comm::Group> group, std::vector<int64_t> expert_begin, comm::CodecKind codec)
      : group_(std::move(group)), eb_(std::move(expert_begin)), codec_(codec) {}
  int size() const override { return group_->size(); }
  int rank() const override { return group_->rank(); }
  const std::vector<int64_t>& expertBegin() const override { return eb_; }
  uint64_t bytesSent() const { return bytes_; }
  // The failure behind the last exception thrown (its code and context
  // survive the trip through autograd); ok if none.
  const core::Status& failure() const { return failure_; }

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
  [[noreturn]] void fail(const core::Status& st);
  uint64_t bytes_ = 0;
  core::Status failure_;
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
                 std::shared_ptr<CommExpertExchange> exchange, std::vector<int64_t> shard_offsets = {})
      : flat_(flat),
        begin_(expert_begin),
        dp_(expert_dp),
        norm_owner_(norm_owner),
        exchange_(std::move(exchange)),
        shards_(std::move(shard_offsets)) {}
  std::string name() const override { return "expert"; }
  core::Status reduceGradients(StepStats& stats) override;
  NormShare gradNormSquared() const override;
  std::vector<StateRange> stateRanges() const override;
  const CommExpertExchange& exchange() const { return *exchange_; }

 private:
  FlatParams& flat_;
  int64_t begin_;
  DpComm* dp_;
  bool norm_owner_;
  std::shared_ptr<CommExpertExchange> exchange_;
  std::vector<int64_t> shards_;  // ZeRO-2 slice boundaries; empty: allreduce
};

}  // namespace archipelago::runtime::parallel
