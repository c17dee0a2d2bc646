# shellcheck shell=bash
# A tiny training job shared by the launch-engine tests (sourced): a small
# corpus, its prepared data, the single-process reference run and a 4-worker
# job over two islands whose workers a launcher (srun, mpirun) starts.
#
#   source tests/e2e/lib/tiny_job.sh
#   tiny_corpus BIN DIR        # DIR/corpus and DIR/data (byte tokenizer); also used by tests/netns/job.sh
#   tiny_job_prepare BIN DIR   # DIR/data, DIR/ref (trained), DIR/job.yaml (4 workers, run_dir DIR/run)
#   tiny_job_check DIR [RUN]   # DIR/RUN's loss curve (default DIR/run) matches DIR/ref's
#   launch_skip WHY            # report the test as skipped (CTest SKIP_RETURN_CODE 77)
#   launch_fail WHY [LOG...]   # fail the test, with the tail of each log
#   wait_for_coordinator LOG   # prints HOST:PORT once `archipelago coordinator` (output in LOG) listens

TINY_JOB_STEPS=10

launch_skip() { echo "SKIPPED: $*"; exit 77; }

launch_fail() {
  local f
  echo "FAIL: $1"; shift
  for f in "$@"; do echo "--- $f"; tail -n 20 "$f" || true; done
  exit 1
}

wait_for_coordinator() {
  local addr=""
  for _ in $(seq 1 100); do
    addr="$(sed -n 's/^coordinator listening on //p' "$1")"
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.1
  done
  launch_fail "the coordinator did not start" "$1" >&2
}

tiny_job_yaml() {  # tiny_job_yaml DIR RUN ISLANDS
  cat <<YAML
cluster:
  islands:
$3
  straits: [{a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}]
model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}
data: {dir: $1/data, seq_len: 32}
train: {steps: $TINY_JOB_STEPS, global_batch: 8, lr: 0.003, warmup_steps: 3, eval_every: 0, rebalance: false}
checkpoint: {every: 0}
run_dir: $1/$2
YAML
}

tiny_corpus() {
  local bin="$1" dir="$2" d l
  mkdir -p "$dir/corpus"
  for d in $(seq 1 30); do
    for l in $(seq 1 20); do echo "Document $d line $l: the union is strong and the people are free."; done > "$dir/corpus/doc$d.txt"
  done
  "$bin" data prepare --input "$dir/corpus" --out "$dir/data" --tokenizer byte >"$dir/prepare.log" 2>&1
}

tiny_job_prepare() {
  local bin="$1" dir="$2"
  "$bin" worker --help >/dev/null 2>&1 || launch_skip "'$bin' has no worker verb (a build without libtorch)"
  tiny_corpus "$bin" "$dir"
  tiny_job_yaml "$dir" ref "    - {name: a, count: 1}" | sed '/straits/d' > "$dir/ref.yaml"
  tiny_job_yaml "$dir" run "    - {name: a, count: 2}
    - {name: b, count: 2}" > "$dir/job.yaml"
  "$bin" train "$dir/ref.yaml" >"$dir/ref.log" 2>&1 || { echo "FAIL: reference run"; tail "$dir/ref.log"; return 1; }
}

tiny_job_check() {
  python3 "$(dirname "${BASH_SOURCE[0]}")/same_curve.py" "$1/ref/metrics.jsonl" "$1/${2:-run}/metrics.jsonl" "$TINY_JOB_STEPS"
}
