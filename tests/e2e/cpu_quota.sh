#!/usr/bin/env bash
# Real heterogeneity on one machine (docs/devices.md "Real heterogeneity"):
# a 2-worker job whose island `capped` has cpu_quota 0.5 trains; while it
# runs, the launcher's cgroup for that worker exists with a quota of 0.5 x
# its period (cgroup v1: cpu.cfs_quota_us and cpu.cfs_period_us; v2:
# cpu.max) and holds the worker's pid (and the launcher logged it);
# starting from an even split, the rebalancer moves shares toward the
# unrestricted worker; afterwards, and after a job that fails, no cgroup is
# left. Skipped where cgroups cannot be made.
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/e2e/lib/tiny_job.sh"
[ "$(id -u)" -eq 0 ] || launch_skip "not root: the launcher needs root to create cgroups"
# Where the launcher makes its parent cgroup (runtime/cpu_quota.h): v1,
# under its own cpu cgroup; v2, there if that is the root or enables cpu
# for its children, else beside it, in its parent.
mnt="$(awk '$3 == "cgroup" && $4 ~ /(^|,)cpu(,|$)/ {print $2; exit}' /proc/mounts)"
if [ -n "$mnt" ]; then
  version=1
  own="$(awk -F: '$2 ~ /(^|,)cpu(,|$)/ {print $3; exit}' /proc/self/cgroup)"
  base="$mnt${own%/}"
else
  version=2
  mnt="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)"
  [ -n "$mnt" ] || launch_skip "no cgroup cpu controller is mounted (neither a v1 cpu hierarchy nor cgroup2)"
  own="$(sed -n 's/^0:://p' /proc/self/cgroup)"
  base="$mnt${own%/}"
  grep -qw cpu "$base/cgroup.controllers" ||
    launch_skip "cgroup v2: the cpu controller is not available to $base (cgroup.controllers: $(cat "$base/cgroup.controllers"))"
  if [ "${own:-/}" != / ] && ! grep -qw cpu "$base/cgroup.subtree_control"; then base="$(dirname "$base")"; fi
fi
mkdir "$base/archipelago-probe-$$" 2>/dev/null || launch_skip "cannot create a cgroup under $base"
rmdir "$base/archipelago-probe-$$"
"$bin" worker --help >/dev/null 2>&1 || launch_skip "'$bin' has no worker verb (a build without libtorch)"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
tiny_corpus "$bin" "$dir"

steps=30
cat > "$dir/job.yaml" <<YAML
cluster:
  islands:
    - {name: free, count: 1}
    - {name: capped, count: 1, cpu_quota: 0.5}
  straits: [{a: free, b: capped, bandwidth: 10Gbit/s, latency: 0ms}]
model: {dim: 128, n_layers: 2, n_heads: 4, max_seq_len: 128}
data: {dir: $dir/data, seq_len: 128}
train: {steps: $steps, global_batch: 16, lr: 0.003, warmup_steps: 3, eval_every: 0, rebalance: true,
        shares: [1, 1], threads_per_worker: 1}
checkpoint: {every: 0, at_exit: false}
run_dir: $dir/run
YAML
"$bin" train "$dir/job.yaml" >"$dir/train.log" 2>&1 &
launcher=$!
cg="$base/archipelago-$launcher/rank1"
# While it runs: the capped worker (rank 1 in workers.json) is in its
# cgroup, whose quota is half the period; its cpu.stat (read until the job
# ends) says how often the cap held it back. The job is bounded by the
# test's timeout and its 30 steps.
seen=""; stat=""
while kill -0 "$launcher" 2>/dev/null; do
  if [ -z "$seen" ]; then
    pid="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pids"].get("1",""))' "$dir/run/workers.json" 2>/dev/null || true)"
    if [ -n "$pid" ] && [ -f "$cg/cgroup.procs" ] && grep -qx "$pid" "$cg/cgroup.procs"; then
      if [ "$version" = 2 ]; then
        read -r q p < "$cg/cpu.max"
        seen="quota $q period $p pid $pid"
      else
        seen="quota $(cat "$cg/cpu.cfs_quota_us") period $(cat "$cg/cpu.cfs_period_us") pid $pid"
      fi
    fi
  fi
  [ -f "$cg/cpu.stat" ] && stat="$(tr '\n' ' ' < "$cg/cpu.stat" 2>/dev/null || true)"
  sleep 0.1
