#!/usr/bin/env bash
# The training loop against a baseline binary (issue 17: "a PP=2 step is no
# slower than the same step built from the commit before the merge"). The
# same jobs run with BASE (e.g. built from an older commit) and NEW, back to
# back and alternating (B N B N ...), so drift of the shared machine falls
# on both alike. Per layout: the median over runs of each run's mean step
# time (rank 0's step_s, the first 5 steps excluded: start-up and
# calibration). Prints a table and one JSON line.
#   bash bench/loop_compare.sh BASE_BIN NEW_BIN [STEPS] [RUNS]
# Data: $ARCHIPELAGO_BENCH_DATA (a prepared dataset); without it a small
# corpus is generated and prepared in a temporary directory.
set -euo pipefail
base="$(realpath "$1")"
new="$(realpath "$2")"
steps="${3:-60}"
runs="${4:-3}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/bench_lib.sh"
data="$(bench_data "$new" "$tmp")"

layout() {  # name -> islands + strategy
  case "$1" in
    pp2) echo "    - {name: a, count: 2}|{kind: sync, pipeline_stages: 2}" ;;
    dp2) echo "    - {name: a, count: 2}|{kind: sync}" ;;
  esac
}

run() {  # bin layout index label -> mean step_s of rank 0 after step 5
  local islands strategy
  IFS='|' read -r islands strategy <<<"$(layout "$2")"
  local dir="$tmp/$2-$3-$4"
  cat > "$dir.yaml" <<YAML
cluster:
  islands:
$islands
model: {dim: 128, n_layers: 4, n_heads: 4, max_seq_len: 128}
data: {dir: $data, seq_len: 128}
train: {steps: $steps, global_batch: 16, micro_batch: 4, eval_every: 0, rebalance: false}
strategy: $strategy
checkpoint: {every: 0, at_exit: false}
run_dir: $dir
YAML
  bench_train "$1" "$2" "$dir" | awk '{ print $1 }'
}


printf "%-6s %14s %14s %8s\n" layout "base s/step" "new s/step" "new/base"
json="{\"bench\":\"loop_compare\",\"steps\":$steps,\"runs\":$runs"
for l in pp2 dp2; do
  : > "$tmp/b" ; : > "$tmp/n"
  for i in $(seq 1 "$runs"); do
    run "$base" "$l" "$i" base >> "$tmp/b"
    run "$new" "$l" "$i" new >> "$tmp/n"
  done
  b=$(median < "$tmp/b"); n=$(median < "$tmp/n")
  r=$(awk -v b="$b" -v n="$n" 'BEGIN { printf "%.3f", n / b }')
  printf "%-6s %14.4f %14.4f %8s\n" "$l" "$b" "$n" "$r"
  json="$json,\"$l\":{\"base_s\":$b,\"new_s\":$n,\"ratio\":$r,\"base_runs\":[$(paste -sd, "$tmp/b")],\"new_runs\":[$(paste -sd, "$tmp/n")]}"
done
echo "$json}"
