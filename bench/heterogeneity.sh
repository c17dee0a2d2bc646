#!/usr/bin/env bash
# Heterogeneous data parallelism benchmark (issue: trainer). Three CPU
# workers with EMULATED slowdowns 1x/1x/2x in two islands train the same
# model (a) with speed-proportional shares + rebalancer and (b) with an even
# split; baseline measured in the same run: each worker kind's standalone
# tokens/s (one worker alone). Prints a table and one JSON line.
#   bash bench/heterogeneity.sh [BINARY] [STEPS]
set -euo pipefail
bin="${1:-build/src/cli/archipelago}"
steps="${2:-60}"
data="${ARCHIPELAGO_BENCH_DATA:-data/prepared/sotu-byte}"
[ -f "$data/manifest.json" ] || "$bin" data prepare --input data/corpus/sotu --out "$data"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

job() {  # name islands shares rebalance
  cat > "$tmp/$1.yaml" <<YAML
cluster:
  islands:
$2
model: {dim: 128, n_layers: 4, n_heads: 4, max_seq_len: 128}
data: {dir: $(realpath "$data"), seq_len: 128}
train: {steps: $steps, global_batch: 24, eval_every: 0, rebalance: $4$3}
checkpoint: {every: 0, at_exit: false}
run_dir: $tmp/$1
YAML
  "$bin" train "$tmp/$1.yaml" >/dev/null 2>&1
  "$bin" report "$tmp/$1" | sed -n 's/^  throughput *\([0-9,]*\) tokens\/s.*/\1/p' | tr -d ,
}
two="    - {name: fast, count: 2}
    - {name: slow, count: 1, slowdown: 2}
  straits: [{a: fast, b: slow, bandwidth: 1Gbit/s, latency: 5ms}]"
alone_fast=$(job alone_fast "    - {name: fast, count: 1}" "" false)
alone_slow=$(job alone_slow "    - {name: slow, count: 1, slowdown: 2}" "" false)
aware=$(job aware "$two" "" true)
even=$(job even "$two" ", shares: [1, 1, 1]" false)
sum=$((2 * alone_fast + alone_slow))
awk -v a="$aware" -v e="$even" -v s="$sum" -v f="$alone_fast" -v w="$alone_slow" 'BEGIN {
  printf "EMULATED heterogeneity (slowdowns 1x/1x/2x) on this machine\n";
  printf "%-34s %12s\n", "run", "tokens/s";
  printf "%-34s %12d\n", "standalone fast worker", f;
  printf "%-34s %12d\n", "standalone slow worker", w;
  printf "%-34s %12d\n", "sum of standalone (2 fast + slow)", s;
  printf "%-34s %12d\n", "speed-aware shares + rebalancer", a;
  printf "%-34s %12d\n", "even split", e;
  printf "aware / sum of standalone = %.2f (target >= 0.95)\n", a / s;
  printf "aware / even split        = %.2f (target >= 1.30)\n", a / e;
  printf "{\"bench\":\"heterogeneity\",\"emulated\":true,\"standalone_fast\":%d,\"standalone_slow\":%d,\"aware\":%d,\"even\":%d,\"aware_over_sum\":%.3f,\"aware_over_even\":%.3f}\n", f, w, a, e, a / s, a / e;
}'
