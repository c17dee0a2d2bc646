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
netns_job_wait_step run $(( $(netns_job_last_step run) + 5 )) 60   # the survivors train on without host 3

netns_job_worker "$bin" 4 2 run.yaml --join --listen "$(netns_addr 4)" --advertise "$(netns_addr 4)"
pids+=("$NETNS_PID")
netns_job_wait_event run join 60
grep -q "$(netns_addr 4)" w2.log || { echo "FAIL: the replacement did not listen on host 4"; tail w2.log; exit 1; }
netns_job_finish_rejoined "$bin" "$steps" "${pids[@]}"
