# A small training job on the multi-host test bed (sourced by tests after
# tests/netns/hosts.sh): a prepared corpus, job files, a coordinator on one
# "host", and the checks the multi-host tests share. Every function works in
# the current directory (the test's scratch directory). Tests that must not
# race the job (a partition, a lost host) give it more steps than it will
# ever run and stop it when they have seen what they wait for: SIGTERM to one
# worker, and every worker stops after the same step (the control
# allreduce); the reference run is stopped the same way, past that step.
#
#   netns_job_begin N                    # N hosts and a scratch directory (the current one), both gone on exit
#   netns_job_start BIN NAME STEPS [ARGS]  # NAME.yaml (island a: ranks 0-1 on host 2, b: rank 2 on host 3),
#                                        # the coordinator on host 1, the 3 workers (pids in NETNS_PIDS;
#                                        # ARGS go to rank 2)
#   netns_job_data BIN                   # ./data: a byte-tokenized corpus (tests/e2e/lib/tiny_job.sh)
#   netns_job_yaml NAME STEPS ISLANDS [STRATEGY]  # job YAML on stdout
#                                        # (NETNS_JOB_BATCH, NETNS_JOB_STRAITS override;
#                                        # NETNS_JOB_SECURITY: the security section)
#   netns_job_reference BIN NAME STEPS [UNTIL]    # single-process run ./NAME (stopped after UNTIL)
#   netns_job_coordinator BIN HOST       # sets NETNS_COORD=ADDR:PORT (NETNS_COORD_ARGS: more flags)
#   netns_job_worker BIN HOST RANK JOB [ARGS...]  # background; pid in NETNS_PID
#   netns_job_last_step RUN              # the newest step rank 0 logged
#   netns_job_wait_step RUN STEP SECONDS # rank 0 logged STEP (event wait)
#   netns_job_wait_event RUN KIND SECONDS [COUNT]
#   netns_job_check_curve REF RUN STEPS RTOL      # steps 1..STEPS
#   netns_job_check_replicas RUN STEP RANKS
#   netns_job_finish_rejoined BIN STEPS PID...  # 20 steps after a join: stop, then the checks
#                                        # the membership tests share (no checkpoint read,
#                                        # replicas, curve)

NETNS_JOB_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$NETNS_JOB_SRC/tests/e2e/lib/tiny_job.sh"

netns_job_begin() {
  NETNS_JOB_TMP="$(mktemp -d)"
  netns_up "$1"
  trap 'netns_down; rm -rf "$NETNS_JOB_TMP"' EXIT
  cd "$NETNS_JOB_TMP"
}

netns_job_start() {
  local bin="$1" name="$2" steps="$3"
  shift 3
  netns_job_yaml "$name" "$steps" "    - {name: a, count: 2, host: $(netns_addr 2)}
    - {name: b, count: 1, host: $(netns_addr 3)}" > "$name.yaml"
  # NETNS_JOB_SECRET_FROM_CREDENTIALS: every process takes the secret from its credentials directory instead.
  if [ -n "${NETNS_JOB_SECRET_FROM_CREDENTIALS:-}" ]; then unset ARCHIPELAGO_SECRET; else export ARCHIPELAGO_SECRET="netns-$$"; fi
  netns_job_coordinator "$bin" 1
  NETNS_PIDS=()
  netns_job_worker "$bin" 2 0 "$name.yaml"; NETNS_PIDS+=("$NETNS_PID")
  netns_job_worker "$bin" 2 1 "$name.yaml"; NETNS_PIDS+=("$NETNS_PID")
  netns_job_worker "$bin" 3 2 "$name.yaml" "$@"; NETNS_PIDS+=("$NETNS_PID")
}

netns_job_data() {
  tiny_corpus "$1" "$PWD"
}

# A low learning rate: the tests that change membership run about a thousand
# steps, and at 3e-3 the 1e-7 differences of re-split gradient sums grow to
# 1e-2 in the loss by then (at 5e-4 they stay below 1e-6).
netns_job_yaml() {
  local name="$1" steps="$2" islands="$3" strategy="${4:-{kind: sync\}}"
  local straits="[{a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}]"
  local security="${NETNS_JOB_SECURITY:-{tls: false\}}"
  [ -z "${NETNS_JOB_STRAITS:-}" ] || straits="$NETNS_JOB_STRAITS"
  cat <<YAML
cluster:
  islands:
$islands
  straits: $straits
model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}
data: {dir: $PWD/data, seq_len: 32}
train: {steps: $steps, global_batch: ${NETNS_JOB_BATCH:-12}, lr: 0.0005, warmup_steps: 3, eval_every: 0, rebalance: false}
strategy: $strategy
checkpoint: {every: 0}
security: $security
run_dir: $PWD/$name
YAML
}

