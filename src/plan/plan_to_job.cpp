#include "archipelago/plan/plan_to_job.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace archipelago::plan {

namespace {

constexpr const char* kSequenceNotWithZeroThreeExperts =
    "sequence parallelism is off: the runtime does not run it with MoE layers, ZeRO-3 and expert parallelism together";

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
          "{}: tensor parallelism differs between its islands ([{}]), which its pipelines cross; per-island layouts "
          "keep each island's pipelines inside it (plan without pipelines across islands)", where, fmt::join(g.tp, ",")));
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
  // The planner prices tensor parallelism with sequence parallelism.
  const bool sequence_refused = moe && l.ep > 1 && l.zero >= 3;
  if (l.tp > 1 && !sequence_refused) out.sets.push_back("strategy.sequence_parallel=true");
  if (l.tp > 1 && sequence_refused) out.notes.push_back(kSequenceNotWithZeroThreeExperts);
  out.sets.push_back(fmt::format("train.micro_batch={}", l.micro_batch));
  out.sets.push_back(fmt::format("train.recompute={}", l.recompute != Recompute::kNone && l.pp > 1));
  if (l.recompute == Recompute::kSelective && l.pp > 1) {
    out.notes.push_back("recompute=selective runs as full recomputation of every stage (train.recompute)");
  } else if (l.recompute != Recompute::kNone && l.pp == 1) {
    out.notes.push_back(fmt::format("recompute={} is not applied: the runtime recomputes pipeline stages only",
                                    recomputeName(l.recompute)));
  }
}

void addZero(const RunLayout& l, const Plan& plan, PlanOverrides& out) {
  int zero = l.zero;
  if (zero >= 2 && plan.strategy == "sync" && plan.codec != "none" && plan.groups.size() > 1) {
    out.notes.push_back(fmt::format("zero={} lowered to 1: its reduce-scatter is uncompressed and the plan compresses "
                                    "the straits with {}", zero, plan.codec));
    zero = 1;
  }
  out.sets.push_back(fmt::format("train.zero={}", zero));
}

