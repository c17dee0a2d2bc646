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

# Mean of a numeric field over rank R's step records after the first two
# (warm-up) steps of a run's metrics.jsonl.
field_mean() {  # file rank field
  grep '"kind":"step"' "$1" | grep "\"rank\":$2," | awk -v f="$3" '
    { s = $0; if (!match(s, "\"step\":[0-9]+")) next; st = substr(s, RSTART + 7, RLENGTH - 7) + 0; if (st <= 2) next
      if (!match(s, "\"" f "\":[-0-9.e+]+")) next; v = substr(s, RSTART + length(f) + 3, RLENGTH - length(f) - 3) + 0; sum += v; n++ }
    END { printf "%.4f", n ? sum / n : 0 }'
}

printf "EMULATED slowdowns/straits; %s steps per run, %s runs per configuration; %s cores\n" "$steps" "$repeat" "$(nproc)"
printf "load: 1-minute load average before each run (other runnable processes; ~0 on a quiet host)\n"
printf "rank 0 per step: compute = forward+backward wall (pred = predicted incl. waiting for cores), cpu/wall = its core share\n"
printf "%-10s %4s %5s %11s %11s %8s | %8s %8s %8s %8s %8s\n" "config" "run" "load" "predicted s" "measured s" "error" \
  "pred cmp" "compute" "cpu/wall" "pred comm" "comm"
for name in demo one two-sync diloco moe-2; do
  errs=""; preds=""; meas=""; loads=""
  for r in $(seq 1 "$repeat"); do
    rm -rf "$tmp/run-$name"
    load=$(cut -d' ' -f1 /proc/loadavg)
    "$bin" train "$tmp/$name.yaml" >/dev/null 2>&1 || { echo "$name: training failed" >&2; cat "$tmp/run-$name/logs/rank0.log" >&2 || true; exit 1; }
    line=$(grep -h "step time: predicted" "$tmp/run-$name"/logs/rank0.log | tail -1)
    p=$(sed -n 's/.*predicted \([0-9.]*\)s.*/\1/p' <<<"$line")
    m=$(sed -n 's/.*measured \([0-9.]*\)s.*/\1/p' <<<"$line")
    e=$(awk -v p="$p" -v m="$m" 'BEGIN { printf "%.1f", 100 * (p - m) / m }')
    mf="$tmp/run-$name/metrics.jsonl"
    pred=$(grep '"kind":"prediction"' "$mf" | head -1)
    pc=$(sed -n 's/.*"compute_s":\([-0-9.e+]*\).*/\1/p' <<<"$pred")
    pm=$(sed -n 's/.*"comm_s":\([-0-9.e+]*\).*/\1/p' <<<"$pred")
    c=$(field_mean "$mf" 0 compute_s); cc=$(field_mean "$mf" 0 compute_cpu_s); cm=$(field_mean "$mf" 0 comm_s)
    printf "%-10s %4d %5.1f %11.3f %11.3f %+7.1f%% | %8.3f %8.3f %8.2f %8.3f %8.3f\n" "$name" "$r" "$load" "$p" "$m" "$e" \
      "$pc" "$c" "$(awk -v a="$cc" -v b="$c" 'BEGIN { print (b > 0 ? a / b : 0) }')" "$pm" "$cm"
    grep -h "planner prediction" "$tmp/run-$name"/logs/rank0.log | sed 's/.*planner prediction: /           /' | head -1
    preds="$preds${preds:+,}$p"; meas="$meas${meas:+,}$m"; errs="$errs${errs:+,}$e"; loads="$loads${loads:+,}$load"
  done
  awk -v n="$name" -v p="$preds" -v m="$meas" -v e="$errs" -v l="$loads" 'BEGIN {
    k = split(e, ev, ","); worst = 0; for (i = 1; i <= k; i++) { a = ev[i] < 0 ? -ev[i] : ev[i]; if (a > worst) worst = a }
    printf "{\"bench\":\"predict_local\",\"emulated\":true,\"config\":\"%s\",\"load_avg\":[%s],\"predicted_s\":[%s],\"measured_s\":[%s],\"error_pct\":[%s],\"worst_abs_error_pct\":%.1f,\"target_pct\":20,\"pass\":%s}\n", n, l, p, m, e, worst, worst <= 20 ? "true" : "false"
  }' >> "$tmp/json"
done
cat "$tmp/json"
