#!/usr/bin/env bash
# Launch by Slurm: the test starts a single-node Slurm cluster of its own
# (munged, slurmctld, slurmd; Debian's slurm-wlm and munge, as root, no
# systemd) inside a network namespace it creates, so every daemon and worker
# talks over that namespace's loopback and nothing outlives the test. Like
# deploy/slurm/train.sbatch, the script starts the coordinator, then
# `srun -n 4 --overcommit archipelago worker` starts the workers, which take
# rank and world size from SLURM_PROCID / SLURM_NTASKS. The job must train
# the single-process loss curve. Every file (munge key, slurm.conf, spool
# dirs, logs) lives in a temporary directory; nothing is written under /etc.
# Reported as skipped (exit 77) when the services cannot start here.
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/e2e/lib/tiny_job.sh"
[ "$(id -u)" = 0 ] || launch_skip "needs root to run munged and slurmd"
for t in munged munge slurmctld slurmd srun sinfo; do
  command -v "$t" >/dev/null || launch_skip "$t is not installed: scripts/setup.sh installs slurm-wlm and munge"
done
source "$src/tests/netns/hosts.sh"
netns_up 1 || launch_skip "cannot create a network namespace (ip netns)"
tmp="$(mktemp -d)"
# netns_down kills every process in the namespace: daemons, job steps, workers.
trap 'netns_down; rm -rf "$tmp"' EXIT
chmod 700 "$tmp"
on_host() { netns_exec 1 "$@"; }
fail() { echo "FAIL: $1"; shift; for f in "$@"; do echo "--- $f"; tail -n 20 "$f" || true; done; exit 1; }

tiny_job_prepare "$bin" "$tmp"

# munge: a fresh key, socket and logs in $tmp.
mkdir -m 700 "$tmp/munge"
head -c 1024 /dev/urandom > "$tmp/munge/munge.key"
chmod 400 "$tmp/munge/munge.key"
msock="$tmp/munge/socket"
on_host munged -F --force --key-file="$tmp/munge/munge.key" --socket="$msock" --pid-file="$tmp/munge/pid" \
  --log-file="$tmp/munge/log" --seed-file="$tmp/munge/seed" >/dev/null 2>&1 &
for _ in $(seq 1 50); do munge -S "$msock" -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -S "$msock" -n >/dev/null 2>&1 || { tail "$tmp/munge/log"; launch_skip "munged did not start"; }

# A one-node cluster: this host, 2 CPUs, tasks tracked without cgroups.
node="$(hostname -s)"
mkdir -m 700 "$tmp/ctld" "$tmp/slurmd"
cat > "$tmp/slurm.conf" <<CONF
ClusterName=archipelago-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$msock
StateSaveLocation=$tmp/ctld
SlurmdSpoolDir=$tmp/slurmd
SlurmctldPidFile=$tmp/ctld/slurmctld.pid
SlurmdPidFile=$tmp/slurmd/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=$node NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=10 State=UP OverSubscribe=YES
CONF
echo "CgroupPlugin=cgroup/v1" > "$tmp/cgroup.conf"
export SLURM_CONF="$tmp/slurm.conf"
on_host slurmctld -D -f "$SLURM_CONF" >/dev/null 2>&1 &
on_host slurmd -D -f "$SLURM_CONF" >/dev/null 2>&1 &
state=""
for _ in $(seq 1 100); do
  state="$(on_host sinfo -h -o %t 2>/dev/null || true)"
  [ "$state" = idle ] && break
  sleep 0.2
done
if [ "$state" != idle ]; then
  tail -n 5 "$tmp/slurmctld.log" "$tmp/slurmd.log" 2>/dev/null || true
  launch_skip "the one-node Slurm cluster did not come up (node state '$state')"
fi

# The coordinator, then the job step: 4 tasks on 2 CPUs.
export ARCHIPELAGO_SECRET="slurm-$$-$RANDOM"
on_host "$bin" coordinator --host 127.0.0.1 --port 0 >"$tmp/coord.log" 2>&1 &
coord=""
for _ in $(seq 1 100); do
  coord="$(sed -n 's/^coordinator listening on //p' "$tmp/coord.log")"
  [ -n "$coord" ] && break
  sleep 0.1
done
[ -n "$coord" ] || fail "the coordinator did not start" "$tmp/coord.log"
on_host timeout 240 srun -n 4 --overcommit --kill-on-bad-exit=1 --time=4 --output="$tmp/w%t.log" \
  "$bin" worker --job "$tmp/job.yaml" --coordinator "$coord" >"$tmp/srun.log" 2>&1 ||
  fail "srun exited with $?" "$tmp/srun.log" "$tmp"/w?.log

# Each task took its rank from SLURM_PROCID: rank r logs as r<r>.
for r in 0 1 2 3; do
  grep -q " r$r\b" "$tmp/w$r.log" || fail "task $r did not run as rank $r" "$tmp/w$r.log"
done
tiny_job_check "$tmp"
