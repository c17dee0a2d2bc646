#!/usr/bin/env bash
# A 2-island job over 3 hosts: network namespaces joined by real veth links
# (tests/netns/hosts.sh) stand in for machines. The coordinator runs on
# host 1, island a's two workers on host 2 and island b's worker on host 3,
# each listening on its host's own address (listen: auto). The job must
# train the single-process loss curve, and its strait, a real link between
# hosts, must not be emulated. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
source "$src/tests/netns/job.sh"
netns_job_begin 3

netns_job_data "$bin"
netns_job_reference "$bin" ref 12
netns_job_start "$bin" mh 12
for i in 0 1 2; do
  wait "${NETNS_PIDS[$i]}" || { echo "FAIL: worker $i exited with $?"; tail -20 w$i.log; exit 1; }
done

# Each worker listened on its own host's address, and the strait was not shaped.
grep -q "$(netns_addr 2)" w0.log || { echo "FAIL: rank 0 did not listen on $(netns_addr 2)"; tail w0.log; exit 1; }
grep -q "$(netns_addr 3)" w2.log || { echo "FAIL: rank 2 did not listen on $(netns_addr 3)"; tail w2.log; exit 1; }
if grep -q "EMULATED strait" w0.log w1.log w2.log; then echo "FAIL: a real link was emulated"; exit 1; fi
netns_job_check_curve ref mh 12 2e-4
