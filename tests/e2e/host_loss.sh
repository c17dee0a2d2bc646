#!/usr/bin/env bash
# A host lost for good: in a 2-island job over 3 hosts (tests/netns/hosts.sh)
# host 3's worker is killed and its link cut. The survivors go on in a new
# epoch; then a replacement on a fourth host joins the dead slot
# (`worker --join --rank 2`, listening on its own address) and receives the
# live state from a peer. Twenty steps later the job is stopped: no step may
# be missing, nothing read from disk, the three replicas bit-identical and
# the loss curve the single-process one (1e-4: shares re-split over the
# alive ranks reorder gradient sums by about 1e-7).
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
source "$src/tests/netns/job.sh"
netns_job_begin 4
steps=100000  # more than it will run: stopped once the rejoin is seen (tests/netns/job.sh)

netns_job_data "$bin"
netns_job_start "$bin" run "$steps"
pids=("${NETNS_PIDS[0]}" "${NETNS_PIDS[1]}")
lost="${NETNS_PIDS[2]}"

netns_job_wait_step run 20 120
ip netns pids "${NETNS_PREFIX}3" | xargs -r kill -9
netns_link 3 down
wait "$lost" 2>/dev/null || true
netns_job_wait_event run failure 30
netns_job_wait_event run epoch 30
survivor_step=$(python3 -c "
import json
print(max([0] + [j['step'] for j in map(json.loads, open('run/metrics.jsonl')) if j.get('kind') == 'step']))")
netns_job_wait_step run $((survivor_step + 5)) 60   # the survivors train on without host 3

netns_job_worker "$bin" 4 2 run.yaml --join --listen "$(netns_addr 4)" --advertise "$(netns_addr 4)"
pids+=("$NETNS_PID")
netns_job_wait_event run join 60
netns_job_wait_step run $(( $(netns_job_last_step run) + 20 )) 120   # 20 steps with the rejoined rank
kill -TERM "${pids[0]}"   # every worker stops after the same step
for i in 0 1 2; do
  wait "${pids[$i]}" || { echo "FAIL: worker $i exited with $?"; tail -30 w$i.log; exit 1; }
done
grep -q "$(netns_addr 4)" w2.log || { echo "FAIL: the replacement did not listen on host 4"; tail w2.log; exit 1; }
if grep -qi "resum\|from checkpoint" w0.log w1.log w2.log; then
  echo "FAIL: the job read a checkpoint"; grep -i "resum\|from checkpoint" w*.log; exit 1
fi
last=$(netns_job_last_step run)
netns_job_check_replicas run "$last" 3
netns_job_reference "$bin" ref "$steps" "$last"
netns_job_check_curve ref run "$last" 1e-4
