#!/usr/bin/env bash
# A real network partition: host 3 (island b's worker) loses its link for
# 3 s in the middle of a 2-island job over 3 hosts (tests/netns/hosts.sh).
# The survivors declare it failed after strategy.failure_timeout (2 s) and
# train on; when the link is back the cut-off worker learns it was evicted
# and rejoins its slot by itself, taking the live state from a peer. Twenty
# steps later the job is stopped: no step may be missing, nothing read from
# disk, all three replicas bit-identical, and the loss curve the
# single-process one (the global batch is kept across membership changes;
# shares re-split over the alive ranks reorder the gradient sums by about 1e-7).
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
source "$src/tests/netns/job.sh"
netns_job_begin 3
steps=100000  # more than it will run: stopped once the rejoin is seen (tests/netns/job.sh)

netns_job_data "$bin"
netns_job_start "$bin" run "$steps"
pids=("${NETNS_PIDS[@]}")

netns_job_wait_step run 20 120
netns_link 3 down
echo "host 3 cut off at $(date +%T.%N)"
sleep 3
netns_link 3 up
echo "host 3 back at $(date +%T.%N)"
netns_job_wait_event run failure 30      # the survivors noticed, and trained on
netns_job_wait_event run join 60
grep -q "evicted" w2.log || { echo "FAIL: rank 2 never learnt it was evicted"; tail -30 w2.log; exit 1; }
python3 - run/metrics.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    j = json.loads(line)
    if j.get("kind") == "event" and j.get("event") in ("failure", "join", "recovered"):
        print("event", j["event"], {k: v for k, v in j.items() if k.endswith("_s") or k in ("failed_rank", "rank")})
PY
netns_job_finish_rejoined "$bin" "$steps" "${pids[@]}"
