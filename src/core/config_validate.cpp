// Validation of a loaded job and cluster spec (config.h: validateJob,
// validateCluster): every problem found, each naming its field, the value
// it got and what it expects, in one error. Loading, overrides and dumping
// are in config.cpp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include "archipelago/core/config.h"
#include "archipelago/core/island_layout.h"
#include "archipelago/core/strings.h"
#include "archipelago/core/units.h"

namespace archipelago::core {

namespace {

// Sums of counts read from a file saturate instead of wrapping around (a
// wrapped sum could match the expected total).
int64_t saturatingAdd(int64_t a, int64_t b) {
  int64_t r = 0;
  if (!__builtin_add_overflow(a, b, &r)) return r;
  return b > 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
}

// A split of a total into parts (layers per stage, experts per member):
// the saturated sum and whether every part is >= 1.
struct Split {
  int64_t sum = 0;
  bool positive = true;
};
Split splitOf(const std::vector<int64_t>& parts) {
  Split out;
  for (int64_t x : parts) {
    out.sum = saturatingAdd(out.sum, x);
    out.positive = out.positive && x >= 1;
  }
  return out;
}

struct Problems {
  std::vector<std::string> list;
  template <typename T>
  void add(const std::string& path, const T& got, const std::string& expected) {
    std::ostringstream o;
    o << path << ": got " << got << "; expected " << expected;
    list.push_back(o.str());
  }
  Status status() const {
    if (list.empty()) return okStatus();
    std::string msg = std::to_string(list.size()) + " invalid value" + (list.size() > 1 ? "s" : "") + ":";
    for (const auto& l : list) msg += "\n  " + l;
    return invalidArgument(msg);
  }
};

void checkCluster(const ClusterSpec& c, const std::string& pre, Problems& p) {
  if (c.islands.empty()) p.add(pre + ".islands", "an empty list", "at least one island");
  std::set<std::string> names;
  for (size_t i = 0; i < c.islands.size(); ++i) {
    const auto& is = c.islands[i];
    std::string ip = pre + ".islands[" + std::to_string(i) + "]";
    if (is.name.empty()) p.add(ip + ".name", "''", "a non-empty island name");
    else if (!names.insert(is.name).second) p.add(ip + ".name", "'" + is.name + "'", "a name not used by another island");
    if (is.count < 1) p.add(ip + ".count", is.count, "an integer >= 1");
    if (!(is.slowdown > 0)) p.add(ip + ".slowdown", is.slowdown, "a factor > 0 (1 = full speed)");
    if (!is.slowdowns.empty() && static_cast<int64_t>(is.slowdowns.size()) != is.count) {
      p.add(ip + ".slowdowns", std::to_string(is.slowdowns.size()) + " values",
            std::to_string(is.count) + " values (one per device) or none");
    }
    for (size_t k = 0; k < is.slowdowns.size(); ++k) {
      if (!(is.slowdowns[k] > 0)) p.add(ip + ".slowdowns[" + std::to_string(k) + "]", is.slowdowns[k], "a factor > 0");
    }
    if (is.torch_device.empty()) p.add(ip + ".torch_device", "''", "auto or a torch device (cpu, cuda, cuda:1, ...)");
    if (is.threads < 0) p.add(ip + ".threads", is.threads, "0 (train.threads_per_worker) or an integer >= 1");
    if (!(is.cpu_quota >= 0) || is.cpu_quota > 1024) p.add(ip + ".cpu_quota", is.cpu_quota, "0 (no cap) or a share of one core > 0, e.g. 0.5");
    if (is.devices_per_node < 1) p.add(ip + ".devices_per_node", is.devices_per_node, "an integer >= 1");
    if (is.node_bandwidth < 0) p.add(ip + ".node_bandwidth", formatBandwidth(is.node_bandwidth), "a bandwidth >= 0");
    if (is.fabric_bandwidth < 0) p.add(ip + ".fabric_bandwidth", formatBandwidth(is.fabric_bandwidth), "a bandwidth >= 0");
  }
  std::set<std::pair<std::string, std::string>> pairs;
  for (size_t i = 0; i < c.straits.size(); ++i) {
    const auto& s = c.straits[i];
    std::string sp = pre + ".straits[" + std::to_string(i) + "]";
    for (const auto& [field, name] : {std::pair{".a", s.a}, std::pair{".b", s.b}}) {
      if (c.islandIndex(name) < 0) {
        std::string known;
        for (const auto& is : c.islands) known += (known.empty() ? "" : ", ") + is.name;
        p.add(sp + field, "'" + name + "'", "the name of an island in the cluster (" + known + ")");
      }
    }
    if (s.a == s.b && !s.a.empty()) p.add(sp + ".b", "'" + s.b + "'", "an island other than a ('" + s.a + "')");
    if (!pairs.insert(std::minmax(s.a, s.b)).second) p.add(sp, s.a + "<->" + s.b, "one strait per island pair");
    if (!(s.bandwidth > 0)) p.add(sp + ".bandwidth", s.bandwidth < 0 ? "a negative bandwidth" : "0", "a bandwidth > 0 such as '1Gbit/s'");
    if (s.latency < 0) p.add(sp + ".latency", formatDuration(s.latency), "a duration >= 0");
    if (s.jitter < 0) p.add(sp + ".jitter", formatDuration(s.jitter), "a duration >= 0");
    if (s.loss < 0 || s.loss >= 1) p.add(sp + ".loss", s.loss, "a probability in [0, 1)");
  }
  if (c.default_strait_bandwidth < 0) p.add(pre + ".default_strait_bandwidth", "a negative bandwidth", "a bandwidth >= 0");
  if (c.default_strait_latency < 0) p.add(pre + ".default_strait_latency", formatDuration(c.default_strait_latency), "a duration >= 0");
}

// What a tensor-parallel degree `tp` (named by `field`) asks of the model
// and the data: every rank whole kv heads; under sequence parallelism a
// sequence that splits evenly.
void checkTensorSlices(const JobConfig& j, int64_t tp, const std::string& field, Problems& p) {
  const auto& m = j.model;
  const int64_t kv = m.n_kv_heads > 0 ? m.n_kv_heads : m.n_heads;
  if (kv > 0 && kv % tp != 0) {
    p.add(field, tp, "a divisor of model.n_kv_heads (" + std::to_string(kv) + "): every rank holds whole key/value heads");
  }
  if (j.strategy.sequence_parallel && tp > 1 && j.data.seq_len > 0 && j.data.seq_len % tp != 0) {
    p.add("data.seq_len", j.data.seq_len,
          "a multiple of " + field + " (" + std::to_string(tp) + ") with strategy.sequence_parallel");
  }
}

// Tensor parallelism (runtime/parallel/tensor_parallel.h): groups of
// consecutive ranks, every rank whole kv heads. Built so far with
// synchronous data parallelism and pipeline stages; the rest is refused
// rather than ignored.
void validateTensorParallel(const JobConfig& j, int64_t world, Problems& p) {
  const auto& s = j.strategy;
  const auto& m = j.model;
  const int64_t tp = s.tensor_parallel;
  if (world > 0 && world % tp != 0) {
    p.add("strategy.tensor_parallel", tp, "a divisor of the number of workers (" + std::to_string(world) + ")");
  }
  checkTensorSlices(j, tp, "strategy.tensor_parallel", p);
  int64_t ranks = 0;
  if (s.pipeline_stages > 1 && world > 0 &&
      (__builtin_mul_overflow(tp, s.pipeline_stages, &ranks) || world % ranks != 0)) {
    p.add("strategy.tensor_parallel", tp,
          "a divisor of the number of workers (" + std::to_string(world) + ") / strategy.pipeline_stages (" +
              std::to_string(s.pipeline_stages) + "): every stage is one tensor-parallel group");
  }
  if (s.sequence_parallel && m.moe.num_experts > 0 && s.expert_parallel > 1 && zeroStage(j.train) == 3) {
    // ZeRO-3 sums the replicated tensors' partial gradients over the stage's
    // ranks laid end to end in one segment order; members holding other
    // experts lay theirs out differently.
    p.add("strategy.sequence_parallel", "true", "false with model.moe, strategy.expert_parallel and train.zero: 3 "
                                                "(or train.zero <= 2; not built yet)");
  }
}

// Data-parallel replicas (pipelines; a plain worker is one) of the whole job.
int64_t replicasOf(const JobConfig& j, int64_t world) {
  if (!perIslandLayouts(j)) return j.strategy.pipeline_stages > 1 ? world / j.strategy.pipeline_stages : world;
  int64_t n = 0;
  for (size_t i = 0; i < j.cluster.islands.size(); ++i) {
    const IslandLayoutSpec l = islandLayoutOf(j, i);
    if (l.tensor_parallel >= 1 && l.pipeline_stages >= 1) {
      n += j.cluster.islands[i].count / (l.tensor_parallel * l.pipeline_stages);
    }
  }
  return n;
}

// strategy.island_collectives: c10d sums the data-parallel buckets and
// carries ZeRO's collectives (runtime/c10d_backend.h: of the whole model,
// a pipeline or tensor-parallel layout's stage group, or an expert group's
// experts), tensor parallelism's collectives
// (runtime/parallel/c10d_tensor_parallel.h) and the expert all-to-all
// (runtime/parallel/c10d_expert_exchange.h); the rest of the loop talks
// through comm, the bridge of per-island layouts included.
void validateIslandCollectives(const JobConfig& j, Problems& p) {
  const auto& s = j.strategy;
  if (s.island_collectives != "c10d") return;
  if (s.expert_parallel > 1 && s.dispatch_codec != "none") {
    p.add("strategy.dispatch_codec", s.dispatch_codec,
          "none with strategy.island_collectives: c10d (the expert all-to-all runs on c10d inside the island, "
          "uncompressed), or strategy.island_collectives: comm");
  }
  // Per-island layouts: every c10d group lies inside its island.
  if (perIslandLayouts(j)) return;
  if (s.kind != "sync") return;  // DiLoCo / streaming: the inner group is one island
  for (const auto& island : j.cluster.islands) {
    if (island.count != j.cluster.islands.front().count) {
      p.add("strategy.island_collectives", s.island_collectives,
            "comm when islands have different worker counts under strategy.kind: sync (the cross-island leg pairs "
            "each island's i-th worker), or islands of equal counts");
      return;
    }
  }
}

// One island's own layout: its groups tile its workers, every stage holds
// >= 1 layer, every rank whole kv heads.
void validateIslandLayout(const JobConfig& j, size_t i, Problems& p) {
  const auto& isl = j.cluster.islands[i];
  const auto& m = j.model;
  const std::string pre = "cluster.islands[" + std::to_string(i) + "].";
  const IslandLayoutSpec l = islandLayoutOf(j, i);
  const std::string tp_field = isl.tensor_parallel != 0 ? pre + "tensor_parallel" : "strategy.tensor_parallel";
  const std::string pp_field = isl.pipeline_stages != 0 ? pre + "pipeline_stages" : "strategy.pipeline_stages";
  if (l.tensor_parallel < 1) p.add(tp_field, l.tensor_parallel, "an integer >= 1 (0 on an island: the strategy's)");
  if (l.pipeline_stages < 1 || (m.n_layers >= 1 && l.pipeline_stages > m.n_layers)) {
    p.add(pp_field, l.pipeline_stages, "between 1 and model.n_layers (" + std::to_string(m.n_layers) + ")");
  }
  if (l.tensor_parallel < 1 || l.pipeline_stages < 1) return;
  int64_t ranks = 0;
  if (__builtin_mul_overflow(l.tensor_parallel, l.pipeline_stages, &ranks) || isl.count % ranks != 0) {
    p.add(tp_field, l.tensor_parallel,
          "a value whose product with " + pp_field + " (" + std::to_string(l.pipeline_stages) +
              ") divides the island's worker count (" + std::to_string(isl.count) + "): every replica of island '" +
              isl.name + "' is tensor_parallel x pipeline_stages of its workers");
  }
  checkTensorSlices(j, l.tensor_parallel, tp_field, p);
  if (!l.stage_layers.empty()) {
    const auto [sum, positive] = splitOf(l.stage_layers);
    if (static_cast<int64_t>(l.stage_layers.size()) != l.pipeline_stages || sum != m.n_layers || !positive) {
      p.add(isl.stage_layers.empty() ? "strategy.stage_layers" : pre + "stage_layers",
            std::to_string(l.stage_layers.size()) + " stages summing to " + std::to_string(sum),
            std::to_string(l.pipeline_stages) + " positive values (one per stage of island '" + isl.name +
                "') summing to model.n_layers (" + std::to_string(m.n_layers) + ")");
    }
  }
  if (l.pipeline_stages > 1 && m.tie_embeddings) {
    p.add("model.tie_embeddings", "true", "false with " + pp_field + " > 1 (embedding and LM head sit on different stages)");
  }
}

// Per-island layouts (core/island_layout.h): each island's layout, and
// what runs with them so far (sync or DiLoCo across the islands by tensor
// name, dense or MoE without expert groups); the rest is refused rather
// than ignored.
void validateIslandLayouts(const JobConfig& j, Problems& p) {
  bool any_tp = false;
  for (size_t i = 0; i < j.cluster.islands.size(); ++i) {
    validateIslandLayout(j, i, p);
    any_tp = any_tp || islandLayoutOf(j, i).tensor_parallel > 1;
  }
  if (j.strategy.codec != "none" && j.strategy.codec != "bf16" && j.strategy.codec != "fp16") {
    p.add("strategy.codec", j.strategy.codec, "bf16, fp16 or none with per-island layouts (a scaled codec's blocks "
                                              "would differ between the islands' layouts, and so would the copies of "
                                              "the sum across islands)");
  }
  // Expert groups stay inside an island: ep of its pipelines each.
  const int64_t ep = j.strategy.expert_parallel;
  for (size_t i = 0; ep > 1 && i < j.cluster.islands.size(); ++i) {
    const IslandLayoutSpec l = islandLayoutOf(j, i);
    const int64_t per_pipeline = std::max<int64_t>(1, l.tensor_parallel * l.pipeline_stages);
    const int64_t pipelines = j.cluster.islands[i].count / per_pipeline;
    if (pipelines % ep != 0) {
      p.add("strategy.expert_parallel", ep, "a divisor of every island's pipelines (island '" + j.cluster.islands[i].name +
                                                "' runs " + std::to_string(pipelines) + "): expert groups stay inside an island");
    }
  }
  // Streaming's fragments are ranges of every rank's buffer, which expert groups order dense first.
  if (ep > 1 && j.strategy.kind == "streaming" && j.strategy.fragments > 1) {
    p.add("strategy.fragments", j.strategy.fragments, "1 with per-island layouts and strategy.expert_parallel (a "
                                                      "fragment's experts lie apart from its dense tensors in a rank's "
                                                      "buffer; not built yet)");
  }
  // The bridge holds a slice of one range per rank.
  if (ep > 1 && zeroStage(j.train) == 2) {
    p.add("train.zero", 2, "0 or 1 with per-island layouts and strategy.expert_parallel (ZeRO-2's two slices, dense "
                           "and experts, are not summed across islands yet)");
  }
  if (zeroStage(j.train) >= 3) {
    p.add("train.zero", zeroStage(j.train), "0, 1 or 2 with per-island layouts (the bridge sums the gradients' "
                                            "slices; ZeRO-3's parameter units are not built across islands)");
  }
  if (j.strategy.sequence_parallel && !any_tp) {
    p.add("strategy.sequence_parallel", "true", "false when no island runs tensor parallelism");
  }
}

}  // namespace

Status validateCluster(const ClusterSpec& cluster, const std::string& prefix) {
  Problems p;
  checkCluster(cluster, prefix, p);
  return p.status();
}

Status validateJob(const JobConfig& j) {
  Problems p;
  checkCluster(j.cluster, "cluster", p);
  const int64_t world = j.cluster.worldSize();

  const auto& m = j.model;
  if (m.vocab_size < 0) p.add("model.vocab_size", m.vocab_size, "0 (from data) or a positive size");
  if (m.dim < 1) p.add("model.dim", m.dim, "an integer >= 1");
  if (m.n_layers < 1) p.add("model.n_layers", m.n_layers, "an integer >= 1");
  if (m.n_heads < 1) p.add("model.n_heads", m.n_heads, "an integer >= 1");
  else if (m.dim % m.n_heads != 0) p.add("model.n_heads", m.n_heads, "a divisor of model.dim (" + std::to_string(m.dim) + ")");
  else if ((m.dim / m.n_heads) % 2 != 0) p.add("model.n_heads", m.n_heads, "a value giving an even head size (rotary embeddings)");
  if (m.n_kv_heads < 0 || (m.n_kv_heads > 0 && m.n_heads > 0 && m.n_heads % m.n_kv_heads != 0)) {
    p.add("model.n_kv_heads", m.n_kv_heads, "0 or a divisor of model.n_heads (" + std::to_string(m.n_heads) + ")");
  }
  if (m.ffn_hidden < 0) p.add("model.ffn_hidden", m.ffn_hidden, "0 (default) or a positive size");
  if (m.max_seq_len < j.data.seq_len) {
    p.add("model.max_seq_len", m.max_seq_len, "at least data.seq_len (" + std::to_string(j.data.seq_len) + ")");
  }
  if (!(m.rope_theta > 0)) p.add("model.rope_theta", m.rope_theta, "a number > 0");
  if (!(m.norm_eps > 0)) p.add("model.norm_eps", m.norm_eps, "a number > 0");
  if (!(m.init_std > 0)) p.add("model.init_std", m.init_std, "a number > 0");
  const auto& moe = m.moe;
  if (moe.num_experts < 0) p.add("model.moe.num_experts", moe.num_experts, "0 (dense) or a positive count");
  if (moe.num_experts > 0) {
    if (moe.top_k < 1 || moe.top_k > moe.num_experts) {
      p.add("model.moe.top_k", moe.top_k, "between 1 and model.moe.num_experts (" + std::to_string(moe.num_experts) + ")");
    }
    if (moe.every < 1) p.add("model.moe.every", moe.every, "an integer >= 1");
    if (moe.expert_hidden < 0) p.add("model.moe.expert_hidden", moe.expert_hidden, "0 or a positive size");
    if (moe.capacity_factor < 0) p.add("model.moe.capacity_factor", moe.capacity_factor, "0 (unlimited) or > 0");
    if (moe.aux_loss_coef < 0) p.add("model.moe.aux_loss_coef", moe.aux_loss_coef, "a number >= 0");
  }

  const auto& d = j.data;
  if (d.dir.empty()) p.add("data.dir", "''", "a directory path");
  if (d.seq_len < 1) p.add("data.seq_len", d.seq_len, "an integer >= 1");
  if (d.val_fraction < 0 || d.val_fraction >= 1) p.add("data.val_fraction", d.val_fraction, "a fraction in [0, 1)");
  if (d.tokenizer == "spm" && d.vocab < 2) p.add("data.vocab", d.vocab, "a SentencePiece vocabulary size such as 4000");

  const auto& t = j.train;
  if (t.steps < 1) p.add("train.steps", t.steps, "an integer >= 1");
  if (t.global_batch < 1) p.add("train.global_batch", t.global_batch, "an integer >= 1");
  else if (const int64_t replicas = replicasOf(j, world); world > 0 && t.global_batch < replicas) {
    p.add("train.global_batch", t.global_batch,
          "at least " + std::to_string(replicas) + " so that every one of the " + std::to_string(replicas) +
              (replicas == world ? " workers" : " pipelines") + " gets >= 1 sample per step");
  }
  if (t.micro_batch < 0) p.add("train.micro_batch", t.micro_batch, "0 (whole share) or a positive size");
  if (!(t.lr > 0)) p.add("train.lr", t.lr, "a learning rate > 0");
  if (t.min_lr < 0 || t.min_lr > t.lr) p.add("train.min_lr", t.min_lr, "a value in [0, train.lr]");
  if (t.warmup_steps < 0) p.add("train.warmup_steps", t.warmup_steps, "an integer >= 0");
  if (t.weight_decay < 0) p.add("train.weight_decay", t.weight_decay, "a number >= 0");
  if (t.beta1 < 0 || t.beta1 >= 1) p.add("train.beta1", t.beta1, "a number in [0, 1)");
  if (t.beta2 < 0 || t.beta2 >= 1) p.add("train.beta2", t.beta2, "a number in [0, 1)");
  if (!(t.adam_eps > 0)) p.add("train.adam_eps", t.adam_eps, "a number > 0");
  if (t.grad_clip < 0) p.add("train.grad_clip", t.grad_clip, "0 (off) or a norm > 0");
  if (t.eval_every < 0) p.add("train.eval_every", t.eval_every, "0 (never) or a step count");
  if (t.eval_batches < 1) p.add("train.eval_batches", t.eval_batches, "an integer >= 1");
  if (t.log_every < 1) p.add("train.log_every", t.log_every, "an integer >= 1");
  if (t.threads_per_worker < 1) p.add("train.threads_per_worker", t.threads_per_worker, "an integer >= 1");
  if (!(t.loss_scale_init >= 1) || !std::isfinite(t.loss_scale_init)) {
    p.add("train.loss_scale_init", t.loss_scale_init, "a finite scale >= 1, e.g. 65536");
  }
  if (t.loss_scale_window < 1) p.add("train.loss_scale_window", t.loss_scale_window, "an integer >= 1");
  if (t.fp8_amax_history < 1) p.add("train.fp8_amax_history", t.fp8_amax_history, "an integer >= 1");
  if (!t.shares.empty()) {
    if (static_cast<int64_t>(t.shares.size()) != world) {
      p.add("train.shares", std::to_string(t.shares.size()) + " values", std::to_string(world) + " values (one per worker) or none");
    }
    for (size_t i = 0; i < t.shares.size(); ++i) {
      if (!(t.shares[i] > 0)) p.add("train.shares[" + std::to_string(i) + "]", t.shares[i], "a weight > 0");
    }
  }

  const auto& s = j.strategy;
  if (s.inner_steps < 1) p.add("strategy.inner_steps", s.inner_steps, "an integer >= 1");
  if (!(s.outer_lr > 0)) p.add("strategy.outer_lr", s.outer_lr, "a number > 0");
  if (s.outer_momentum < 0 || s.outer_momentum >= 1) p.add("strategy.outer_momentum", s.outer_momentum, "a number in [0, 1)");
  if (s.fragments < 1) p.add("strategy.fragments", s.fragments, "an integer >= 1");
  if (s.overlap_steps < 0) p.add("strategy.overlap_steps", s.overlap_steps, "an integer >= 0");
  if (s.streams < 1 || s.streams > 64) p.add("strategy.streams", s.streams, "an integer in [1, 64]");
  if (s.bucket_bytes < 1024) p.add("strategy.bucket_bytes", s.bucket_bytes, "at least 1KiB");
  if (s.pipeline_stages < 1 || (m.n_layers >= 1 && s.pipeline_stages > m.n_layers)) {
    p.add("strategy.pipeline_stages", s.pipeline_stages, "between 1 and model.n_layers (" + std::to_string(m.n_layers) + ")");
  }
  if (s.expert_parallel < 1) p.add("strategy.expert_parallel", s.expert_parallel, "an integer >= 1");
  if (!s.stage_layers.empty()) {
    const auto [sum, positive] = splitOf(s.stage_layers);
    if (static_cast<int64_t>(s.stage_layers.size()) != s.pipeline_stages || sum != m.n_layers || !positive) {
      p.add("strategy.stage_layers", std::to_string(s.stage_layers.size()) + " stages summing to " + std::to_string(sum),
            std::to_string(s.pipeline_stages) + " positive values (one per stage) summing to model.n_layers (" +
                std::to_string(m.n_layers) + ")");
    }
  }
  const bool per_island = perIslandLayouts(j);
  if (per_island) validateIslandLayouts(j, p);
  // Pipeline / expert parallelism (runtime/parallel/layout.h).
  if (s.pipeline_stages > 1 && !per_island) {
    if (world > 0 && world % s.pipeline_stages != 0) {
      p.add("strategy.pipeline_stages", s.pipeline_stages,
            "a divisor of the number of workers (" + std::to_string(world) + "): every pipeline has that many stages");
    }
    if (m.tie_embeddings) {
      p.add("model.tie_embeddings", "true", "false with strategy.pipeline_stages > 1 (embedding and LM head sit on different stages)");
    }
  }
  if (s.expert_parallel > 1) {
    if (moe.num_experts < s.expert_parallel) {
      p.add("strategy.expert_parallel", s.expert_parallel,
            "at most model.moe.num_experts (" + std::to_string(moe.num_experts) + "): every member holds >= 1 expert");
    }
    // Overflow-checked: 2^32 x 2^32 wrapped to 0 and the modulo raised SIGFPE.
    int64_t members = 0;
    const bool too_many = __builtin_mul_overflow(s.expert_parallel, s.pipeline_stages, &members);
    if (world > 0 && s.pipeline_stages >= 1 && (too_many || world % members != 0)) {
      p.add("strategy.expert_parallel", s.expert_parallel,
            s.pipeline_stages > 1 ? "a divisor of the number of pipelines (workers / strategy.pipeline_stages = " +
                                        std::to_string(world / s.pipeline_stages) + ")"
                                  : "a divisor of the number of workers (" + std::to_string(world) + ")");
    }
  }
  if (!s.expert_counts.empty()) {
    const auto [sum, positive] = splitOf(s.expert_counts);
    if (static_cast<int64_t>(s.expert_counts.size()) != s.expert_parallel || sum != moe.num_experts || !positive) {
      p.add("strategy.expert_counts", std::to_string(s.expert_counts.size()) + " members summing to " + std::to_string(sum),
            std::to_string(s.expert_parallel) + " positive values (one per strategy.expert_parallel member) summing to "
            "model.moe.num_experts (" + std::to_string(moe.num_experts) + ")");
    }
  }
  if (t.zero < 0 || t.zero > 3) p.add("train.zero", t.zero, "0 (none), 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)");
  if (s.tensor_parallel < 1) p.add("strategy.tensor_parallel", s.tensor_parallel, "an integer >= 1");
  // ZeRO-2/3 reduce-scatter gradients over the flat ring, uncompressed: a
  // strait codec would silently not apply.
  if (t.zero >= 2 && s.kind == "sync" && s.codec != "none") {
    p.add("train.zero", t.zero, "0 or 1 with strategy.codec " + s.codec + " (ZeRO-" + std::to_string(t.zero) +
                                    "'s gradient reduce-scatter is uncompressed), or strategy.codec: none");
  }
  // ZeRO-3 gathers and reduce-scatters in fp32 (runtime/parallel/sharded_params.h).
  if (t.zero == 3 && t.reduce_dtype != "fp32") {
    p.add("train.reduce_dtype", t.reduce_dtype, "fp32 with train.zero: 3 (its reduce-scatters are fp32), or train.zero <= 2");
  }
  if (s.tensor_parallel > 1 && !per_island) validateTensorParallel(j, world, p);
  validateIslandCollectives(j, p);
  if (s.sequence_parallel && s.tensor_parallel <= 1 && !per_island) {
    p.add("strategy.sequence_parallel", "true", "false without strategy.tensor_parallel > 1 (it cuts the tensor-parallel "
                                                "group's activations along the sequence)");
  }
  if (!(s.failure_timeout > 0)) p.add("strategy.failure_timeout", formatDuration(s.failure_timeout), "a duration > 0");
  if (s.min_workers < 1 || (world > 0 && s.min_workers > world)) {
    p.add("strategy.min_workers", s.min_workers, "between 1 and the number of workers (" + std::to_string(world) + ")");
  }

  const auto& c = j.checkpoint;
  if (c.every < 0) p.add("checkpoint.every", c.every, "0 (only at exit) or a step count");
  if (c.keep_last < 1) p.add("checkpoint.keep_last", c.keep_last, "an integer >= 1");
  if (j.run_dir.empty()) p.add("run_dir", "''", "a directory path");
  return p.status();
}

}  // namespace archipelago::core
