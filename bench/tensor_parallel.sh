#!/usr/bin/env bash
# Tensor parallelism on one host (issue 20's target: a TP=2 step <= 1.3x the
# TP=1 step of the same model at the same batch). The same job (dim 512,
# 4 layers, global batch 8 x 128 tokens) runs as
#   tp1   one worker with 2 compute threads (the baseline: the host's 2 cores)
#   tp2   two workers of 1 thread each, one tensor-parallel group
#   tp2sp the same with sequence parallelism
# back to back and alternating (tp1 tp2 tp2sp tp1 ...), so drift of the
# shared machine falls on all alike. Per layout: the median over runs of
# each run's mean step time (rank 0's step_s, the first 5 steps excluded).
# Prints a table and one JSON line.
#   bash bench/tensor_parallel.sh [BIN] [STEPS] [RUNS]
# Data: $ARCHIPELAGO_BENCH_DATA (a prepared dataset); without it a small
# corpus is generated and prepared in a temporary directory.
set -euo pipefail
bin="$(realpath "${1:-build/src/cli/archipelago}")"
steps="${2:-25}"
runs="${3:-3}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/bench_lib.sh"
data="$(bench_data "$bin" "$tmp")"

layout() {  # name -> workers | threads per worker | strategy
  case "$1" in
    tp1) echo "1|2|{kind: sync}" ;;
    tp2) echo "2|1|{kind: sync, tensor_parallel: 2}" ;;
    tp2sp) echo "2|1|{kind: sync, tensor_parallel: 2, sequence_parallel: true}" ;;
  esac
}

run() {  # layout index -> mean step_s of rank 0 after step 5
  local workers threads strategy
  IFS='|' read -r workers threads strategy <<<"$(layout "$1")"
  local dir="$tmp/$1-$2"
  cat > "$dir.yaml" <<YAML
cluster:
  islands:
    - {name: a, count: $workers}
model: {dim: 512, n_layers: 4, n_heads: 8, max_seq_len: 128}
data: {dir: $data, seq_len: 128}
train: {steps: $steps, global_batch: 8, eval_every: 0, rebalance: false, threads_per_worker: $threads}
strategy: $strategy
checkpoint: {every: 0, at_exit: false}
run_dir: $dir
YAML
  bench_train "$bin" "$1" "$dir" | awk '{ print $1 }'
}

for l in tp1 tp2 tp2sp; do : > "$tmp/$l"; done
for i in $(seq 1 "$runs"); do
  for l in tp1 tp2 tp2sp; do run "$l" "$i" >> "$tmp/$l"; done
done
base=$(median < "$tmp/tp1")
printf "%-6s %10s %12s\n" layout "s/step" "vs tp1"
json="{\"bench\":\"tensor_parallel\",\"steps\":$steps,\"runs\":$runs,\"cores\":$(nproc)"
for l in tp1 tp2 tp2sp; do
  m=$(median < "$tmp/$l")
  r=$(awk -v b="$base" -v n="$m" 'BEGIN { printf "%.3f", n / b }')
  printf "%-6s %10.4f %12s\n" "$l" "$m" "$r"
  json="$json,\"$l\":{\"s_per_step\":$m,\"vs_tp1\":$r,\"runs\":[$(paste -sd, "$tmp/$l")]}"
done
echo "$json}"
