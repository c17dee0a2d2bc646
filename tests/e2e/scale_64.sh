#!/usr/bin/env bash
# Beyond 8 processes: 64 workers (one thread each) over 4 hosts, network
# namespaces joined by real veth links (tests/netns/hosts.sh). One island per
# host, 16 workers each, every pair of islands joined by a strait (a real
# link here, so never emulated); the coordinator runs on host 1. The job
# trains 20 steps of the tiny model on a global batch of 64 (one sequence per
# worker) and must match the single-process loss curve: the hierarchical sum
# of 64 gradients is the big-batch gradient up to float summation order.
# Every worker must exit 0 and report the same replica digest at the end.
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
source "$src/tests/netns/job.sh"
hosts=4 per_host=16 steps=20
world=$((hosts * per_host))
netns_job_begin "$hosts"

netns_job_data "$bin"
export NETNS_JOB_BATCH="$world"
netns_job_reference "$bin" ref "$steps"

islands="" straits=""
names=(a b c d)
for h in $(seq 1 "$hosts"); do
  islands+="    - {name: ${names[$((h - 1))]}, count: $per_host, threads: 1, host: $(netns_addr "$h")}"$'\n'
  for g in $(seq $((h + 1)) "$hosts"); do
    straits+="${straits:+, }{a: ${names[$((h - 1))]}, b: ${names[$((g - 1))]}, bandwidth: 1Gbit/s, latency: 1ms}"
  done
done
# 32 processes per core: a worker may wait seconds for a core at start-up
# (64 libtorch initialisations at once), so the failure timeout is 30 s, not
# 2 s (the coordinator learns it from the workers). One stream per peer pair: the transport runs two threads per stream,
# and 64 x 63 pairs at the default four would be ~26,000 threads on a
# machine whose pid_max may be 32,768 (docs/comm.md "Threads").
NETNS_JOB_STRAITS="[$straits]" netns_job_yaml run "$steps" "${islands%$'\n'}" \
  "{kind: sync, failure_timeout: 30s, streams: 1}" > run.yaml
export ARCHIPELAGO_SECRET="scale-$$"
netns_job_coordinator "$bin" 1

echo "starting $world workers at $(date +%T)"
pids=()
for r in $(seq 0 $((world - 1))); do
  netns_job_worker "$bin" $((r / per_host + 1)) "$r" run.yaml
  pids+=("$NETNS_PID")
done
failed=0
for r in "${!pids[@]}"; do
  wait "${pids[$r]}" || { echo "FAIL: worker $r exited with $?"; tail -20 "w$r.log"; failed=1; }
done
[ "$failed" = 0 ] || exit 1
echo "all $world workers done at $(date +%T)"

# Each host's workers listened on their own host's address; no link was emulated.
for h in $(seq 1 "$hosts"); do
  r=$(((h - 1) * per_host))
  grep -q "$(netns_addr "$h")" "w$r.log" || { echo "FAIL: rank $r did not listen on $(netns_addr "$h")"; tail "w$r.log"; exit 1; }
done
if grep -q "EMULATED strait" w*.log; then echo "FAIL: a real link was emulated"; exit 1; fi
# The standalone coordinator was given no timeout: it must watch with the
# job's 30 s that the workers announced (its own default would fail ranks
# still starting up).
grep -q "failure timeout 30.0 s" coord.log || { echo "FAIL: the coordinator did not take the job's failure timeout"; cat coord.log; exit 1; }
netns_job_check_replicas run "$steps" "$world"
netns_job_check_curve ref run "$steps" 2e-4
