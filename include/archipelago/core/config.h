// The job file: typed structs with defaults, loaded from YAML, overridden by
// ARCHIPELAGO_* environment variables and then by --set flags, validated
// before any worker starts. Every field is declared once, in the struct's
// visit() below, with its name and help text; loading, overriding, dumping
// (`archipelago config dump`, with each value's source) and unknown-key
// detection all walk that single declaration, so they cannot drift apart.
//
// Sections: cluster, model, data, train, strategy, checkpoint, run_dir.
// `cluster:` may be a mapping or a path (relative to the job file) of a
// cluster spec file that holds the same mapping.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::core {

// ---- cluster spec -----------------------------------------------------------

// Devices of one kind in one place with a fast fabric between them.
struct IslandSpec {
  std::string name;
  std::string device = "cpu";     // a device kind in the plan catalog (cpu, h100, mi300x, ...)
  int64_t count = 1;              // devices (= workers) in the island
  double slowdown = 1.0;          // EMULATION: stretch each worker's compute time by this factor
  std::vector<double> slowdowns;  // EMULATION: optional per-device factors (overrides slowdown)
  std::string host = "127.0.0.1"; // where the island's workers run (launcher; one host => straits emulated)
  std::string listen = "auto";    // where its workers listen: auto | interface | address (comm/address.h)
  std::string advertise;          // the address peers connect to; empty: the listening one
  // Frame CRC32C on links between this island's workers: "auto" (off when
  // both ends run on one host: loopback cannot corrupt; on between hosts),
  // "on", or "off" (the job trusts this island's network: NIC and TCP
  // checksums only). See docs/comm.md "Checksums".
  std::string checksum = "auto";
  // The torch device its workers compute on: "auto" (from the catalog kind:
  // cpu kinds the CPU, NVIDIA and AMD kinds cuda, Huawei privateuseone,
  // Intel xpu), or any device string the linked libtorch parses (cpu, cuda,
  // cuda:1, xpu, privateuseone, mps). Without an index, a worker takes its
  // local rank (LOCAL_RANK, SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK) or
  // else its index in the island. See docs/devices.md "Devices".
  std::string torch_device = "auto";
  std::string dtype;              // compute dtype: fp32 | bf16 | fp16 | fp8; empty = model.dtype
  int64_t threads = 0;            // intra-op threads per worker; 0 = train.threads_per_worker
  // This island's own layout (docs/parallelism.md "Per-island layouts"):
  // 0 / empty = strategy.tensor_parallel, strategy.pipeline_stages,
  // strategy.stage_layers. Any island naming one makes every island a
  // layout of its own (core/island_layout.h).
  int64_t tensor_parallel = 0;
  int64_t pipeline_stages = 0;
  std::vector<int64_t> stage_layers;
  double cpu_quota = 0;           // share of one core per worker (cgroup cpu controller); 0 = no cap
  int64_t devices_per_node = 8;   // devices sharing the intra-node fabric (planner)
  double node_bandwidth = 0;      // bytes/s intra-node fabric; 0 = from the device catalog
  double fabric_bandwidth = 0;    // bytes/s between nodes inside the island; 0 = from the catalog

  // Slowdown of device i (per-device list if given, else the island-wide one).
  double slowdownOf(int64_t i) const {
    return i < static_cast<int64_t>(slowdowns.size()) ? slowdowns[static_cast<size_t>(i)] : slowdown;
  }
};

// The link between two islands. On one machine it is emulated by the comm
// layer's userspace shaper; on a real cluster it describes the real WAN.
struct StraitSpec {
  std::string a;              // island name
  std::string b;              // island name
  double bandwidth = 1.25e8;  // bytes/s each direction ("1Gbit/s" in YAML)
  double latency = 0.0;       // seconds one way ("20ms" in YAML)
  double jitter = 0.0;        // seconds, uniform +- around latency
  double loss = 0.0;          // probability a send is delayed by a retransmit timeout (emulation)
  bool tls = false;           // encrypt traffic crossing this strait
  // Shape this strait in userspace to bandwidth/latency/jitter/loss: "true",
  // "false", or "auto" = only when every island runs on one host (then the
  // strait cannot be real). A job across hosts never throttles a real link.
  std::string emulate = "auto";
  // Frame CRC32C on links crossing this strait: "auto" (on, a WAN can
  // corrupt what TCP's 16-bit checksum misses; off with tls: true, whose
  // AEAD already rejects any altered byte), "on", or "off".
  std::string checksum = "auto";
};

