#!/usr/bin/env bash
# Heterogeneous data parallelism benchmark (issue: trainer). Three CPU
# workers with EMULATED slowdowns 1x/1x/2x in two islands train the same
# model (a) with speed-proportional shares + rebalancer and (b) with an even
# split; baseline measured in the same run: each worker kind's standalone
# tokens/s (one worker alone). Tokens/s are steady-state (global batch over
# the mean step time, start-up excluded). Prints a table and one JSON line.
#   bash bench/heterogeneity.sh [BINARY] [STEPS]
set -euo pipefail
bin="${1:-build/src/cli/archipelago}"
steps="${2:-60}"
data="${ARCHIPELAGO_BENCH_DATA:-data/prepared/sotu-byte}"
[ -f "$data/manifest.json" ] || "$bin" data prepare --input data/corpus/sotu --out "$data"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
batch=24 seq=128  # global batch (sequences) and tokens per sequence of every run

job() {  # name islands shares rebalance
  cat > "$tmp/$1.yaml" <<YAML
cluster:
  islands:
$2
model: {dim: 128, n_layers: 4, n_heads: 4, max_seq_len: 128}
data: {dir: $(realpath "$data"), seq_len: $seq}
train: {steps: $steps, global_batch: $batch, eval_every: 0, rebalance: $4$3}
checkpoint: {every: 0, at_exit: false}
run_dir: $tmp/$1
YAML
  "$bin" train "$tmp/$1.yaml" >/dev/null 2>&1
  # Steady-state tokens/s: the global batch's tokens over the trainer's mean
  # step time (step 1 excluded; the summary line's measured_step_s), so
  # process start-up and rank 0's calibration (seconds, paid once per job)
  # do not weigh on a 60-step run; the same measure for every run.
  sed -n 's/.*"kind":"summary".*"measured_step_s":\([0-9.eE+-]*\).*/\1/p' "$tmp/$1/metrics.jsonl" |
    awk -v tokens=$((batch * seq)) '{ printf "%d\n", tokens / $1 }'
}
two="    - {name: fast, count: 2}
    - {name: slow, count: 1, slowdown: 2}
  straits: [{a: fast, b: slow, bandwidth: 1Gbit/s, latency: 5ms}]"
alone_fast=$(job alone_fast "    - {name: fast, count: 1}" "" false)
alone_slow=$(job alone_slow "    - {name: slow, count: 1, slowdown: 2}" "" false)
aware=$(job aware "$two" "" true)
even=$(job even "$two" ", shares: [1, 1, 1]" false)
# The same mechanism with one fast and one slow worker: 1.5 cores of compute
# (the emulated slowdown sleeps), so it fits a 2-core host, where the
# 3-worker case needs 2.5 cores and cannot reach its standalone sum.
pair="    - {name: fast, count: 1}
    - {name: slow, count: 1, slowdown: 2}
  straits: [{a: fast, b: slow, bandwidth: 1Gbit/s, latency: 5ms}]"
aware2=$(job aware2 "$pair" "" true)
even2=$(job even2 "$pair" ", shares: [1, 1]" false)
sum=$((2 * alone_fast + alone_slow))
sum2=$((alone_fast + alone_slow))
awk -v a="$aware" -v e="$even" -v s="$sum" -v f="$alone_fast" -v w="$alone_slow" \
    -v a2="$aware2" -v e2="$even2" -v s2="$sum2" -v cores="$(nproc)" 'BEGIN {
  printf "EMULATED heterogeneity (slowdowns stretch compute by sleeping) on this machine, %d cores\n", cores;
  printf "%-40s %12s\n", "run", "tokens/s";
  printf "%-40s %12d\n", "standalone fast worker (1x)", f;
  printf "%-40s %12d\n", "standalone slow worker (2x)", w;
  printf "1x/1x/2x (issue target; needs >= 2.5 cores of compute)\n";
  printf "%-40s %12d\n", "  sum of standalone (2 fast + slow)", s;
  printf "%-40s %12d\n", "  speed-aware shares + rebalancer", a;
  printf "%-40s %12d\n", "  even split", e;
  printf "  aware / sum of standalone = %.2f (target >= 0.95)\n", a / s;
  printf "  aware / even split        = %.2f (target >= 1.30)\n", a / e;
  printf "1x/2x (1.5 cores of compute)\n";
  printf "%-40s %12d\n", "  sum of standalone (fast + slow)", s2;
  printf "%-40s %12d\n", "  speed-aware shares + rebalancer", a2;
  printf "%-40s %12d\n", "  even split", e2;
  printf "  aware / sum of standalone = %.2f\n", a2 / s2;
  printf "  aware / even split        = %.2f (ideal %.2f)\n", a2 / e2, s2 / (2 * w);
  printf "{\"bench\":\"heterogeneity\",\"emulated\":true,\"cores\":%d,\"standalone_fast\":%d,\"standalone_slow\":%d,\"aware\":%d,\"even\":%d,\"aware_over_sum\":%.3f,\"aware_over_even\":%.3f,\"pair_aware\":%d,\"pair_even\":%d,\"pair_aware_over_sum\":%.3f,\"pair_aware_over_even\":%.3f}\n", cores, f, w, a, e, a / s, a / e, a2, e2, a2 / s2, a2 / e2;
}'
