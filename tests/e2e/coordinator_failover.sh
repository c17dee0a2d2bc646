#!/usr/bin/env bash
# kill -9 of the coordinator in the middle of a real training run
# (docs/runtime.md "Control plane failover"), at step 100 of 1000. The launcher starts it again
# on the same port; the workers, which never stop training, reattach and
# the new coordinator rebuilds the membership from them. The run must
# finish every step without reading a checkpoint (none is written before
# the end, and no resume or restart happens), in the same epoch, with the
# loss curve of the same job run without the kill. Prints the measured
# failover figures: how long the control plane was down (kill -9 until the
# membership was rebuilt) and the training time lost (steps during the
# outage against the median step). Then a worker is killed together with the
# coordinator: the new coordinator fails it (it never reattaches), the others
# go on in the next epoch and a replacement joins, still without a checkpoint.
# Args: BINARY SOURCE_DIR
set -uo pipefail
bin="$(readlink -f "$1")"
tmp="$(mktemp -d)"
job_pid=""
cleanup() {
  [ -n "$job_pid" ] && kill -9 "$job_pid" 2>/dev/null
  # Workers and the coordinator run in their own process groups: end them by pid.
  for w in "$tmp"/run*/workers.json; do
    [ -f "$w" ] || continue
    for p in $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(*d["pids"].values(), d.get("coordinator_pid", -1))' "$w" 2>/dev/null); do
      [ "$p" -gt 0 ] 2>/dev/null && kill -9 "$p" 2>/dev/null
    done
  done
  if [ -n "${KEEP_TMP:-}" ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi  # KEEP_TMP=1: to read the logs
}
trap cleanup EXIT
cd "$tmp" || exit 1
export ARCHIPELAGO_LOG_LEVEL=info
fail() { echo "FAIL: $*"; exit 1; }

# ---- standalone: `archipelago coordinator --supervise` starts a killed coordinator again on its port ----
ARCHIPELAGO_SECRET=e2e-secret "$bin" coordinator --supervise --port 0 --port-file sup.port > sup.out 2>&1 &
sup_pid=$!
for _ in $(seq 1 300); do grep -q "supervised, pid" sup.out && break; sleep 0.05; done
child="$(grep -o 'supervised, pid [0-9]*' sup.out | grep -o '[0-9]*$')"
port1="$(cat sup.port 2>/dev/null)"
[ -n "$child" ] && [ -n "$port1" ] || { cat sup.out; kill -9 "$sup_pid"; fail "the supervised coordinator did not start"; }
kill -9 "$child"
for _ in $(seq 1 300); do grep -q "started again as pid" sup.out && break; sleep 0.05; done
grep -q "started again as pid" sup.out || { cat sup.out; kill -9 "$sup_pid"; fail "the supervisor did not restart the coordinator"; }
[ "$(cat sup.port)" = "$port1" ] || { kill -9 "$sup_pid"; fail "restarted on port $(cat sup.port), not $port1"; }
child2="$(grep -o 'started again as pid [0-9]*' sup.out | grep -o '[0-9]*$')"
kill -TERM "$sup_pid"
wait "$sup_pid" || fail "the supervisor did not exit cleanly on SIGTERM"
! kill -0 "$child2" 2>/dev/null || { kill -9 "$child2"; fail "the supervisor left its coordinator running"; }
echo "supervised coordinator: pid $child killed, restarted as pid $child2 on port $port1"

mkdir corpus
for d in $(seq 1 40); do
  for l in $(seq 1 20); do echo "Document $d line $l: the union is strong and the people are free."; done > "corpus/doc$d.txt"
done
"$bin" data prepare --input corpus --out data --tokenizer byte >/dev/null 2>&1 || fail "data prepare"

steps=1000
job() {  # job RUN_DIR
  cat <<YAML
cluster:
  islands:
    - {name: east, count: 2}
    - {name: west, count: 2}
model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}
data: {dir: $tmp/data, seq_len: 32}
train: {steps: $steps, global_batch: 8, lr: 0.003, warmup_steps: 5, eval_every: 0, rebalance: false}
strategy: {kind: sync, failure_timeout: 2s}
checkpoint: {every: 100000}
run_dir: $1
YAML
}
job "$tmp/ref" > ref.yaml
job "$tmp/run" > job.yaml
job "$tmp/run2" > job2.yaml

