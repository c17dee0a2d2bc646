# Sourced by the shell benches.
#   bench_data BIN TMP      the prepared dataset to use: $ARCHIPELAGO_BENCH_DATA,
#                           or a small generated corpus prepared with BIN under TMP
#   bench_train BIN NAME DIR  trains DIR.yaml (log in DIR.log, exits on failure) and
#                           prints rank 0's mean step_s after step 5, then, from each
#                           worker's last step record, the largest state_bytes and
#                           peak_rss_bytes
#   median                  the median of the numbers on stdin, one per line
bench_data() {
  local bin="$1" tmp="$2" data="${ARCHIPELAGO_BENCH_DATA:-}"
  if [ -z "$data" ]; then
    mkdir -p "$tmp/corpus"
    for d in $(seq 0 79); do
      for l in $(seq 0 59); do echo "Document $d line $l: the union is strong and the people are free, patient and hopeful."; done > "$tmp/corpus/doc$d.txt"
    done
    "$bin" data prepare --input "$tmp/corpus" --out "$tmp/data" --tokenizer byte >/dev/null 2>&1
    data="$tmp/data"
  fi
  realpath "$data"
}

bench_train() {
  local bin="$1" name="$2" dir="$3"
  "$bin" train "$dir.yaml" >"$dir.log" 2>&1 || { echo "run $name failed: $(tail -3 "$dir.log")" >&2; exit 1; }
  python3 - "$dir/metrics.jsonl" <<'PY'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"step"' in l.replace(' ', '')]
t = [j["step_s"] for j in s if j.get("rank") == 0 and j["step"] > 5]
last = {}
for j in s: last[j["rank"]] = j  # after warm-up (rank 0's first steps include its calibration)
print(sum(t) / len(t), max(j.get("state_bytes", 0) for j in last.values()),
      max(j.get("peak_rss_bytes", 0) for j in last.values()))
PY
}

median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
