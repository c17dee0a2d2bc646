#include "archipelago/runtime/dp_comm_group.h"

#include <fmt/format.h>

namespace archipelago::runtime {

namespace {
class HandleReduce final : public PendingReduce {
 public:
  HandleReduce(comm::Handle h, core::Deadline d) : h_(std::move(h)), deadline_(d) {}
  core::Status wait() override { return h_.wait(deadline_); }

 private:
  comm::Handle h_;
  core::Deadline deadline_;
};
}  // namespace

GroupDp::GroupDp(std::shared_ptr<comm::Group> world, bool hierarchical, comm::CodecKind codec, double op_timeout_s)
    : group_(std::move(world)), hierarchical_(hierarchical), codec_(codec), op_timeout_s_(op_timeout_s) {}

comm::OpOptions GroupDp::options() const {
  comm::OpOptions o;
  if (op_timeout_s_ > 0) o.deadline = core::Deadline::afterSeconds(op_timeout_s_);
  return o;
}

std::unique_ptr<PendingReduce> GroupDp::allreduceSumAsync(std::span<float> data) {
  return reduceAsync(data.data(), data.size(), comm::DType::kF32);
}

std::unique_ptr<PendingReduce> GroupDp::allreduceSumBf16Async(std::span<uint16_t> data) {
  return reduceAsync(data.data(), data.size(), comm::DType::kBF16);
}

std::unique_ptr<PendingReduce> GroupDp::reduceAsync(void* data, size_t n, comm::DType dtype) {
  comm::OpOptions o = options();
  comm::Handle h;
  if (hierarchical_) {
    o.codec = codec_;
    h = group_->hierarchicalAllreduceAsync(data, n, dtype, comm::ReduceOp::kSum, o);
  } else {
    h = group_->allreduceAsync(data, n, dtype, comm::ReduceOp::kSum, o);
  }
  return std::make_unique<HandleReduce>(std::move(h), o.deadline);
}

std::unique_ptr<PendingReduce> GroupDp::reduceScatterSumAsync(std::span<float> data, std::span<const size_t> counts) {
  return scatterAsync(data.data(), counts, comm::DType::kF32);
}

std::unique_ptr<PendingReduce> GroupDp::reduceScatterSumBf16Async(std::span<uint16_t> data,
                                                                  std::span<const size_t> counts) {
  return scatterAsync(data.data(), counts, comm::DType::kBF16);
}

std::unique_ptr<PendingReduce> GroupDp::scatterAsync(void* data, std::span<const size_t> counts, comm::DType dtype) {
  size_t mine = 0;
  for (int r = 0; r < rank() && static_cast<size_t>(r) < counts.size(); ++r) mine += counts[static_cast<size_t>(r)];
  comm::OpOptions o = options();
  // In place: the result lands where this rank's block already is.
  void* out = static_cast<uint8_t*>(data) + mine * comm::dtypeSize(dtype);
  return std::make_unique<HandleReduce>(group_->reduceScatterAsync(data, out, counts, dtype, comm::ReduceOp::kSum, o),
                                        o.deadline);
}

core::Status GroupDp::allreduceSum(std::span<double> data) {
  return group_->allreduce(data.data(), data.size(), comm::DType::kF64, comm::ReduceOp::kSum, options());
}

core::Status GroupDp::allreduceMax(std::span<double> data) {
  return group_->allreduce(data.data(), data.size(), comm::DType::kF64, comm::ReduceOp::kMax, options());
}

core::Status GroupDp::allgather(std::span<const double> mine, std::span<double> all) {
  if (all.size() != mine.size() * static_cast<size_t>(size())) {
    return core::invalidArgument("allgather: output must hold size() * input elements");
  }
  return group_->allgather(mine.data(), all.data(), mine.size(), comm::DType::kF64, options());
}

core::Status GroupDp::allgatherSlices(std::span<float> data, std::span<const int64_t> offsets) {
  if (offsets.size() != static_cast<size_t>(size()) + 1) {
    return core::invalidArgument("allgatherSlices: need size()+1 offsets");
  }
  std::vector<size_t> counts;
  for (int r = 0; r < size(); ++r) counts.push_back(static_cast<size_t>(offsets[r + 1] - offsets[r]));
  std::vector<float> mine(data.begin() + offsets[rank()], data.begin() + offsets[rank() + 1]);
  return group_->allgatherv(mine.data(), data.data(), counts, comm::DType::kF32, options());
}

core::Status GroupDp::broadcast(std::span<float> data, int root) {
  return group_->broadcast(data.data(), data.size(), comm::DType::kF32, root, options());
}

std::string GroupDp::describe() const {
  if (hierarchical_) {
    return fmt::format("hierarchical allreduce, codec {} on straits", comm::codecName(codec_));
  }
  return "ring allreduce";
}

}  // namespace archipelago::runtime
