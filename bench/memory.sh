#!/usr/bin/env bash
# The planner's memory model against the measurement (issue 20's target:
# predicted vs measured peak memory per worker within +-15%). The same
# model (dim 256, 8 layers, 4 heads, seq 128, global batch 8) runs under
# several layouts for a few steps; every worker writes its prediction (a
# `memory` record: plan/worker_memory.h) and measures, in each step
# record, the most bytes of CPU tensors live at once (`tensor_peak_bytes`,
# libtorch's CPU allocator counted: model/tensor_memory.h). Per layout and
# worker: predicted, measured (its largest step peak), the error; the
# layout's worst error; then one JSON line.
#   bash bench/memory.sh [BIN] [STEPS]
# Data: $ARCHIPELAGO_BENCH_DATA (a prepared dataset); without it a small
# corpus is generated and prepared in a temporary directory.
set -euo pipefail
bin="$(realpath "${1:-build/src/cli/archipelago}")"
steps="${2:-4}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
source "$(dirname "$0")/bench_lib.sh"
data="$(bench_data "$bin" "$tmp")"

# name workers "train extras" "strategy extras" ["model extras"]
moe="moe: {num_experts: 8, top_k: 2, shared_expert: true, expert_hidden: 384}"
layouts=(
  "single 1 '' ''"
  "dp2 2 '' ''"
  "dp2_micro2 2 'micro_batch: 2' ''"
  "zero2_n2 2 'zero: 2' ''"
  "zero3_n4 4 'zero: 3' ''"
  "tp2 2 '' 'tensor_parallel: 2'"
  "tp2_sp 2 '' 'tensor_parallel: 2, sequence_parallel: true'"
  "pp2_mb4 2 'micro_batch: 2' 'pipeline_stages: 2'"
  "pp2_mb4_recompute 2 'micro_batch: 2, recompute: true' 'pipeline_stages: 2'"
  "zero3_tp2_dp2 4 'zero: 3' 'tensor_parallel: 2'"
  "zero3_pp2_dp2 4 'micro_batch: 2, zero: 3' 'pipeline_stages: 2'"
  "moe_single 1 '' '' '$moe'"
  "moe_ep2 2 '' 'expert_parallel: 2' '$moe'"
  "moe_ep2_uneven 2 '' 'expert_parallel: 2, expert_counts: [6, 2]' '$moe'"
  "moe_zero3_n4 4 'zero: 3' '' '$moe'"
  "moe_zero2_ep2_dp2 4 'zero: 2' 'expert_parallel: 2' '$moe'"
  "moe_zero3_ep2_dp2 4 'zero: 3' 'expert_parallel: 2' '$moe'"
  "moe_tp2 2 '' 'tensor_parallel: 2' '$moe'"
  "moe_tp2_sp 2 '' 'tensor_parallel: 2, sequence_parallel: true' '$moe'"
  "moe_tp2_sp_ep2 4 '' 'tensor_parallel: 2, sequence_parallel: true, expert_parallel: 2' '$moe'"
)
printf "%-18s %4s %14s %14s %8s\n" layout rank "predicted MB" "measured MB" error
json="{\"bench\":\"memory\",\"steps\":$steps,\"layouts\":{"
first=1 worst_all=0
for spec in "${layouts[@]}"; do
  eval "set -- $spec"
  name="$1" workers="$2" train_x="${3:+, $3}" strat_x="${4:+, $4}" model_x="${5:+, $5}"
  dir="$tmp/$name"
  cat > "$dir.yaml" <<YAML
cluster:
  islands:
    - {name: a, count: $workers}
model: {dim: 256, n_layers: 8, n_heads: 4, max_seq_len: 128$model_x}
data: {dir: $data, seq_len: 128}
train: {steps: $steps, global_batch: 8, eval_every: 0, rebalance: false, threads_per_worker: 1, log_every: 1$train_x}
strategy: {kind: sync$strat_x, failure_timeout: 30s}
checkpoint: {every: 0, at_exit: false}
run_dir: $dir
YAML
  "$bin" train "$dir.yaml" >"$dir.log" 2>&1 || { echo "run $name failed: $(tail -3 "$dir.log")" >&2; exit 1; }
  out=$(python3 - "$dir/metrics.jsonl" "$name" <<'PY'
import json, sys
pred, peak = {}, {}
for line in open(sys.argv[1]):
    j = json.loads(line)
    if j.get("kind") == "memory":
        pred[j["rank"]] = j["predicted_bytes"]
    elif j.get("kind") == "step" and j.get("tensor_peak_bytes") is not None:
        peak[j["rank"]] = max(peak.get(j["rank"], 0), j["tensor_peak_bytes"])
if not pred or set(pred) != set(peak):
    sys.exit("no prediction or no measurement for some rank: predicted %s, measured %s" % (sorted(pred), sorted(peak)))
rows, worst = [], 0.0
for r in sorted(pred):
    err = (pred[r] - peak[r]) / peak[r]
    worst = max(worst, abs(err))
    rows.append("%-18s %4d %14.1f %14.1f %+7.1f%%" % (sys.argv[2], r, pred[r] / 1e6, peak[r] / 1e6, 100 * err))
print("\n".join(rows))
print("JSON", json.dumps({"worst_abs_error": round(worst, 4),
                          "ranks": {str(r): {"predicted_bytes": pred[r], "measured_bytes": peak[r]} for r in sorted(pred)}}))
PY
)
  echo "$out" | grep -v '^JSON'
  part=$(echo "$out" | sed -n 's/^JSON //p')
  json="$json$([ $first = 1 ] || echo ,)\"$name\":$part"; first=0
  w=$(echo "$part" | python3 -c 'import json,sys; print(json.load(sys.stdin)["worst_abs_error"])')
  worst_all=$(awk -v a="$worst_all" -v b="$w" 'BEGIN { print (b > a) ? b : a }')
done
printf "worst |error| over every layout and worker: %.1f%% (target 15%%)\n" "$(awk -v w="$worst_all" 'BEGIN { print 100 * w }')"
echo "$json},\"worst_abs_error\":$worst_all}"
