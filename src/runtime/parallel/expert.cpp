#include "archipelago/runtime/parallel/expert.h"

#include <algorithm>
#include <stdexcept>

#include "archipelago/core/clock.h"
#include "archipelago/runtime/parallel/pipeline.h"

namespace archipelago::runtime::parallel {

namespace {
constexpr double kExchangeTimeoutS = 600;
}  // namespace

void RuntimeExpertExchange::fail(const core::Status& st) {
  failure_ = st;
  throw std::runtime_error(st.toString());
}

bool isExpertTensor(const std::string& name) { return name.find(".block_sparse_moe.experts.") != std::string::npos; }

int64_t expertMicroCount(const std::vector<int64_t>& shares, int64_t micro_batch, int stages) {
  if (shares.empty()) return 1;
  const int64_t smax = *std::max_element(shares.begin(), shares.end());
  const int64_t smin = *std::min_element(shares.begin(), shares.end());
  return std::max<int64_t>(1, std::min(pipelineMicroCount(smax, micro_batch, stages), smin));
}

std::vector<int64_t> CommExpertExchange::alltoallvInt64(const std::vector<int64_t>& in,
                                                        const std::vector<int64_t>& send_counts,
                                                        const std::vector<int64_t>& recv_counts) {
  std::vector<size_t> sc(send_counts.begin(), send_counts.end()), rc(recv_counts.begin(), recv_counts.end());
  size_t total = 0;
  for (size_t c : rc) total += c;
  std::vector<int64_t> out(total);
  auto st = group_->alltoallv(in.data(), sc, out.data(), rc, comm::DType::kI64, comm::OpOptions::within(kExchangeTimeoutS));
  if (!st.isOk()) fail(st.withContext("expert all-to-all (counts)"));
  return out;
}

// Each destination's block is encoded on its own (the own block too, so
// what a member computes on is what it would have received).
core::Status CommExpertExchange::exchangeEncoded(const float* src, const std::vector<int64_t>& send_rows,
                                                 const std::vector<int64_t>& recv_rows, int64_t dim, float* dst) {
  const int g = size();
  std::vector<size_t> sb, rb;
  size_t sbytes = 0, rbytes = 0;
  for (int j = 0; j < g; ++j) {
    sb.push_back(comm::encodedSize(codec_, static_cast<size_t>(send_rows[static_cast<size_t>(j)] * dim)));
    rb.push_back(comm::encodedSize(codec_, static_cast<size_t>(recv_rows[static_cast<size_t>(j)] * dim)));
    sbytes += sb.back();
    rbytes += rb.back();
    if (j != rank()) bytes_ += sb.back();
  }
  std::vector<uint8_t> in(sbytes), got(rbytes);
  size_t off = 0;
  for (int j = 0; j < g; ++j) {
    const size_t n = static_cast<size_t>(send_rows[static_cast<size_t>(j)] * dim);
    comm::encode(codec_, std::span<const float>(src, n), std::span<uint8_t>(in.data() + off, sb[static_cast<size_t>(j)]));
    src += n;
    off += sb[static_cast<size_t>(j)];
  }
  ARCH_RETURN_IF_ERROR(
      group_->alltoallv(in.data(), sb, got.data(), rb, comm::DType::kU8, comm::OpOptions::within(kExchangeTimeoutS)));
  off = 0;
  for (int j = 0; j < g; ++j) {
    const size_t n = static_cast<size_t>(recv_rows[static_cast<size_t>(j)] * dim);
    ARCH_RETURN_IF_ERROR(comm::decode(codec_, std::span<const uint8_t>(got.data() + off, rb[static_cast<size_t>(j)]),
                                      std::span<float>(dst, n)));
    dst += n;
    off += rb[static_cast<size_t>(j)];
  }
  return core::okStatus();
}

torch::Tensor CommExpertExchange::alltoallvRows(const torch::Tensor& rows, const std::vector<int64_t>& send_rows,
                                                const std::vector<int64_t>& recv_rows) {
  const int64_t dim = rows.size(1);
  torch::Tensor f = rows.to(torch::kCPU, torch::kFloat).contiguous();  // the comm layer reads host memory
  int64_t total = 0;
  for (auto r : recv_rows) total += r;
  torch::Tensor out = torch::empty({total, dim}, torch::kFloat);
  core::Status st;
  if (codec_ == comm::CodecKind::kNone) {
    std::vector<size_t> sc, rc;
    for (int j = 0; j < size(); ++j) {
      sc.push_back(static_cast<size_t>(send_rows[static_cast<size_t>(j)] * dim));
      rc.push_back(static_cast<size_t>(recv_rows[static_cast<size_t>(j)] * dim));
      if (j != rank()) bytes_ += sc.back() * 4;
    }
    st = group_->alltoallv(f.data_ptr<float>(), sc, out.data_ptr<float>(), rc, comm::DType::kF32,
                           comm::OpOptions::within(kExchangeTimeoutS));
  } else {
    st = exchangeEncoded(f.data_ptr<float>(), send_rows, recv_rows, dim, out.data_ptr<float>());
  }
  if (!st.isOk()) fail(st.withContext("expert all-to-all (rows)"));
  return out.to(rows.device(), rows.scalar_type());
}

core::Status ExpertParallel::reduceGradients(StepStats& stats) {
  if (!dp_ || dp_->size() <= 1 || begin_ >= flat_.numel()) return core::okStatus();
  const auto t0 = core::Clock::now();
  torch::NoGradGuard ng;
  torch::Tensor grads = flat_.grads().narrow(0, begin_, flat_.numel() - begin_);
  CommBackend ours(dp_);
  IslandBackend& backend = native_ ? *native_ : ours;
  torch::Tensor wire = backend.wireFor(grads, torch::kFloat32, true);
  std::unique_ptr<PendingReduce> op;
  if (shards_.empty()) {
    op = backend.allreduceSum(wire);
  } else {
    std::vector<size_t> counts;
    for (size_t r = 0; r + 1 < shards_.size(); ++r) counts.push_back(static_cast<size_t>(shards_[r + 1] - shards_[r]));
    op = backend.reduceScatterSum(wire, std::move(counts));
  }
  core::Status st = op->wait();
  if (st.isOk() && !wire.is_same(grads)) grads.copy_(wire);
  stats.wait_s += core::secondsSince(t0);
  return st.isOk() ? st : st.withContext(shards_.empty() ? "expert gradient allreduce" : "expert gradient reduce-scatter (ZeRO-2)");
}

NormShare ExpertParallel::gradNormSquared() const {
  if (!norm_owner_ || begin_ >= flat_.numel()) return {0.0, false};
  if (shards_.empty()) return {gradSumOfSquares(flat_, begin_, flat_.numel()), false};
  // Only this rank's slice holds summed gradients.
  const auto r = static_cast<size_t>(dp_->rank());
  return {gradSumOfSquares(flat_, shards_[r], shards_[r + 1]), false};
}

std::vector<StateRange> ExpertParallel::stateRanges() const {
  std::vector<StateRange> out;
  for (const auto& s : flat_.segments()) {
    if (s.offset >= begin_) out.push_back({s.name, s.offset, s.offset + s.numel});
  }
  return out;
}

}  // namespace archipelago::runtime::parallel