# The reference: the same job, nothing killed.
timeout 300 "$bin" train ref.yaml > ref.out 2>&1 || { tail -20 ref.out; fail "reference run"; }

timeout 300 "$bin" train job.yaml > run.out 2>&1 &
job_pid=$!
for _ in $(seq 1 1200); do [ -f run/workers.json ] && break; sleep 0.05; done
cpid="$(python3 -c 'import json; print(json.load(open("run/workers.json"))["coordinator_pid"])')"
[ "$cpid" -gt 0 ] || fail "no coordinator pid in workers.json"
# Mid-run: wait for step 100 of the metrics (bounded), then kill -9 the coordinator.
for _ in $(seq 1 6000); do
  grep -q '"step":1[0-9][0-9],' run/metrics.jsonl 2>/dev/null && break
  kill -0 "$job_pid" 2>/dev/null || break
  sleep 0.02
done
grep -q '"step":1[0-9][0-9],' run/metrics.jsonl 2>/dev/null || { tail -20 run.out; fail "the run never reached step 100"; }
kill_at="$(date +%s.%N)"
kill -9 "$cpid" || fail "kill -9 $cpid"
echo "killed the coordinator (pid $cpid) at step $(grep -o '"step":[0-9]*' run/metrics.jsonl | tail -1 | cut -d: -f2)"
back_at=""
for _ in $(seq 1 600); do
  if grep -q "rebuilt from" run/logs/coordinator.log 2>/dev/null; then back_at="$(date +%s.%N)"; break; fi
  sleep 0.05
done
[ -n "$back_at" ] || { tail -20 run/logs/coordinator.log; fail "no coordinator rebuilt the membership within 30 s"; }

wait "$job_pid"
rc=$?
job_pid=""
[ "$rc" -eq 0 ] || { tail -30 run.out; fail "the run exited with $rc after the coordinator was killed"; }

python3 - "$tmp" "$steps" "$kill_at" "$back_at" <<'PY' || exit 1
import glob, json, re, statistics, sys
tmp, steps, kill_at, back_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

def records(run, kind):
    out = []
    for line in open(f"{tmp}/{run}/metrics.jsonl"):
        j = json.loads(line)
        if j.get("kind") == kind:
            out.append(j)
    return out

def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)

run_steps = {j["step"]: j for j in records("run", "step") if j["rank"] == 0}
ref_steps = {j["step"]: j for j in records("ref", "step") if j["rank"] == 0}
if sorted(run_steps) != list(range(1, steps + 1)):
    fail(f"the run recorded steps {min(run_steps, default=0)}..{max(run_steps, default=0)} ({len(run_steps)}), not 1..{steps}")
summary = records("run", "summary")
if not summary or summary[-1]["steps"] != steps:
    fail(f"summary: {summary}")
event_records = records("run", "event")
events = [j["event"] for j in event_records]
if events.count("coordinator_restart") != 1:
    fail(f"expected one coordinator_restart event, got {events}")
for bad in ("restart", "failure", "epoch", "stop", "replace"):
    if bad in events:
        fail(f"event '{bad}' in a run whose coordinator alone was killed: {events}")
if any(j.get("epoch", 0) != 0 for j in run_steps.values()):
    fail("the membership epoch changed: the workers were disturbed")
logs = "".join(open(p).read() for p in glob.glob(f"{tmp}/run/logs/rank*.log") + [f"{tmp}/run.out"])
for never in ("resumed from", "restarting the job", "joined at step"):
    if never in logs:
        fail(f"the logs say '{never}': state came from a checkpoint or a peer, not from the running workers")
for r in range(4):
    text = open(f"{tmp}/run/logs/rank{r}.log").read()
    if "coordinator unreachable" not in text or "coordinator reachable again" not in text:
        fail(f"rank {r} did not log losing and finding the coordinator")
