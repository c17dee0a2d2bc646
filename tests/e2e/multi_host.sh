#!/usr/bin/env bash
# A 2-island job over 3 hosts: network namespaces joined by real veth links
# (tests/netns/hosts.sh) stand in for machines. The coordinator runs on
# host 1, island a's two workers on host 2 and island b's worker on host 3,
# each listening on its host's own address (listen: auto). The job must
# train the single-process loss curve, and its strait, a real link between
# hosts, must not be emulated. Every link is TLS (security.tls) with
# credentials from `archipelago secrets init`, which OpenSSL's own CLI
# verifies; a worker holding another job's credentials is refused at once;
# and `train` gives a TLS job without credentials a CA of its own.
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
source "$src/tests/netns/job.sh"
netns_job_begin 3

netns_job_data "$bin"
netns_job_reference "$bin" ref 12

"$bin" secrets init creds >/dev/null
"$bin" secrets init other >/dev/null
openssl verify -CAfile creds/ca.pem creds/node.pem | grep -q ": OK" || { echo "FAIL: openssl does not verify node.pem"; exit 1; }
if openssl verify -CAfile other/ca.pem creds/node.pem >/dev/null 2>&1; then echo "FAIL: another CA verifies node.pem"; exit 1; fi
export NETNS_JOB_SECURITY="{tls: true, credentials: $PWD/creds}"
export NETNS_COORD_ARGS="--credentials $PWD/creds"
export NETNS_JOB_SECRET_FROM_CREDENTIALS=1  # the job secret is creds/secret, read by every process
netns_job_start "$bin" mh 12
for i in 0 1 2; do
  wait "${NETNS_PIDS[$i]}" || { echo "FAIL: worker $i exited with $?"; tail -20 w$i.log; exit 1; }
done

# Each worker listened on its own host's address, and the strait was not shaped.
grep -q "$(netns_addr 2)" w0.log || { echo "FAIL: rank 0 did not listen on $(netns_addr 2)"; tail w0.log; exit 1; }
grep -q "$(netns_addr 3)" w2.log || { echo "FAIL: rank 2 did not listen on $(netns_addr 3)"; tail w2.log; exit 1; }
if grep -q "EMULATED strait" w0.log w1.log w2.log; then echo "FAIL: a real link was emulated"; exit 1; fi
grep -q "(TLS, mutual, job CA)" coord.log || { echo "FAIL: the coordinator did not require TLS"; cat coord.log; exit 1; }
for i in 0 1 2; do
  grep -q "TLS on every link" "w$i.log" || { echo "FAIL: worker $i did not use TLS"; tail w$i.log; exit 1; }
done
netns_job_check_curve ref mh 12 2e-4

# Another job's credentials: refused by certificate, at once (no waiting for a coordinator that will never accept).
NETNS_JOB_SECURITY="{tls: true, credentials: $PWD/other}" netns_job_yaml intruder 12 "    - {name: a, count: 2, host: $(netns_addr 2)}
    - {name: b, count: 1, host: $(netns_addr 3)}" > intruder.yaml
rc=0
ip netns exec "${NETNS_PREFIX}3" timeout 60 "$bin" worker --job intruder.yaml --coordinator "$NETNS_COORD" --rank 2 \
  --join >intruder.log 2>&1 || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { echo "FAIL: the intruder exited with $rc"; tail intruder.log; exit 1; }
grep -q "certificate" intruder.log || { echo "FAIL: the refusal does not name the certificate"; tail intruder.log; exit 1; }
echo "intruder refused: $(grep -m1 certificate intruder.log)"

# `archipelago train` of a job that asks for TLS without credentials writes a CA of the run's own.
NETNS_JOB_STRAITS="[]" NETNS_JOB_SECURITY="{tls: true}" netns_job_yaml auto 3 "    - {name: a, count: 2}" > auto.yaml
timeout 120 "$bin" train auto.yaml >auto.log 2>&1 || { echo "FAIL: train with TLS"; tail auto.log; exit 1; }
openssl verify -CAfile auto/credentials/ca.pem auto/credentials/node.pem | grep -q ": OK" \
  || { echo "FAIL: the run's credentials do not verify"; exit 1; }
grep -q "(TLS, mutual, job CA)" auto/logs/coordinator.log || { echo "FAIL: the run's coordinator is plain"; exit 1; }
[ "$(grep -l "TLS on every link" auto/logs/rank*.log | wc -l)" -eq 2 ] || { echo "FAIL: a worker of the run is plain"; exit 1; }
echo "PASS: 3 hosts over TLS on every link; another CA refused"