done
wait "$launcher" || launch_fail "the job failed" "$dir/train.log" "$dir/run/logs/rank1.log"
[ -n "$seen" ] || launch_fail "rank 1 was never seen in $cg" "$dir/train.log"
echo "while running: $cg: $seen"
read -r _ q _ p _ _ <<<"$seen"
[ "$((q * 2))" -eq "$p" ] || launch_fail "cgroup v$version quota $q is not half of its period $p"
if [ "$version" = 2 ]; then applied="cpu.max=\"$q $p\""; else applied="cpu.cfs_quota_us=$q of cpu.cfs_period_us=$p"; fi
grep -qF "cpu_quota 0.5 on rank 1 (capped, cluster.islands[1].cpu_quota): cgroup $cg: $applied" "$dir/train.log" ||
  launch_fail "the launcher did not log the quota it applied" "$dir/train.log"
grep -q "applied by the launcher, cgroup $cg" "$dir/run/logs/rank1.log" ||
  launch_fail "rank 1 did not see the launcher's cgroup" "$dir/run/logs/rank1.log"
[ ! -e "$base/archipelago-$launcher" ] || launch_fail "$base/archipelago-$launcher is left behind"

# It trained, and the shares moved from 8/8 toward the free worker. That
# only tests the rebalancer if the free worker really was faster during
# this run, which the run's own step records say: each worker's compute
# seconds per sample. On a loaded host (ctest -j2 beside it) the free
# worker may get little more than the capped one's 0.5 core, and then an
# even split is the right answer, so the shares check is skipped, saying
# why. When it was faster over the run, the rebalancer must have given it
# more samples than the capped worker at some step, and more over the
# whole run. Not at every step: a decision follows the last few steps, and
# a spell of load can make the free worker the slower one for a while
# (measured while ctest loaded the host: 8/8 -> 9/7 -> 8/8, and 8/8 ->
# 10/6 -> 8/8 -> 6/10 in a run the free worker computed at 0.83x the
# capped one's time per sample).
echo "rank 1's cpu.stat at the end: $stat"
rc=0
python3 - "$dir/run/metrics.jsonl" "$steps" <<'PY' || rc=$?
import json, sys
steps = int(sys.argv[2])
share = {0: {}, 1: {}}  # rank -> step -> samples assigned
compute, samples = [0.0, 0.0], [0.0, 0.0]
events = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "step":
        share[r["rank"]][r["step"]] = r["share"]
        if r["step"] > 1 and r.get("compute_s") is not None and r.get("samples"):
            compute[r["rank"]] += r["compute_s"]
            samples[r["rank"]] += r["samples"]
    elif r.get("kind") == "event" and r.get("event") == "rebalance":
        events.append(r["detail"])
for rank in (0, 1):
    assert share[rank].get(steps) is not None, f"rank {rank} did not reach step {steps}"
per_sample = [compute[k] / samples[k] for k in (0, 1)]
both = sorted(set(share[0]) & set(share[1]))
diff = [share[0][s] - share[1][s] for s in both]
print(f"compute per sample: free {per_sample[0] * 1e3:.1f} ms, capped {per_sample[1] * 1e3:.1f} ms; "
      f"rebalances: {events}; shares at step {steps}: free {share[0][steps]}, capped {share[1][steps]}")
if per_sample[0] >= 0.8 * per_sample[1]:
    print(f"SKIPPED: during this run the free worker computed {per_sample[0] * 1e3:.1f} ms per sample, not under "
          f"0.8 x the capped one's {per_sample[1] * 1e3:.1f} ms: the host was too loaded for the cap to make a "
          "difference the rebalancer should act on")
    sys.exit(77)
assert events, "the rebalancer never moved the shares"
assert max(diff) > 0, f"the free worker never got more samples than the capped one: {diff}"
assert sum(diff) > 0, f"over the run the capped worker got as many samples as the free one or more: {diff}"
PY
[ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || exit "$rc"

# A job that fails after its cgroups were made leaves none either.
sed -i "s|dir: $dir/data|dir: $dir/no-such-data|" "$dir/job.yaml"
"$bin" train "$dir/job.yaml" >"$dir/fail.log" 2>&1 &
launcher=$!
if wait "$launcher"; then launch_fail "a job without data succeeded" "$dir/fail.log"; fi
[ ! -e "$base/archipelago-$launcher" ] || launch_fail "the failed job left $base/archipelago-$launcher" "$dir/fail.log"
[ "$rc" -eq 0 ] || exit "$rc"
echo "cpu_quota: OK"
