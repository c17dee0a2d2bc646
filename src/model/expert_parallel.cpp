// The expert-parallel path of the MoE FFN: routing and dispatch stay local
// (the router is replicated), then
//
//   1. every member tells every other how many rows it sends to each of the
//      receiver's experts (all-to-all of counts),
//   2. the kept rows travel to the members holding their experts
//      (all-to-all(v), differentiable: backward sends the gradients back),
//   3. each member runs its experts on what it received (expert-major),
//   4. the outputs travel back (all-to-all(v), reverse direction),
//   5. the combine is the same weighted index_add as the local path.
//
// The all-to-all nodes are always part of the graph, even when a member
// sends or receives nothing, so every member's backward issues the same
// collectives in the same order (the autograd engine runs the nodes of
// isomorphic graphs in the same order).
#include <cstdint>
#include <numeric>
#include <vector>

#include <torch/torch.h>

#include "archipelago/model/moe.h"

namespace archipelago::model {

namespace {

// Rows to other members and back; backward is the reverse exchange.
class RowExchange : public torch::autograd::Function<RowExchange> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& rows,
                               const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows,
                               ExpertExchange* exchange) {
    ctx->saved_data["send"] = send_rows;
    ctx->saved_data["recv"] = recv_rows;
    // The exchange outlives every graph built during a step (the trainer owns it).
    ctx->saved_data["exchange"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(exchange));
    ctx->saved_data["dim"] = rows.size(1);
    return exchange->alltoallvRows(rows.contiguous(), send_rows, recv_rows);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto send = ctx->saved_data["send"].toIntVector();
    auto recv = ctx->saved_data["recv"].toIntVector();
    auto* exchange = reinterpret_cast<ExpertExchange*>(static_cast<intptr_t>(ctx->saved_data["exchange"].toInt()));
    torch::Tensor g = grads[0];
    const int64_t n_recv = std::accumulate(recv.begin(), recv.end(), int64_t{0});
    if (!g.defined()) g = torch::zeros({n_recv, ctx->saved_data["dim"].toInt()});
    torch::Tensor back = exchange->alltoallvRows(g.contiguous(), recv, send);
    return {back, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

void MoeFfnImpl::setExchange(std::shared_ptr<ExpertExchange> exchange) {
  if (exchange) {
    const auto& eb = exchange->expertBegin();
    const int me = exchange->rank();
    TORCH_CHECK(static_cast<int>(eb.size()) == exchange->size() + 1 && eb.back() == num_experts_,
                "expert exchange placement does not cover the ", num_experts_, " experts");
    TORCH_CHECK(eb[static_cast<size_t>(me)] == expert_begin_ && eb[static_cast<size_t>(me) + 1] == expert_end_,
                "expert exchange gives member ", me, " experts [", eb[static_cast<size_t>(me)], ", ",
                eb[static_cast<size_t>(me) + 1], ") but layer ", layer_, " holds [", expert_begin_, ", ", expert_end_,
                ")");
  } else {
    TORCH_CHECK(expert_begin_ == 0 && expert_end_ == num_experts_,
                "a module holding a subset of the experts needs an expert exchange");
  }
  exchange_ = std::move(exchange);
}

torch::Tensor MoeFfnImpl::expertParallelFfn(const Dispatched& d, int64_t n_tokens) {
  ExpertExchange& ex = *exchange_;
  const int g = ex.size();
  const auto& eb = ex.expertBegin();
  const int64_t mine = expert_end_ - expert_begin_;

  // 1. Counts: member j gets my rows for each of its experts.
  std::vector<int64_t> send_rows(static_cast<size_t>(g), 0), count_send(static_cast<size_t>(g)),
      count_recv(static_cast<size_t>(g), mine);
  for (int j = 0; j < g; ++j) {
    count_send[static_cast<size_t>(j)] = eb[static_cast<size_t>(j) + 1] - eb[static_cast<size_t>(j)];
    for (int64_t e = eb[static_cast<size_t>(j)]; e < eb[static_cast<size_t>(j) + 1]; ++e) {
      send_rows[static_cast<size_t>(j)] += d.rows_per_expert[static_cast<size_t>(e)];
    }
  }
  // recv[i * mine + k]: rows member i sends to my local expert k.
  std::vector<int64_t> recv = ex.alltoallvInt64(d.rows_per_expert, count_send, count_recv);
  std::vector<int64_t> recv_rows(static_cast<size_t>(g), 0);
  for (int i = 0; i < g; ++i) {
    for (int64_t k = 0; k < mine; ++k) recv_rows[static_cast<size_t>(i)] += recv[static_cast<size_t>(i * mine + k)];
  }

  // 2. Rows to the expert owners (source-major: member i's block, expert-major inside).
  torch::Tensor received = RowExchange::apply(d.tokens, send_rows, recv_rows, &ex);

  // 3. Source-major -> expert-major, run the local experts, and back.
  std::vector<int64_t> src_offset(static_cast<size_t>(g) + 1, 0);
  for (int i = 0; i < g; ++i) src_offset[static_cast<size_t>(i) + 1] = src_offset[static_cast<size_t>(i)] + recv_rows[static_cast<size_t>(i)];
  std::vector<int64_t> perm;
  perm.reserve(static_cast<size_t>(src_offset.back()));
  std::vector<int64_t> rows_of_expert(static_cast<size_t>(mine), 0);
  for (int64_t k = 0; k < mine; ++k) {
    for (int i = 0; i < g; ++i) {
      int64_t off = src_offset[static_cast<size_t>(i)];
      for (int64_t k2 = 0; k2 < k; ++k2) off += recv[static_cast<size_t>(i * mine + k2)];
      const int64_t n = recv[static_cast<size_t>(i * mine + k)];
      for (int64_t r = 0; r < n; ++r) perm.push_back(off + r);
      rows_of_expert[static_cast<size_t>(k)] += n;
    }
  }
  auto iopts = torch::TensorOptions().dtype(torch::kLong).device(received.device());
  torch::Tensor perm_t = torch::tensor(perm, torch::kLong).to(iopts.device());
  torch::Tensor expert_major = received.index_select(0, perm_t);
  std::vector<torch::Tensor> outs;
  int64_t off = 0;
  for (int64_t k = 0; k < mine; ++k) {
    const int64_t n = rows_of_expert[static_cast<size_t>(k)];
    if (n == 0) continue;
    outs.push_back(experts[static_cast<size_t>(k)]->as<SwiGluImpl>()->forward(expert_major.narrow(0, off, n)));
    off += n;
  }
  // With no rows the (empty) input itself keeps the return exchange in the graph.
  torch::Tensor out_em = outs.empty() ? expert_major : torch::cat(outs, 0);
  torch::Tensor inverse = torch::argsort(perm_t);
  torch::Tensor out_sm = out_em.index_select(0, inverse);

  // 4. Results back to the members that sent the rows, in their dispatch order.
  torch::Tensor back = RowExchange::apply(out_sm, recv_rows, send_rows, &ex);

  // 5. Weighted combine (always through index_add, even with no rows).
  auto out = torch::zeros({n_tokens, d.tokens.size(1)}, d.tokens.options());
  return out.index_add(0, d.token_index, back * d.weight.unsqueeze(1));
}

}  // namespace archipelago::model