netns_job_reference() {
  local bin="$1" name="$2" steps="$3" until="${4:-}"
  netns_job_yaml "$name" "$steps" "    - {name: a, count: 1}" | sed '/straits/d' > "$name.yaml"
  "$bin" train "$name.yaml" >"$name.log" 2>&1 &
  local pid=$!
  if [ -n "$until" ]; then
    netns_job_wait_step "$name" "$until" 300 || { kill -9 "$pid"; tail "$name.log"; return 1; }
    kill -INT "$pid"
  fi
  wait "$pid" || [ -n "$until" ] || { echo "FAIL: reference run"; tail "$name.log"; return 1; }
}

netns_job_coordinator() {
  local bin="$1" host="$2"
  # shellcheck disable=SC2086
  netns_exec "$host" "$bin" coordinator --host "$(netns_addr "$host")" --port 29500 ${NETNS_COORD_ARGS:-} >coord.log 2>&1 &
  local _
  for _ in $(seq 1 100); do grep -q "listening" coord.log && break; sleep 0.1; done
  grep -q "listening" coord.log || { echo "FAIL: the coordinator did not start"; cat coord.log; return 1; }
  NETNS_COORD="$(netns_addr "$host"):29500"
}

netns_job_worker() {
  local bin="$1" host="$2" rank="$3" job="$4"
  shift 4
  # Not through the netns_exec function: $! must be the worker's own pid
  # (ip execs timeout, which passes SIGTERM on), not a subshell's.
  ip netns exec "$NETNS_PREFIX$host" timeout 300 "$bin" worker --job "$job" --coordinator "$NETNS_COORD" \
    --rank "$rank" "$@" >>"w$rank.log" 2>&1 &
  NETNS_PID=$!
}

# The metrics lines of RUN as JSON, filtered by a Python expression on `j`.
_netns_job_count() {
  python3 - "$1/metrics.jsonl" "$2" <<'PY' 2>/dev/null || echo 0
import json, sys
n = 0
try:
    for line in open(sys.argv[1]):
        try:
            j = json.loads(line)
        except ValueError:
            continue
        if eval(sys.argv[2]):
            n += 1
except FileNotFoundError:
    pass
print(n)
PY
}

netns_job_last_step() {
  python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
steps = [0]
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    if j.get("kind") == "step" and j.get("rank", 0) == 0:
        steps.append(j["step"])
print(max(steps))
PY
}

netns_job_wait_step() {
  local run="$1" step="$2" seconds="$3" i
  for i in $(seq 1 $((seconds * 10))); do
    [ "$(_netns_job_count "$run" "j.get('kind') == 'step' and j.get('step', 0) >= $step")" -gt 0 ] && return 0
    sleep 0.1
  done
  echo "FAIL: step $step not reached within ${seconds}s"; return 1
}

netns_job_wait_event() {
  local run="$1" kind="$2" seconds="$3" count="${4:-1}" i
  for i in $(seq 1 $((seconds * 10))); do
    [ "$(_netns_job_count "$run" "j.get('kind') == 'event' and j.get('event') == '$kind'")" -ge "$count" ] && return 0
    sleep 0.1
  done
  echo "FAIL: no '$kind' event within ${seconds}s"; return 1
}

# Steps 1..STEPS: rank 0's loss against the single-process run.
netns_job_check_curve() {
  python3 "$NETNS_JOB_SRC/tests/e2e/lib/same_curve.py" "$1/metrics.jsonl" "$2/metrics.jsonl" "$3" "$4"
}

# The replica digests written at STEP (the end): one per rank, all equal.
netns_job_check_replicas() {
  python3 - "$1/metrics.jsonl" "$2" "$3" <<'PY'
import json, sys
step, ranks = int(sys.argv[2]), int(sys.argv[3])
digests = {}
for line in open(sys.argv[1]):
    j = json.loads(line)
    if j.get("kind") == "replica" and j.get("step") == step:
        digests[j["rank"]] = j["digest"]
print("replica digests at step %d: %d ranks, %d distinct" % (step, len(digests), len(set(digests.values()))))
sys.exit(0 if len(digests) == ranks and len(set(digests.values())) == 1 else 1)
PY
}

# After a membership change and a join in job ./run (workers PID..., rank
# order): 20 more steps with every rank, stop (SIGTERM to the first: every
# worker stops after the same step), then every worker must exit 0, none may
# have read a checkpoint, the replicas must be bit-identical and the curve
# the single-process one, the reference run of STEPS stopped past the same
# step (1e-4: shares re-split over the alive ranks reorder gradient sums by
# about 1e-7).
netns_job_finish_rejoined() {
  local bin="$1" steps="$2" i
  shift 2
  local pids=("$@")
  netns_job_wait_step run $(( $(netns_job_last_step run) + 20 )) 120
  kill -TERM "${pids[0]}"
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "FAIL: worker $i exited with $?"; tail -30 "w$i.log"; exit 1; }
  done
  if grep -qi "resum\|from checkpoint" w*.log; then
    echo "FAIL: the job read a checkpoint"; grep -i "resum\|from checkpoint" w*.log; exit 1
  fi
  local last
  last=$(netns_job_last_step run)
  netns_job_check_replicas run "$last" "${#pids[@]}" || exit 1
  netns_job_reference "$bin" ref "$steps" "$last" || exit 1
  netns_job_check_curve ref run "$last" 1e-4 || exit 1
}
