#include "archipelago/plan/plan_to_job.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace archipelago::plan {

namespace {

// A group's layout as the runtime sees it: what must be alike in every group.
struct RunLayout {
  int64_t tp = 1, pp = 1, ep = 1, micro_batch = 1, virtual_stages = 1;
  std::vector<int64_t> stage_layers;
  Recompute recompute = Recompute::kNone;
  int zero = 0;

  bool operator==(const RunLayout&) const = default;
  std::string describe() const {
    return fmt::format("tp={} pp={} layers [{}] ep={} mb={} recompute={} zero={}", tp, pp, fmt::join(stage_layers, ","),
                       ep, micro_batch, recomputeName(recompute), zero);
  }
};

// Decoder layers among a stage's items (0: embedding, 1..L: layers, L+1: head).
int64_t layersOf(const StagePlan& st, int64_t n_layers) {
  const int64_t lo = std::max<int64_t>(st.first_item, 1);
  const int64_t hi = std::min<int64_t>(st.first_item + st.num_items, n_layers + 1);
  return std::max<int64_t>(0, hi - lo);
}

core::Result<RunLayout> layoutOf(const GroupPlan& g, size_t index, int64_t n_layers) {
  const std::string where = fmt::format("plan group {}", index);
  if (g.tp.empty() || g.pp.empty()) return core::invalidArgument(where + ": no tp/pp per island");
  RunLayout l;
  l.tp = g.tp.front();
  for (int64_t t : g.tp) {
    if (t != l.tp) {
      return core::invalidArgument(fmt::format(
          "{}: tensor parallelism differs between its islands ([{}]); the runtime runs one layout for the whole job "
          "(per-island layouts are not executable yet)", where, fmt::join(g.tp, ",")));
    }
  }
  l.pp = 0;
  for (int64_t p : g.pp) l.pp += p;
  l.ep = g.ep;
  l.micro_batch = g.micro_batch;
  l.virtual_stages = g.virtual_stages;
  l.recompute = g.recompute;
  l.zero = g.zero;
  int64_t layers = 0;
  for (const auto& st : g.stages) {
    l.stage_layers.push_back(layersOf(st, n_layers));
    layers += l.stage_layers.back();
  }
  if (static_cast<int64_t>(g.stages.size()) != l.pp) {
    return core::invalidArgument(fmt::format("{}: {} stages for pp={}", where, g.stages.size(), l.pp));
  }
  if (layers != n_layers) {
    return core::invalidArgument(fmt::format("{}: its stages hold {} decoder layers, the job's model has {} "
                                             "(model.n_layers): the plan was made for another model",
                                             where, layers, n_layers));
  }
  return l;
}

int64_t workersOf(const core::JobConfig& job) {
  int64_t n = 0;
  for (const auto& isl : job.cluster.islands) n += isl.count;
  return n;
}

void addLayout(const RunLayout& l, const core::JobConfig& job, PlanOverrides& out) {
  const bool moe = job.model.moe.num_experts > 0;
  out.sets.push_back(fmt::format("strategy.tensor_parallel={}", l.tp));
  out.sets.push_back(fmt::format("strategy.pipeline_stages={}", l.pp));
  if (l.pp > 1) out.sets.push_back(fmt::format("strategy.stage_layers={}", fmt::join(l.stage_layers, ",")));
  out.sets.push_back(fmt::format("strategy.expert_parallel={}", l.ep));
  // The planner prices tensor parallelism with sequence parallelism (dense models only here).
  if (l.tp > 1 && !moe) out.sets.push_back("strategy.sequence_parallel=true");
  if (l.tp > 1 && moe) out.notes.push_back("sequence parallelism is off: the runtime runs it for dense models only");
  out.sets.push_back(fmt::format("train.micro_batch={}", l.micro_batch));
  out.sets.push_back(fmt::format("train.recompute={}", l.recompute != Recompute::kNone && l.pp > 1));
  if (l.recompute == Recompute::kSelective && l.pp > 1) {
    out.notes.push_back("recompute=selective runs as full recomputation of every stage (train.recompute)");
  } else if (l.recompute != Recompute::kNone && l.pp == 1) {
    out.notes.push_back(fmt::format("recompute={} is not applied: the runtime recomputes pipeline stages only",
                                    recomputeName(l.recompute)));
  }
}

void addZero(const RunLayout& l, const Plan& plan, bool moe, PlanOverrides& out) {
  int zero = l.zero;
  if (zero > 0 && l.ep > 1) {
    out.notes.push_back(fmt::format("zero={} is not applied: the runtime does not shard state with expert "
                                    "parallelism (train.zero 0)", zero));
    zero = 0;
  } else if (zero == 3 && l.tp > 1 && !moe) {
    out.notes.push_back("zero=3 runs as 2: the plan's tensor parallelism runs with sequence parallelism, which "
                        "ZeRO-3 does not run with");
    zero = 2;
  }
  if (zero >= 2 && plan.strategy == "sync" && plan.codec != "none" && plan.groups.size() > 1) {
    out.notes.push_back(fmt::format("zero={} lowered to 1: its reduce-scatter is uncompressed and the plan compresses "
                                    "the straits with {}", zero, plan.codec));
    zero = 1;
  }
  out.sets.push_back(fmt::format("train.zero={}", zero));
}

}  // namespace

core::Result<PlanOverrides> jobOverrides(const Plan& plan, const core::JobConfig& job) {
  if (plan.groups.empty()) return core::invalidArgument("plan: no groups");
  const int64_t n_layers = job.model.n_layers;
  std::vector<RunLayout> layouts;
  int64_t devices = 0;
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    ARCH_ASSIGN_OR_RETURN(RunLayout l, layoutOf(plan.groups[i], i, n_layers));
    if (!layouts.empty() && !(l == layouts.front())) {
      return core::invalidArgument(fmt::format(
          "plan groups differ (group 0: {}; group {}: {}); the runtime runs one layout for the whole job "
          "(per-island layouts are not executable yet)", layouts.front().describe(), i, l.describe()));
    }
    devices += plan.groups[i].dp * l.pp * l.tp * l.ep;
    layouts.push_back(l);
  }
  const RunLayout& l = layouts.front();
  if (l.virtual_stages > 1) {
    return core::invalidArgument(fmt::format("plan: {} virtual stages per device (an interleaved schedule), which the "
                                             "runtime does not run; plan with --layout ...,vs=1", l.virtual_stages));
  }
  if (devices != workersOf(job)) {
    return core::invalidArgument(fmt::format("plan: its layout covers {} devices, the job's cluster has {} workers "
                                             "(cluster.islands[*].count): the plan was made for another cluster",
                                             devices, workersOf(job)));
  }
  PlanOverrides out;
  addLayout(l, job, out);
  addZero(l, plan, job.model.moe.num_experts > 0, out);
  const bool diloco = plan.strategy == "diloco" && plan.groups.size() > 1;
  out.sets.push_back(std::string("strategy.kind=") + (diloco ? "diloco" : "sync"));
  if (diloco) out.sets.push_back(fmt::format("strategy.inner_steps={}", plan.diloco_h));
  if (plan.groups.size() > 1) out.sets.push_back("strategy.codec=" + plan.codec);
  const int64_t job_tokens = job.train.global_batch * job.data.seq_len;
  if (plan.setup.global_batch_tokens != job_tokens) {
    out.notes.push_back(fmt::format("the plan was priced at {} tokens per step; the job keeps its own {} "
                                    "(train.global_batch x data.seq_len)", plan.setup.global_batch_tokens, job_tokens));
  }
  return out;
}

}  // namespace archipelago::plan