after = [s for s, j in run_steps.items() if j["time"] > back_at]
if not after:
    fail("no step completed after the coordinator came back")
# Loss curve: the kill must not change a single step.
worst = max(abs(run_steps[s]["loss"] - ref_steps[s]["loss"]) for s in run_steps)
if worst > 1e-5:
    fail(f"loss curve differs from the reference by {worst:g}")
# Failover figures (a benchmark, printed; the bound is generous).
down = back_at - kill_at
restart = next(j["detail"] for j in event_records if j["event"] == "coordinator_restart")
restart_s = float(re.search(r"after ([0-9.]+) s", restart).group(1))
med = statistics.median(j["step_s"] for j in run_steps.values())
window = [j for j in run_steps.values() if j["time"] >= kill_at and j["time"] - j["step_s"] <= back_at]
# Time the steps of the outage took beyond the run's median pace (signed: noise either way).
lost = sum(j["step_s"] for j in window) - len(window) * med
print(f"failover: control plane down {down:.2f} s (kill -9 until the membership was rebuilt, 50 ms polling; "
      f"of which starting the new coordinator process {restart_s:.2f} s); training time lost {lost:+.3f} s over "
      f"{len(window)} step(s) in the outage (median step {med*1000:.1f} ms); {len(after)} steps after it; "
      f"loss curve max |diff| vs reference {worst:g}")
if down >= 10 or lost >= 10:
    fail(f"failover took too long: down {down:.2f} s, lost {lost:.2f} s")
PY

# ---- a worker dies while there is no coordinator: the next one fails it, the job goes on elastically ----
timeout 300 "$bin" train job2.yaml > run2.out 2>&1 &
job_pid=$!
for _ in $(seq 1 1200); do [ -f run2/workers.json ] && break; sleep 0.05; done
read -r cpid w3 < <(python3 -c 'import json; d=json.load(open("run2/workers.json")); print(d["coordinator_pid"], d["pids"]["3"])')
for _ in $(seq 1 6000); do
  grep -q '"step":1[0-9][0-9],' run2/metrics.jsonl 2>/dev/null && break
  kill -0 "$job_pid" 2>/dev/null || break
  sleep 0.02
done
kill -9 "$cpid" "$w3" || fail "kill -9 of the coordinator and rank 3"
wait "$job_pid"
rc=$?
job_pid=""
[ "$rc" -eq 0 ] || { tail -30 run2.out; fail "the run exited with $rc after the coordinator and rank 3 were killed"; }
grep -q "lost while the coordinator was away: \[3\]" run2/logs/coordinator.log ||
  { tail -10 run2/logs/coordinator.log; fail "the restarted coordinator did not fail rank 3"; }
python3 - "$tmp" "$steps" <<'PY' || exit 1
import json, sys
tmp, steps = sys.argv[1], int(sys.argv[2])
def records(run, kind):
    return [j for j in map(json.loads, open(f"{tmp}/{run}/metrics.jsonl")) if j.get("kind") == kind]
def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)
events = [j["event"] for j in records("run2", "event")]
for want in ("coordinator_restart", "failure", "epoch", "join"):
    if want not in events:
        fail(f"no '{want}' event: {events}")
if "restart" in events:
    fail("the job restarted from a checkpoint")
out = open(f"{tmp}/run2.out").read()
if "resumed from" in out or "restarting the job" in out:
    fail("a checkpoint was read")
final = records("run2", "summary")[-1]
ref = records("ref", "summary")[-1]
if final["steps"] != steps:
    fail(f"{final['steps']} steps, not {steps}")
rel = abs(final["final_loss"] - ref["final_loss"]) / ref["final_loss"]
print(f"worker lost while no coordinator ran: finished {steps} steps through epochs {sorted({j['epoch'] for j in records('run2', 'step')})}; "
      f"final loss {final['final_loss']:.5f} vs reference {ref['final_loss']:.5f} (rel diff {rel:.2e})")
if rel > 1e-2:
    fail("final loss differs from the reference")
print("PASS: coordinator_failover")
PY
