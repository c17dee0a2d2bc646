#!/usr/bin/env bash
# Planner's predicted step time vs the measured one for our own local runs
# (issue: planner and simulator, "predicted vs measured within +-20% after
# calibration"). Every run calibrates on this machine (rank 0 times the
# job's model parts and optimizer, see docs/planner.md), predicts, trains a
# few steps and prints "step time: predicted X, measured Y"; this script
# runs several configurations REPEAT times each and prints both numbers and
# the error per run, then one JSON line per configuration.
# Device slowdowns and strait bandwidth/latency are EMULATED on this host.
#   bash bench/predict_local.sh [BINARY] [STEPS] [REPEAT]
set -euo pipefail
bin="${1:-build/src/cli/archipelago}"
steps="${2:-30}"
repeat="${3:-2}"
data="${ARCHIPELAGO_BENCH_DATA:-data/prepared/sotu-byte}"
[ -f "$data/manifest.json" ] || "$bin" data prepare --input data/corpus/sotu --out "$data" >/dev/null
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
data_abs="$(realpath "$data")"

dense='model: {dim: 128, n_layers: 4, n_heads: 4, max_seq_len: 128}'
moe='model: {dim: 128, n_layers: 4, n_heads: 4, max_seq_len: 128, moe: {num_experts: 4, top_k: 2}}'
demo_islands='  islands:
    - {name: fast, count: 2}
    - {name: slow, count: 1, slowdown: 2}
  straits: [{a: fast, b: slow, bandwidth: 1Gbit/s, latency: 5ms}]'

job() {  # name cluster-body model strategy global-batch
  cat > "$tmp/$1.yaml" <<YAML
cluster:
$2
$3
data: {dir: $data_abs, seq_len: 128}
train: {steps: $steps, global_batch: $5, eval_every: 0}
strategy: $4
checkpoint: {every: 0, at_exit: false}
run_dir: $tmp/run-$1
YAML
}
job demo "$demo_islands" "$dense" "{kind: sync}" 24
job one "  islands: [{name: a, count: 1}]" "$dense" "{kind: sync}" 8
job two-sync "  islands: [{name: a, count: 2}]" "$dense" "{kind: sync}" 16
job diloco "$demo_islands" "$dense" "{kind: diloco, inner_steps: 10, codec: int8}" 24
job moe-2 "  islands: [{name: a, count: 2}]" "$moe" "{kind: sync}" 16

printf "EMULATED slowdowns/straits; %s steps per run, %s runs per configuration; %s cores\n" "$steps" "$repeat" "$(nproc)"
printf "%-10s %4s %12s %12s %8s\n" "config" "run" "predicted s" "measured s" "error"
for name in demo one two-sync diloco moe-2; do
  errs=""; preds=""; meas=""
  for r in $(seq 1 "$repeat"); do
    rm -rf "$tmp/run-$name"
    "$bin" train "$tmp/$name.yaml" >/dev/null 2>&1 || { echo "$name: training failed" >&2; cat "$tmp/run-$name/logs/rank0.log" >&2 || true; exit 1; }
    line=$(grep -h "step time: predicted" "$tmp/run-$name"/logs/rank0.log | tail -1)
    p=$(sed -n 's/.*predicted \([0-9.]*\)s.*/\1/p' <<<"$line")
    m=$(sed -n 's/.*measured \([0-9.]*\)s.*/\1/p' <<<"$line")
    e=$(awk -v p="$p" -v m="$m" 'BEGIN { printf "%.1f", 100 * (p - m) / m }')
    printf "%-10s %4d %12.3f %12.3f %+7.1f%%\n" "$name" "$r" "$p" "$m" "$e"
    preds="$preds${preds:+,}$p"; meas="$meas${meas:+,}$m"; errs="$errs${errs:+,}$e"
  done
  awk -v n="$name" -v p="$preds" -v m="$meas" -v e="$errs" 'BEGIN {
    k = split(e, ev, ","); worst = 0; for (i = 1; i <= k; i++) { a = ev[i] < 0 ? -ev[i] : ev[i]; if (a > worst) worst = a }
    printf "{\"bench\":\"predict_local\",\"emulated\":true,\"config\":\"%s\",\"predicted_s\":[%s],\"measured_s\":[%s],\"error_pct\":[%s],\"worst_abs_error_pct\":%.1f,\"target_pct\":20,\"pass\":%s}\n", n, p, m, e, worst, worst <= 20 ? "true" : "false"
  }' >> "$tmp/json"
done
cat "$tmp/json"
