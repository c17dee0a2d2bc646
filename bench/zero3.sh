#!/usr/bin/env bash
# ZeRO-3 against plain data parallelism (issue 20's targets at N = 4: the
# model state per worker <= 1/N + 10% of the unsharded run's, step time
# <= 1.15x). The same job (dim 512, 16 layers, global batch 8 x 128
# tokens, 4 workers of 1 thread) runs as
#   zero0  every worker holds the whole model state (the baseline)
#   zero2  optimizer state and gradients sharded
#   zero3  parameters sharded too, gathered layer by layer where used
# back to back and alternating, so drift of the shared machine falls on all
# alike. Four workers share the cores: a worker starved of CPU for the
# default 2 s failure timeout would be declared lost, so the timeout is 30 s. Per layout: the median over runs of rank 0's mean step_s (the first
# 5 steps excluded), and from each worker's last step record the largest
# state_bytes (its tensors: masters, gradients, moments, plus ZeRO-3's pool
# for gathered layers) and the largest peak_rss_bytes (the whole process,
# libtorch included).
# With `moe` the model's layers are MoE (8 experts, top 2) over two expert
# groups of two members (strategy.expert_parallel: 2): a rank holds the
# dense tensors and its member's 4 experts, ZeRO shards the dense ones over
# all four and the experts over the two ranks holding them, so the floor
# is not 1/N: the table adds ZeRO-3's own count of the elements a rank
# keeps of those it holds (rank 0's log), the ratio a perfect shard reaches.
# Prints a table and one JSON line.
#   bash bench/zero3.sh [BIN] [STEPS] [RUNS] [moe]
# Data: $ARCHIPELAGO_BENCH_DATA (a prepared dataset); without it a small
# corpus is generated and prepared in a temporary directory.
set -euo pipefail
bin="$(realpath "${1:-build/src/cli/archipelago}")"
steps="${2:-20}"
runs="${3:-3}"
moe="${4:-}"
model_moe=""; strategy_ep=""
if [ "$moe" = moe ]; then
  model_moe=", moe: {num_experts: 8, top_k: 2}"; strategy_ep=", expert_parallel: 2"
elif [ -n "$moe" ]; then
  echo "zero3.sh: the 4th argument is 'moe' or nothing, not '$moe'" >&2; exit 2
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/bench_lib.sh"
data="$(bench_data "$bin" "$tmp")"

run() {  # layout, run index -> "step_s state_bytes peak_rss_bytes"
  local dir="$tmp/$1-$2"
  cat > "$dir.yaml" <<YAML
cluster:
  islands:
    - {name: a, count: 4}
model: {dim: 512, n_layers: 16, n_heads: 8, max_seq_len: 128$model_moe}
data: {dir: $data, seq_len: 128}
train: {steps: $steps, global_batch: 8, eval_every: 0, rebalance: false, threads_per_worker: 1, zero: ${1#zero}}
strategy: {kind: sync$strategy_ep, failure_timeout: 30s}
checkpoint: {every: 0, at_exit: false}
run_dir: $dir
YAML
  bench_train "$bin" "$1" "$dir"
}

layouts="zero0 zero2 zero3"
for l in $layouts; do : > "$tmp/$l"; done
for i in $(seq 1 "$runs"); do
  for l in $layouts; do run "$l" "$i" >> "$tmp/$l"; done
done
col() { awk -v c="$1" '{ print $c }' "$2" | median; }
base_t=$(col 1 "$tmp/zero0"); base_s=$(col 2 "$tmp/zero0")
printf "%-6s %10s %8s %14s %10s %14s\n" layout "s/step" "vs zero0" "state MB/rank" "vs zero0" "peak RSS MB"
json="{\"bench\":\"zero3\",\"workers\":4,\"steps\":$steps,\"runs\":$runs,\"cores\":$(nproc)"
for l in $layouts; do
  t=$(col 1 "$tmp/$l"); s=$(col 2 "$tmp/$l"); r=$(col 3 "$tmp/$l")
  rt=$(awk -v b="$base_t" -v n="$t" 'BEGIN { printf "%.3f", n / b }')
  rs=$(awk -v b="$base_s" -v n="$s" 'BEGIN { printf "%.3f", n / b }')
  printf "%-6s %10.4f %8s %14.1f %10s %14.1f\n" "$l" "$t" "$rt" "$(awk -v x="$s" 'BEGIN { print x / 1e6 }')" "$rs" \
    "$(awk -v x="$r" 'BEGIN { print x / 1e6 }')"
  json="$json,\"$l\":{\"s_per_step\":$t,\"vs_zero0\":$rt,\"state_bytes\":$s,\"state_vs_zero0\":$rs,\"peak_rss_bytes\":$r}"
done
if [ "$moe" = moe ]; then
  # "optimizer shard (ZeRO-3): X of Y optimizer elements per rank": Y is what rank 0 holds unsharded.
  floor=$(grep -ho "ZeRO-3): [0-9]* of [0-9]*" "$tmp/zero3-1/logs/rank0.log" | head -1 | awk '{ printf "%.3f", $2 / $4 }')
  echo "moe: a perfect shard of rank 0's tensors keeps $floor of them (dense over 4 ranks, its experts over 2)"
  json="$json,\"moe\":true,\"state_floor\":$floor"
fi
echo "$json}"