struct ClusterSpec {
  std::string name = "local";
  std::vector<IslandSpec> islands;
  std::vector<StraitSpec> straits;
  // Bandwidth/latency between islands that no strait names (emulated as
  // unshaped loopback when 0).
  double default_strait_bandwidth = 0;
  double default_strait_latency = 0;

  int64_t worldSize() const;
  // Island index of a name, or -1.
  int islandIndex(const std::string& name) const;
  // The strait joining two islands, or nullptr if none is declared.
  const StraitSpec* strait(const std::string& a, const std::string& b) const;
  // Every island's workers run on one host (loopback names count as one).
  bool oneHost() const;
  // Whether `s` is shaped in userspace (StraitSpec::emulate).
  bool emulated(const StraitSpec& s) const;
};

// ---- model ------------------------------------------------------------------

struct MoeConfig {
  int64_t num_experts = 0;          // 0 = dense FFN
  int64_t top_k = 2;
  int64_t expert_hidden = 0;        // 0 = same as model.ffn_hidden
  bool shared_expert = false;
  int64_t every = 1;                // an MoE FFN in every n-th layer (others dense)
  std::string balance = "aux_loss"; // aux_loss | router_bias | none
  double aux_loss_coef = 0.01;
  double router_bias_rate = 0.001;
  double capacity_factor = 0.0;     // 0 = no capacity limit (no drops)
};

struct ModelConfig {
  std::string preset;             // planner preset name (e.g. llama3-8b); empty = the fields below
  int64_t vocab_size = 0;         // 0 = taken from the data manifest
  int64_t dim = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;         // 0 = n_heads (no grouped-query attention)
  int64_t ffn_hidden = 0;         // 0 = SwiGLU default (8/3 * dim rounded up to 32)
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  bool tie_embeddings = false;
  std::string dtype = "fp32";     // compute dtype: fp32 | bf16 | fp16 | fp8 (islands may override)
  double init_std = 0.02;
  MoeConfig moe;
};

// ---- data -------------------------------------------------------------------

struct DataConfig {
  std::string dir = "data/prepared/sotu-byte";  // output of `archipelago data prepare`
  std::vector<std::string> inputs;              // raw inputs, to prepare `dir` if missing
  std::string tokenizer = "byte";               // byte | spm
  int64_t vocab = 0;                            // spm vocabulary size
  double val_fraction = 0.02;
  int64_t seq_len = 128;                        // tokens per sample (+1 for the target)
  int64_t seed = 1234;
};

// ---- train ------------------------------------------------------------------

struct TrainConfig {
  int64_t steps = 100;
  int64_t global_batch = 16;   // samples per optimizer step, over all workers
  int64_t micro_batch = 0;     // samples per forward/backward; 0 = whole share at once
  std::string optimizer = "adamw";  // adamw | sgd (plain SGD: for tests and DiLoCo equivalence checks)
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 10;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;       // 0 = no clipping
  int64_t eval_every = 25;      // 0 = no evaluation
  int64_t eval_batches = 4;
  int64_t log_every = 1;
  int64_t seed = 42;
  bool shard_optimizer = false; // ZeRO-1 over each data-parallel group (= zero: 1; zeroStage() reads both)
  // Sharded data parallelism over each data-parallel group (docs/parallelism.md
  // "Sharded data parallelism"): 0 none, 1 optimizer state (ZeRO-1), 2 also
  // gradients (reduce-scattered), 3 also parameters (gathered per layer).
  int64_t zero = 0;
  bool rebalance = true;        // adjust batch shares to measured speed
  std::vector<double> shares;   // fixed initial shares per rank (empty = from slowdowns)
  int64_t threads_per_worker = 1;
  bool recompute = false;       // pipeline stages: keep only stage inputs, recompute activations in backward
  // Mixed precision (docs/devices.md "Dtypes"): master weights and optimizer
  // state are always fp32; gradients are reduced in reduce_dtype.
  std::string reduce_dtype = "fp32";  // fp32 | bf16
  std::string loss_scale = "auto";    // auto (dynamic for fp16, else none) | dynamic | none
  double loss_scale_init = 65536;     // dynamic: the first scale
  int64_t loss_scale_window = 1000;   // dynamic: finite steps before the scale doubles
  std::string fp8_recipe = "delayed"; // fp8 linears: delayed (per tensor, amax history) | block (1x128 / 128x128)
  int64_t fp8_amax_history = 16;      // delayed scaling: steps of amax kept
  bool check_ops = true;              // every worker checks its device's operators before the first step
};

// The ZeRO stage a job asks for: train.zero, or 1 for the older
// train.shard_optimizer: true.
inline int64_t zeroStage(const TrainConfig& t) { return t.zero > 0 ? t.zero : (t.shard_optimizer ? 1 : 0); }