// Per-island layouts (core/island_layout.h): every group is one island and
// names that island's layout; what is job-wide (micro-batch, recompute) is
// taken the closest way and said in the notes.
core::Result<PlanOverrides> perIslandOverrides(const Plan& plan, const core::JobConfig& job,
                                               const std::vector<RunLayout>& layouts) {
  PlanOverrides out;
  const std::string why = "; per-island layouts keep each island's pipelines and expert groups inside it, with one "
                          "expert-parallel degree";
  std::vector<bool> covered(job.cluster.islands.size(), false);
  int64_t micro = layouts.front().micro_batch;
  bool recompute = false, all_recompute = true;
  int zero = 2, most_zero = 0;  // ZeRO-2 at most (the bridge sums the gradients' slices), where every group shards
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    const GroupPlan& g = plan.groups[i];
    const RunLayout& l = layouts[i];
    if (g.islands.size() != 1) {
      return core::invalidArgument(fmt::format("plan group {} spans islands [{}] with pipelines across them, and the "
                                               "groups differ{}", i, fmt::join(g.islands, ","), why));
    }
    const auto isl = static_cast<size_t>(g.islands.front());
    if (isl >= covered.size() || covered[isl]) {
      return core::invalidArgument(fmt::format("plan group {}: island {} is not one of the job's or has two groups: "
                                               "the plan was made for another cluster", i, isl));
    }
    covered[isl] = true;
    if (l.ep != layouts.front().ep) {
      return core::invalidArgument(fmt::format("plan group {}: ep={} where group 0 has ep={}{}", i, l.ep,
                                               layouts.front().ep, why));
    }
    if (l.virtual_stages > 1) {
      return core::invalidArgument(fmt::format("plan group {}: {} virtual stages per device (an interleaved schedule), "
                                               "which the runtime does not run; plan with --layout ...,vs=1", i, l.virtual_stages));
    }
    const int64_t devices = g.dp * l.pp * l.tp * l.ep;
    if (devices != job.cluster.islands[isl].count) {
      return core::invalidArgument(fmt::format("plan group {}: its layout covers {} devices, island '{}' has {} "
                                               "(cluster.islands[{}].count): the plan was made for another cluster",
                                               i, devices, job.cluster.islands[isl].name,
                                               job.cluster.islands[isl].count, isl));
    }
    const std::string at = fmt::format("cluster.islands[{}].", isl);
    out.sets.push_back(fmt::format("{}tensor_parallel={}", at, l.tp));
    out.sets.push_back(fmt::format("{}pipeline_stages={}", at, l.pp));
    if (l.pp > 1) out.sets.push_back(fmt::format("{}stage_layers={}", at, fmt::join(l.stage_layers, ",")));
    micro = std::min(micro, l.micro_batch);
    const bool rc = l.recompute != Recompute::kNone && l.pp > 1;
    recompute = recompute || rc;
    all_recompute = all_recompute && (rc || l.pp == 1);
    zero = std::min(zero, l.ep > 1 ? std::min(l.zero, 1) : l.zero);  // expert groups: whole gradients cross
    most_zero = std::max(most_zero, l.zero);
  }
  for (size_t i = 0; i < covered.size(); ++i) {
    if (!covered[i]) return core::invalidArgument(fmt::format("plan: no group for island '{}'", job.cluster.islands[i].name));
  }
  bool any_tp = false;
  for (const auto& l : layouts) any_tp = any_tp || l.tp > 1;
  out.sets.push_back("strategy.tensor_parallel=1");
  out.sets.push_back("strategy.pipeline_stages=1");
  const int64_t ep = layouts.front().ep;
  out.sets.push_back(fmt::format("strategy.expert_parallel={}", ep));
  out.sets.push_back(fmt::format("strategy.sequence_parallel={}", any_tp));
  out.sets.push_back(fmt::format("train.micro_batch={}", micro));
  out.sets.push_back(fmt::format("train.recompute={}", recompute));
  out.sets.push_back(fmt::format("train.zero={}", zero));
  const bool diloco = plan.strategy == "diloco";
  out.sets.push_back(std::string("strategy.kind=") + (diloco ? "diloco" : "sync"));
  if (diloco) out.sets.push_back(fmt::format("strategy.inner_steps={}", plan.diloco_h));
  // An element-wise codec keeps the islands' copies of a sum or mean
  // identical (ZeRO-2's reduce-scatter under sync is uncompressed).
  const bool codec_kept = (plan.codec == "bf16" || plan.codec == "fp16") && (diloco || zero < 2);
  out.sets.push_back("strategy.codec=" + (codec_kept ? plan.codec : std::string("none")));
  out.notes.push_back("per-island layouts: " + [&] {
    std::vector<std::string> d;
    for (size_t i = 0; i < layouts.size(); ++i) d.push_back(fmt::format("island {}: {}", plan.groups[i].islands.front(), layouts[i].describe()));
    return fmt::format("{}", fmt::join(d, "; "));
  }());
  for (const auto& l : layouts) {
    if (l.micro_batch != micro) {
      out.notes.push_back(fmt::format("the groups' micro-batches differ; every island runs train.micro_batch={}", micro));
      break;
    }
  }
  if (recompute && !all_recompute) out.notes.push_back("train.recompute is job-wide: every island's pipeline stages recompute");
  if (most_zero > zero) {
    out.notes.push_back(fmt::format("zero={} runs as {}: per-island layouts shard at most the optimizer state and "
                                    "the gradients (ZeRO-2; the optimizer state only with expert groups), and only "
                                    "where every island's group does", most_zero, zero));
  }
  if (plan.codec != "none" && !codec_kept) {
    out.notes.push_back(fmt::format("strategy.codec none: the {} across islands by tensor name crosses in fp32 or an "
                                    "element-wise codec (bf16, fp16; not with ZeRO-2 under sync) (the plan priced {})",
                                    diloco ? "pseudo-gradient mean" : "gradient sum", plan.codec));
  }
  return out;
}

}  // namespace

core::Result<PlanOverrides> jobOverrides(const Plan& plan, const core::JobConfig& job) {
  if (plan.groups.empty()) return core::invalidArgument("plan: no groups");
  const int64_t n_layers = job.model.n_layers;
  std::vector<RunLayout> layouts;
  int64_t devices = 0;
  bool differ = false;
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    ARCH_ASSIGN_OR_RETURN(RunLayout l, layoutOf(plan.groups[i], i, n_layers));
    differ = differ || (!layouts.empty() && !(l == layouts.front()));
    devices += plan.groups[i].dp * l.pp * l.tp * l.ep;
    layouts.push_back(l);
  }
  if (differ) return perIslandOverrides(plan, job, layouts);
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
  addZero(l, plan, out);
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
