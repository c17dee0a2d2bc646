#!/usr/bin/env bash
# Failures say so: on the multi-host test bed (tests/netns/hosts.sh), rank 2
# advertises an address no host has. Every worker must end with an error
# that names both ranks and the address tried, within the reach bound
# (max(10 s, 5 x failure_timeout) to dial, twice that to wait for a dialer:
# docs/comm.md), never a silent hang. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
source "$src/tests/netns/job.sh"
netns_job_begin 3

netns_job_data "$bin"
bogus="10.77.$NETNS_NET.99"
start=$SECONDS
netns_job_start "$bin" run 12 --advertise "$bogus"
for i in 0 1 2; do
  if wait "${NETNS_PIDS[$i]}"; then echo "FAIL: worker $i succeeded"; exit 1; fi
done
took=$((SECONDS - start))
echo "every worker failed within ${took}s"
[ "$took" -lt 120 ] || { echo "FAIL: took ${took}s"; exit 1; }
for i in 0 1; do
  grep -q "rank $i could not reach rank 2 at $bogus" "w$i.log" || { echo "FAIL: rank $i's error"; tail -3 "w$i.log"; exit 1; }
done
grep -q "never connected to rank 2 at $bogus" w2.log || { echo "FAIL: rank 2's error"; tail -3 w2.log; exit 1; }
grep -h "error" w0.log w2.log | cut -c1-300
