#include "archipelago/runtime/parallel/tensor_parallel.h"

#include <algorithm>
#include <stdexcept>

#include "archipelago/core/clock.h"
#include "archipelago/runtime/host_view.h"

namespace archipelago::runtime::parallel {

namespace {
constexpr double kTensorParallelTimeoutS = 600;

comm::DType commType(torch::ScalarType t) { return t == torch::kDouble ? comm::DType::kF64 : comm::DType::kF32; }
}  // namespace

torch::ScalarType tensorParallelWireType(const torch::Tensor& t) {
  return t.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

torch::Tensor dimFirstOn(const torch::Tensor& t, int64_t dim, const torch::Device& device) {
  return t.detach().transpose(0, dim).to(device, tensorParallelWireType(t)).contiguous();
}

void TensorParallelCollectives::fail(const core::Status& st, const std::string& what) {
  failure_ = st.withContext("tensor-parallel " + what);
  throw std::runtime_error(failure_.toString());
}

void CommTensorParallel::reduce(torch::Tensor& t, comm::ReduceOp op, const char* what) {
  const torch::ScalarType wire = tensorParallelWireType(t);
  HostView v(t, wire);
  const core::Status st = group_->allreduce(v.host().data_ptr(), static_cast<size_t>(v.host().numel()), commType(wire),
                                            op, comm::OpOptions::within(kTensorParallelTimeoutS));
  if (!st.isOk()) fail(st, std::string("allreduce (") + what + ")");
  v.land();
}

torch::Tensor CommTensorParallel::reduceScatter(const torch::Tensor& t, int64_t dim) {
  torch::Tensor host = dimFirstOn(t, dim, torch::kCPU);
  std::vector<int64_t> shape = host.sizes().vec();
  shape[0] /= size();
  torch::Tensor out = torch::empty(shape, host.options());
  const std::vector<size_t> counts(static_cast<size_t>(size()), static_cast<size_t>(out.numel()));
  const core::Status st = group_->reduceScatter(host.data_ptr(), out.data_ptr(), counts, commType(host.scalar_type()),
                                                comm::ReduceOp::kSum, comm::OpOptions::within(kTensorParallelTimeoutS));
  if (!st.isOk()) fail(st, "reduce-scatter (sequence)");
  return out.transpose(0, dim).to(t.device(), t.scalar_type()).contiguous();
}

torch::Tensor CommTensorParallel::allgather(const torch::Tensor& t, int64_t dim) {
  torch::Tensor host = dimFirstOn(t, dim, torch::kCPU);
  std::vector<int64_t> shape = host.sizes().vec();
  shape[0] *= size();
  torch::Tensor out = torch::empty(shape, host.options());
  const core::Status st = group_->allgather(host.data_ptr(), out.data_ptr(), static_cast<size_t>(host.numel()),
                                            commType(host.scalar_type()), comm::OpOptions::within(kTensorParallelTimeoutS));
  if (!st.isOk()) fail(st, "allgather (sequence)");
  return out.transpose(0, dim).to(t.device(), t.scalar_type()).contiguous();
}

core::Status TensorParallel::reduceGradients(StepStats& stats) {
  if (!sequence_) return core::okStatus();
  if (shard_group_) return reduceOwned(stats);
  const auto t0 = core::Clock::now();
  const auto& segs = flat_.segments();
  torch::Tensor& g = flat_.computeGrads();
  std::vector<torch::Tensor> parts;
  for (size_t i = 0; i < segs.size() && i < replicated_.size(); ++i) {
    if (replicated_[i]) parts.push_back(g.narrow(0, segs[i].offset, segs[i].numel));
  }
  if (parts.empty()) return core::okStatus();
  torch::Tensor buf = torch::cat(parts).to(torch::kCPU, torch::kFloat).contiguous();
  const core::Status st = group_->allreduce(buf.data_ptr(), static_cast<size_t>(buf.numel()), comm::DType::kF32,
                                            comm::ReduceOp::kSum, comm::OpOptions::within(kTensorParallelTimeoutS));
  stats.wait_s += core::secondsSince(t0);
  if (!st.isOk()) return st.withContext("sequence parallelism: norm gradients over the tensor-parallel group");
  torch::NoGradGuard ng;
  int64_t at = 0;
  for (auto& p : parts) {
    p.copy_(buf.narrow(0, at, p.numel()).view_as(p));
    at += p.numel();
  }
  return core::okStatus();
}

core::Status TensorParallel::reduceOwned(StepStats& stats) {
  const auto t0 = core::Clock::now();
  const auto& segs = flat_.segments();
  // Per replicated segment, its parts in this rank's slices and the
  // segment's place in the vector.
  struct Owned {
    int64_t lo, hi, at;  // flat offsets [lo, hi) at vector offset `at`
  };
  std::vector<Owned> owned;
  int64_t total = 0;
  for (size_t i = 0; i < segs.size() && i < replicated_.size(); ++i) {
    if (!replicated_[i]) continue;
    const auto& s = segs[i];
    for (const FlatSlice& h : flat_.held()) {
      const int64_t lo = std::max(h.begin, s.offset), hi = std::min(h.end, s.offset + s.numel);
      if (lo < hi) owned.push_back({lo, hi, total + lo - s.offset});
    }
    total += s.numel;
  }
  if (total == 0) return core::okStatus();
  torch::NoGradGuard ng;
  torch::Tensor buf = torch::zeros({total}, torch::kFloat);
  for (const auto& o : owned) buf.narrow(0, o.at, o.hi - o.lo).copy_(flat_.grads().narrow(0, flat_.localOf(o.lo), o.hi - o.lo));
  const core::Status st = shard_group_->allreduce(buf.data_ptr(), static_cast<size_t>(total), comm::DType::kF32,
                                                  comm::ReduceOp::kSum, comm::OpOptions::within(kTensorParallelTimeoutS));
  stats.wait_s += core::secondsSince(t0);
  if (!st.isOk()) return st.withContext("sequence parallelism with ZeRO-3: norm gradients over the stage's ranks");
  for (const auto& o : owned) {
    flat_.grads().narrow(0, flat_.localOf(o.lo), o.hi - o.lo).copy_(buf.narrow(0, o.at, o.hi - o.lo).to(flat_.device()));
  }
  return core::okStatus();
}

std::vector<bool> replicatedSegments(const core::ModelConfig& config, const std::vector<ParamSegment>& segments,
                                     model::TensorParallelRank tp) {
  std::vector<bool> out;
  for (const auto& s : segments) out.push_back(!model::tensorSlice(config, s.name, tp).sliced());
  return out;
}

}  // namespace archipelago::runtime::parallel
