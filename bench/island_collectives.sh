#!/usr/bin/env bash
# Who sums the gradient buckets inside an island (strategy.island_collectives,
# docs/devices.md "Island collectives"): ours through the comm layer, or
# libtorch's c10d (Gloo on this CPU host; NCCL on a GPU island). The same
# data-parallel job (dim 512, 4 layers: 52 MB of fp32 gradients a step,
# global batch 8 x 128 tokens, workers of 1 thread) runs as
#   comm1x2 / c10d1x2   one island of 2 workers
#   comm2x2 / c10d2x2   two islands of 2 (c10d inside each, comm across)
# back to back and alternating, so drift of the shared machine falls on all
# alike. Per layout: the median over runs of rank 0's mean step time (first
# 5 steps excluded). ZERO (train.zero, default 0) puts ZeRO's
# reduce-scatters and gathers on the same backend. Prints a table and one
# JSON line.
#   bash bench/island_collectives.sh [BIN] [STEPS] [RUNS] [ZERO]
# Data: $ARCHIPELAGO_BENCH_DATA (a prepared dataset); without it a small
# corpus is generated and prepared in a temporary directory.
set -euo pipefail
bin="$(realpath "${1:-build/src/cli/archipelago}")"
steps="${2:-20}"
runs="${3:-3}"
zero="${4:-0}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/bench_lib.sh"
data="$(bench_data "$bin" "$tmp")"
layouts=(comm1x2 c10d1x2 comm2x2 c10d2x2)

collectives_of() { case "$1" in comm*) echo comm ;; c10d*) echo c10d ;; esac; }
shape_of() { echo "${1: -3}"; }  # 1x2 | 2x2

run() {  # layout run-index -> mean step_s of rank 0 after step 5
  local collectives islands="    - {name: a, count: 2}"
  collectives="$(collectives_of "$1")"
  [ "$(shape_of "$1")" = 2x2 ] && islands="    - {name: a, count: 2}
    - {name: b, count: 2}
  straits: [{a: a, b: b, bandwidth: 100Gbit/s, latency: 0ms}]"
  local dir="$tmp/$1-$2"
  cat > "$dir.yaml" <<YAML
cluster:
  islands:
$islands
model: {dim: 512, n_layers: 4, n_heads: 8, max_seq_len: 128}
data: {dir: $data, seq_len: 128}
train: {steps: $steps, global_batch: 8, eval_every: 0, rebalance: false, threads_per_worker: 1, zero: $zero}
strategy: {kind: sync, island_collectives: $collectives, failure_timeout: 30s}
checkpoint: {every: 0, at_exit: false}
run_dir: $dir
YAML
  bench_train "$bin" "$1" "$dir" | awk '{ print $1 }'
}

for l in "${layouts[@]}"; do : > "$tmp/$l"; done
for i in $(seq 1 "$runs"); do
  for l in "${layouts[@]}"; do run "$l" "$i" >> "$tmp/$l"; done
done
echo "2x2 layouts: one host, so the strait between the islands is EMULATED (100 Gbit/s, no latency)"
printf "%-8s %10s %12s\n" layout "s/step" "vs comm"
echo "train.zero: $zero"
json="{\"bench\":\"island_collectives\",\"zero\":$zero,\"steps\":$steps,\"runs\":$runs,\"cores\":$(nproc)"
for l in "${layouts[@]}"; do
  m=$(median < "$tmp/$l")
  base=$(median < "$tmp/comm$(shape_of "$l")")
  r=$(awk -v b="$base" -v n="$m" 'BEGIN { printf "%.3f", n / b }')
  printf "%-8s %10.4f %12s\n" "$l" "$m" "$r"
  json="$json,\"$l\":{\"s_per_step\":$m,\"vs_comm\":$r,\"runs\":[$(paste -sd, "$tmp/$l")]}"
done
echo "$json}"
