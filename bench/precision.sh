#!/usr/bin/env bash
# Compute dtypes against fp32 on the same tokens (issue 19: "bf16 run's
# validation loss within 1% of fp32; FP8 within 1% of bf16"). One worker
# trains the same model from the same initial weights on the same batches
# in each dtype, then evaluates on the same validation batches; the fp32
# run is the baseline measured in the same run. fp8 on a CPU is the exact
# quantise-dequantise emulation (labelled EMULATED). Prints a table and one
# JSON line.
#   bash bench/precision.sh [BINARY] [STEPS] [DTYPES]   (DTYPES: "fp32 bf16 fp8")
set -euo pipefail
bin="$(realpath "${1:-build/src/cli/archipelago}")"
steps="${2:-150}"
dtypes="${3:-fp32 bf16 fp8}"
data="${ARCHIPELAGO_BENCH_DATA:-data/prepared/sotu-byte}"
[ -f "$data/manifest.json" ] || "$bin" data prepare --input data/corpus/sotu --out "$data" >/dev/null
data="$(realpath "$data")"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

run() {  # dtype -> "val_loss seconds"
  cat > "$tmp/$1.yaml" <<YAML
cluster:
  islands:
    - {name: a, count: 1}
model: {dim: 128, n_layers: 4, n_heads: 4, max_seq_len: 128, dtype: $1}
data: {dir: $data, seq_len: 128}
train: {steps: $steps, global_batch: 8, warmup_steps: 10, eval_every: $steps, eval_batches: 8, rebalance: false, check_ops: false}
checkpoint: {every: 0, at_exit: false}
run_dir: $tmp/$1
YAML
  local t0=$SECONDS
  if ! "$bin" train "$tmp/$1.yaml" > "$tmp/$1.out" 2>&1; then
    echo "precision: the $1 run failed:" >&2; tail -5 "$tmp/$1.out" >&2; echo "nan $((SECONDS - t0))"; return
  fi
  python3 - "$tmp/$1/metrics.jsonl" "$((SECONDS - t0))" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"eval"' in l.replace(' ', '')]
print(ev[-1]["val_loss"] if ev else "nan", sys.argv[2])
PY
}

declare -A loss secs
for d in $dtypes; do read -r loss[$d] secs[$d] < <(run "$d"); done
python3 - "$steps" $(for d in $dtypes; do echo "$d=${loss[$d]}=${secs[$d]}"; done) <<'PY'
import json, math, sys
steps = int(sys.argv[1])
rows = [a.split("=") for a in sys.argv[2:]]
val = {d: float(v) for d, v, _ in rows}
base = {"bf16": "fp32", "fp16": "fp32", "fp8": "bf16"}
print(f"compute dtypes, {steps} steps, same tokens (fp8 on CPU: EMULATED quantise-dequantise)")
print(f"{'dtype':<6} {'val loss':>9} {'vs':>5} {'gap':>8} {'target':>7} {'seconds':>8}")
out = []
for d, v, s in rows:
    b = base.get(d)
    gap = (val[d] - val[b]) / val[b] if b in val and not math.isnan(val[d]) else None
    ok = gap is not None and abs(gap) <= 0.01
    print(f"{d:<6} {val[d]:>9.4f} {b or '-':>5} {('%+.2f%%' % (100 * gap)) if gap is not None else '-':>8} "
          f"{('ok' if ok else 'MISSED') if gap is not None else '-':>7} {float(s):>8.0f}")
    out.append({"dtype": d, "val_loss": val[d], "baseline": b, "gap": gap, "seconds": float(s),
                "emulated": d == "fp8"})
print(json.dumps({"bench": "precision", "steps": steps, "rows": out}))
PY