// ---- strategy -----------------------------------------------------------------

struct StrategyConfig {
  std::string kind = "sync";    // sync | diloco | streaming
  int64_t inner_steps = 50;     // DiLoCo H
  double outer_lr = 0.7;
  double outer_momentum = 0.9;
  bool nesterov = true;
  std::string codec = "none";   // none | bf16 | fp16 | int8 | fp8_e4m3 | fp8_e5m2
  bool error_feedback = true;
  int64_t fragments = 4;        // streaming: number of model fragments
  int64_t overlap_steps = 1;    // streaming: inner steps before a fragment's sync result is applied
  int64_t streams = 4;          // TCP streams per peer pair
  uint64_t bucket_bytes = 4 << 20;  // gradient bucket size
  std::string allreduce = "auto";   // auto | ring | tree | hierarchical
  // Who sums gradient buckets and carries tensor parallelism's collectives
  // inside an island: comm (ours: TCP / same-host copy from host memory) |
  // c10d (libtorch's collectives on the device's tensors: NCCL on CUDA, Gloo
  // on the CPU); across straits always comm.
  std::string island_collectives = "comm";
  int64_t pipeline_stages = 1;  // PP
  int64_t expert_parallel = 1;  // EP
  int64_t tensor_parallel = 1;  // TP: ranks per tensor-parallel group (consecutive ranks of one island)
  bool sequence_parallel = false;  // SP: TP ranks split norms and residuals along the sequence
  std::vector<int64_t> stage_layers;  // uneven layer split (empty = from device speed and memory)
  std::vector<int64_t> expert_counts; // experts per expert-parallel member (empty = from device speed)
  std::string dispatch_codec = "none";  // EP: codec of the token rows in the all-to-all
  double failure_timeout = 2.0; // seconds until a silent peer is declared failed
  int64_t min_workers = 1;
};

// ---- checkpoint ---------------------------------------------------------------

struct CheckpointConfig {
  int64_t every = 50;   // steps between checkpoints; 0 = only at exit
  int64_t keep_last = 3;
  bool at_exit = true;
  bool async = true;    // snapshot in memory, write in the background
};

// ---- security ----------------------------------------------------------------

// docs/comm.md "TLS". The job secret itself comes from ARCHIPELAGO_SECRET,
// ARCHIPELAGO_SECRET_FILE or the credentials directory's `secret`.
struct SecurityConfig {
  // Encrypt every link, worker-worker and worker-coordinator (TLS 1.3,
  // mutual, certificates of the job's CA). A strait's own `tls: true`
  // encrypts only the links crossing it.
  bool tls = false;
  // Directory from `archipelago secrets init DIR` (ca.pem, node.pem,
  // node.key, secret). `archipelago train` writes one into the run
  // directory when TLS is on and this is empty; a standalone worker needs it.
  std::string credentials;
};

struct JobConfig {
  ClusterSpec cluster;
  ModelConfig model;
  DataConfig data;
  TrainConfig train;
  StrategyConfig strategy;
  CheckpointConfig checkpoint;
  SecurityConfig security;
  std::string run_dir = "runs/demo";
};

// ---- loading ------------------------------------------------------------------

// Where an effective value came from.
struct ValueSource {
  std::string kind;    // default | file | env | flag
  std::string detail;  // file:line, variable name, or flag text
};

struct LoadOptions {
  // "path=value" overrides from --set flags, applied last.
  std::vector<std::string> sets;
  // Environment lookup; defaults to getenv. Tests inject their own.
  std::map<std::string, std::string> env;
  bool use_process_env = true;
};

struct LoadedJob {
  JobConfig job;
  std::string path;
  // Effective value and source of every scalar field, by path, in
  // declaration order (cluster.islands[0].count, train.lr, ...).
  std::vector<std::pair<std::string, std::pair<std::string, ValueSource>>> values;
};

// Loads, overrides and validates. On any error returns kInvalidArgument with
// one line per problem: "<path>: <what is wrong> (got <value>); expected <...>".
Result<LoadedJob> loadJob(const std::string& path, const LoadOptions& options = {});
// Loads a cluster spec file on its own (the planner's input).
Result<ClusterSpec> loadClusterSpec(const std::string& path);
// Validation alone (also used after programmatic edits).
Status validateJob(const JobConfig& job);
Status validateCluster(const ClusterSpec& cluster, const std::string& prefix = "cluster");

// The environment variable that overrides a field: train.lr -> ARCHIPELAGO_TRAIN_LR.
std::string envVarForPath(const std::string& path);
// A YAML document holding every effective value (for the run directory).
std::string dumpJobYaml(const JobConfig& job);

}  // namespace archipelago::core
