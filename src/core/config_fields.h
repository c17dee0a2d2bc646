// The single declaration of every job-file field (private to core).
// visitFields(v, section) calls, for each field in declaration order:
//   v.field(name, FieldRef)          a scalar or a list of scalars
//   v.section(name, nested_struct)   a nested mapping
//   v.list(name, vector<struct>)     a sequence of mappings
// The YAML loader, the env/flag override pass, the dumper and the YAML
// writer in config.cpp are all visitors of this one declaration.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "archipelago/core/config.h"

namespace archipelago::core::detail {

enum class FieldKind { kInt, kUInt, kDouble, kBool, kString, kChoice, kBandwidth, kDuration, kBytes,
                       kIntList, kDoubleList, kStringList };

struct FieldRef {
  FieldKind kind;
  void* ptr;
  std::vector<std::string> choices;  // kChoice only
  const char* help = "";
};

inline FieldRef ref(int64_t& v, const char* help) { return {FieldKind::kInt, &v, {}, help}; }
inline FieldRef ref(uint64_t& v, const char* help) { return {FieldKind::kBytes, &v, {}, help}; }
inline FieldRef ref(double& v, const char* help) { return {FieldKind::kDouble, &v, {}, help}; }
inline FieldRef ref(bool& v, const char* help) { return {FieldKind::kBool, &v, {}, help}; }
inline FieldRef ref(std::string& v, const char* help) { return {FieldKind::kString, &v, {}, help}; }
inline FieldRef ref(std::vector<int64_t>& v, const char* help) { return {FieldKind::kIntList, &v, {}, help}; }
inline FieldRef ref(std::vector<double>& v, const char* help) { return {FieldKind::kDoubleList, &v, {}, help}; }
inline FieldRef ref(std::vector<std::string>& v, const char* help) { return {FieldKind::kStringList, &v, {}, help}; }
inline FieldRef choice(std::string& v, std::vector<std::string> choices, const char* help) {
  return {FieldKind::kChoice, &v, std::move(choices), help};
}
inline FieldRef bandwidth(double& v, const char* help) { return {FieldKind::kBandwidth, &v, {}, help}; }
inline FieldRef duration(double& v, const char* help) { return {FieldKind::kDuration, &v, {}, help}; }

template <typename V> void visitFields(V& v, IslandSpec& s) {
  v.field("name", ref(s.name, "island name, unique in the cluster"));
  v.field("device", ref(s.device, "device kind from the plan catalog (cpu, h100, mi300x, ...)"));
  v.field("count", ref(s.count, "devices (= worker processes) in the island"));
  v.field("slowdown", ref(s.slowdown, "EMULATION: compute-time stretch factor for every device"));
  v.field("slowdowns", ref(s.slowdowns, "EMULATION: per-device stretch factors (length = count)"));
  v.field("host", ref(s.host, "host the island's workers run on"));
  v.field("listen", ref(s.listen, "where its workers listen: auto (the interface routing to the coordinator), an "
                                  "interface (eth0) or an address (IPv4/IPv6; 0.0.0.0 or :: = all)"));
  v.field("advertise", ref(s.advertise, "address peers connect to (empty: the listening one)"));
  v.field("checksum", choice(s.checksum, {"auto", "on", "off"},
                             "frame CRC32C between this island's workers (auto: off on one host, on between hosts; "
                             "off: a trusted network)"));
  v.field("torch_device", ref(s.torch_device, "torch device of its workers: auto (from the device kind), cpu, cuda, "
                                              "cuda:N, xpu, privateuseone, ... (no index: the local rank)"));
  v.field("dtype", choice(s.dtype, {"", "fp32", "bf16", "fp16", "fp8"}, "compute dtype (empty = model.dtype)"));
  v.field("threads", ref(s.threads, "intra-op threads per worker (0 = train.threads_per_worker)"));
  v.field("tensor_parallel", ref(s.tensor_parallel, "this island's tensor-parallel group size (0 = "
                                                    "strategy.tensor_parallel; per-island layouts)"));
  v.field("pipeline_stages", ref(s.pipeline_stages, "this island's pipeline stages (0 = strategy.pipeline_stages; "
                                                    "per-island layouts)"));
  v.field("stage_layers", ref(s.stage_layers, "this island's layers per stage (empty = strategy.stage_layers when "
                                              "its stages are as many, else from device speed and memory)"));
  v.field("cpu_quota", ref(s.cpu_quota, "share of one core per worker, e.g. 0.5 (cgroup cpu controller; 0 = no cap)"));
  v.field("devices_per_node", ref(s.devices_per_node, "devices sharing one node's fabric"));
  v.field("node_bandwidth", bandwidth(s.node_bandwidth, "intra-node fabric bandwidth (0 = catalog)"));
  v.field("fabric_bandwidth", bandwidth(s.fabric_bandwidth, "inter-node bandwidth inside the island (0 = catalog)"));
}

template <typename V> void visitFields(V& v, StraitSpec& s) {
  v.field("a", ref(s.a, "island at one end"));
  v.field("b", ref(s.b, "island at the other end"));
  v.field("bandwidth", bandwidth(s.bandwidth, "bandwidth each direction, e.g. 1Gbit/s"));
  v.field("latency", duration(s.latency, "one-way latency, e.g. 20ms"));
  v.field("jitter", duration(s.jitter, "latency jitter (uniform +-)"));
  v.field("loss", ref(s.loss, "probability that a send needs a retransmission (0..1)"));
  v.field("tls", ref(s.tls, "encrypt traffic on this strait"));
  v.field("emulate", choice(s.emulate, {"auto", "true", "false"},
                            "shape this strait in userspace (auto: only when every island runs on one host)"));
  v.field("checksum", choice(s.checksum, {"auto", "on", "off"},
                             "frame CRC32C on this strait (auto: on, off when tls: true)"));
}

template <typename V> void visitFields(V& v, ClusterSpec& s) {
  v.field("name", ref(s.name, "cluster name"));
  v.list("islands", s.islands);
  v.list("straits", s.straits);
  v.field("default_strait_bandwidth", bandwidth(s.default_strait_bandwidth, "for island pairs no strait names (0 = unshaped)"));
  v.field("default_strait_latency", duration(s.default_strait_latency, "for island pairs no strait names"));
}

template <typename V> void visitFields(V& v, MoeConfig& s) {
  v.field("num_experts", ref(s.num_experts, "experts per MoE layer (0 = dense FFN)"));
  v.field("top_k", ref(s.top_k, "experts per token"));
  v.field("expert_hidden", ref(s.expert_hidden, "expert FFN width (0 = model.ffn_hidden)"));
  v.field("shared_expert", ref(s.shared_expert, "add an always-on shared expert"));
  v.field("every", ref(s.every, "MoE FFN in every n-th layer"));
  v.field("balance", choice(s.balance, {"aux_loss", "router_bias", "none"}, "load balancing method"));
  v.field("aux_loss_coef", ref(s.aux_loss_coef, "auxiliary load-balancing loss weight"));
  v.field("router_bias_rate", ref(s.router_bias_rate, "router-bias update rate (aux-loss-free balancing)"));
  v.field("capacity_factor", ref(s.capacity_factor, "expert capacity factor (0 = unlimited)"));
}

template <typename V> void visitFields(V& v, ModelConfig& s) {
  v.field("preset", ref(s.preset, "planner preset name; empty = the fields below"));
  v.field("vocab_size", ref(s.vocab_size, "vocabulary size (0 = from the data manifest)"));
  v.field("dim", ref(s.dim, "hidden size"));
  v.field("n_layers", ref(s.n_layers, "decoder layers"));
  v.field("n_heads", ref(s.n_heads, "attention heads"));
  v.field("n_kv_heads", ref(s.n_kv_heads, "key/value heads (0 = n_heads; fewer = grouped-query attention)"));
  v.field("ffn_hidden", ref(s.ffn_hidden, "SwiGLU hidden size (0 = 8/3 dim rounded to 32)"));
  v.field("max_seq_len", ref(s.max_seq_len, "longest sequence the model supports"));
  v.field("rope_theta", ref(s.rope_theta, "rotary embedding base"));
  v.field("norm_eps", ref(s.norm_eps, "RMSNorm epsilon"));
  v.field("tie_embeddings", ref(s.tie_embeddings, "share embedding and LM-head weights"));
  v.field("dtype", choice(s.dtype, {"fp32", "bf16", "fp16", "fp8"},
                          "compute dtype (master weights and optimizer state stay fp32; islands may override)"));
  v.field("init_std", ref(s.init_std, "initialisation standard deviation"));
  v.section("moe", s.moe);
}

template <typename V> void visitFields(V& v, DataConfig& s) {
  v.field("dir", ref(s.dir, "prepared data directory (output of `archipelago data prepare`)"));
  v.field("inputs", ref(s.inputs, "raw text inputs used to prepare `dir` when it is missing"));
  v.field("tokenizer", choice(s.tokenizer, {"byte", "spm"}, "tokenizer used when preparing"));
  v.field("vocab", ref(s.vocab, "SentencePiece vocabulary size"));
  v.field("val_fraction", ref(s.val_fraction, "fraction of documents held out for validation"));
  v.field("seq_len", ref(s.seq_len, "tokens per training sample"));
  v.field("seed", ref(s.seed, "sampler seed"));
}

template <typename V> void visitFields(V& v, TrainConfig& s) {
  v.field("steps", ref(s.steps, "optimizer steps"));
  v.field("global_batch", ref(s.global_batch, "samples per optimizer step over all workers"));
  v.field("micro_batch", ref(s.micro_batch, "samples per forward/backward (0 = whole share)"));
  v.field("optimizer", choice(s.optimizer, {"adamw", "sgd"}, "inner optimizer"));
  v.field("lr", ref(s.lr, "peak learning rate"));
  v.field("min_lr", ref(s.min_lr, "learning rate at the end of the cosine decay"));
  v.field("warmup_steps", ref(s.warmup_steps, "linear warmup steps"));
  v.field("weight_decay", ref(s.weight_decay, "AdamW weight decay"));
  v.field("beta1", ref(s.beta1, "AdamW beta1"));
  v.field("beta2", ref(s.beta2, "AdamW beta2"));
  v.field("adam_eps", ref(s.adam_eps, "AdamW epsilon"));
  v.field("grad_clip", ref(s.grad_clip, "global gradient-norm clip (0 = off)"));
  v.field("eval_every", ref(s.eval_every, "steps between validation runs (0 = never)"));
  v.field("eval_batches", ref(s.eval_batches, "validation batches per evaluation"));
  v.field("log_every", ref(s.log_every, "steps between metric lines"));
  v.field("seed", ref(s.seed, "model initialisation seed"));
  v.field("shard_optimizer", ref(s.shard_optimizer, "shard optimizer state over the data-parallel group (= zero: 1)"));
  v.field("zero", ref(s.zero, "ZeRO stage over each data-parallel group: 0 none, 1 optimizer state, 2 + gradients, "
                              "3 + parameters"));
  v.field("rebalance", ref(s.rebalance, "adjust batch shares to measured speed"));
  v.field("shares", ref(s.shares, "initial batch-share weights per rank (empty = 1/slowdown)"));
  v.field("threads_per_worker", ref(s.threads_per_worker, "intra-op threads per worker"));
  v.field("recompute", ref(s.recompute, "pipeline stages: recompute activations in backward (saves memory)"));
  v.field("reduce_dtype", choice(s.reduce_dtype, {"fp32", "bf16"}, "dtype gradients are reduced in"));
  v.field("loss_scale", choice(s.loss_scale, {"auto", "dynamic", "none"},
                               "loss scaling (auto: dynamic for fp16 compute, none otherwise)"));
  v.field("loss_scale_init", ref(s.loss_scale_init, "dynamic loss scaling: first scale"));
  v.field("loss_scale_window", ref(s.loss_scale_window, "dynamic loss scaling: finite steps before the scale doubles"));
  v.field("fp8_recipe", choice(s.fp8_recipe, {"delayed", "block"},
                               "fp8 linears: delayed per-tensor scaling or 1x128/128x128 block scaling"));
  v.field("fp8_amax_history", ref(s.fp8_amax_history, "fp8 delayed scaling: steps of amax history"));
  v.field("check_ops", ref(s.check_ops, "check the device's operators against a CPU fp64 reference before step 1"));
}

template <typename V> void visitFields(V& v, StrategyConfig& s) {
  v.field("kind", choice(s.kind, {"sync", "diloco", "streaming"}, "cross-island strategy"));
  v.field("inner_steps", ref(s.inner_steps, "DiLoCo inner steps per outer step (H)"));
  v.field("outer_lr", ref(s.outer_lr, "outer optimizer learning rate"));
  v.field("outer_momentum", ref(s.outer_momentum, "outer optimizer momentum"));
  v.field("nesterov", ref(s.nesterov, "Nesterov momentum in the outer optimizer"));
  v.field("codec", choice(s.codec, {"none", "bf16", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"},
                          "compression on strait legs"));
  v.field("error_feedback", ref(s.error_feedback, "carry quantisation error to the next sync"));
  v.field("fragments", ref(s.fragments, "streaming: model fragments"));
  v.field("overlap_steps", ref(s.overlap_steps, "streaming: inner steps before a fragment's sync is applied"));
  v.field("streams", ref(s.streams, "TCP streams per peer pair"));
  v.field("bucket_bytes", ref(s.bucket_bytes, "gradient bucket size, e.g. 4MiB"));
  v.field("allreduce", choice(s.allreduce, {"auto", "ring", "tree", "hierarchical"}, "allreduce algorithm"));
  v.field("island_collectives", choice(s.island_collectives, {"comm", "c10d"},
                                       "who sums gradient buckets and carries tensor parallelism inside an island (c10d: NCCL / Gloo on the device)"));
  v.field("pipeline_stages", ref(s.pipeline_stages, "pipeline-parallel stages"));
  v.field("expert_parallel", ref(s.expert_parallel, "expert-parallel group size"));
  v.field("tensor_parallel", ref(s.tensor_parallel, "tensor-parallel group size (consecutive ranks of one island)"));
  v.field("sequence_parallel", ref(s.sequence_parallel, "tensor parallelism: split norms and residuals along the "
                                                        "sequence"));
  v.field("stage_layers", ref(s.stage_layers, "layers per pipeline stage (empty = from device speed and memory)"));
  v.field("expert_counts", ref(s.expert_counts, "experts per expert-parallel member (empty = from device speed)"));
  v.field("dispatch_codec", choice(s.dispatch_codec, {"none", "bf16", "fp16", "int8", "fp8_e4m3", "fp8_e5m2"},
                                   "expert parallelism: codec of token rows in the all-to-all"));
  v.field("failure_timeout", duration(s.failure_timeout, "silence after which a worker is declared failed"));
  v.field("min_workers", ref(s.min_workers, "below this many workers the job checkpoints and exits"));
}

template <typename V> void visitFields(V& v, CheckpointConfig& s) {
  v.field("every", ref(s.every, "steps between checkpoints (0 = only at exit)"));
  v.field("keep_last", ref(s.keep_last, "checkpoints kept"));
  v.field("at_exit", ref(s.at_exit, "write a checkpoint when the run ends or is interrupted"));
  v.field("async", ref(s.async, "write in the background after an in-memory snapshot"));
}

template <typename V> void visitFields(V& v, SecurityConfig& s) {
  v.field("tls", ref(s.tls, "encrypt every link, worker-worker and worker-coordinator (mutual TLS, the job's CA)"));
  v.field("credentials", ref(s.credentials, "directory from `archipelago secrets init` (ca.pem, node.pem, node.key, secret)"));
}

template <typename V> void visitFields(V& v, JobConfig& s) {
  v.section("cluster", s.cluster);
  v.section("model", s.model);
  v.section("data", s.data);
  v.section("train", s.train);
  v.section("strategy", s.strategy);
  v.section("checkpoint", s.checkpoint);
  v.section("security", s.security);
  v.field("run_dir", ref(s.run_dir, "run directory (metrics, checkpoints, report)"));
}

}  // namespace archipelago::core::detail
