# shellcheck shell=bash
# A one-node Slurm cluster of a test's own (sourced): Debian's munge and
# slurm-wlm, as root, without systemd, inside a network namespace the test
# creates (tests/netns/hosts.sh host 1), so the daemons, the job steps and the
# workers talk over that namespace's loopback and nothing outlives the test:
# netns_down (on exit) kills every process in the namespace. Every file
# (munge key, slurm.conf, cgroup.conf, spool dirs, logs) lives under the
# test's temporary directory; nothing is written under /etc.
#
#   source tests/e2e/lib/tiny_job.sh     # launch_skip
#   source tests/e2e/lib/slurm_cluster.sh
#   slurm_up TMP        # skips the test (exit 77) when a daemon cannot start
#   on_host CMD...      # run CMD on the cluster's node (SLURM_CONF is exported)
#   SLURM_NODE          # the node's name (this host's short name)

slurm_up() {
  local tmp="$1" t state=""
  trap 'rm -rf "'"$tmp"'"' EXIT
  [ "$(id -u)" = 0 ] || launch_skip "needs root to run munged and slurmd"
  for t in munged munge slurmctld slurmd srun sbatch sinfo scontrol; do
    command -v "$t" >/dev/null || launch_skip "$t is not installed: scripts/setup.sh installs slurm-wlm and munge"
  done
  source "$(dirname "${BASH_SOURCE[0]}")/../../netns/hosts.sh"
  netns_up 1 || { rm -rf "$tmp"; launch_skip "cannot create a network namespace (ip netns)"; }
  trap 'netns_down; rm -rf "'"$tmp"'"' EXIT
  chmod 700 "$tmp"

  # munge: a fresh key, socket and logs.
  mkdir -m 700 "$tmp/munge"
  head -c 1024 /dev/urandom > "$tmp/munge/munge.key"
  chmod 400 "$tmp/munge/munge.key"
  local msock="$tmp/munge/socket"
  on_host munged -F --force --key-file="$tmp/munge/munge.key" --socket="$msock" --pid-file="$tmp/munge/pid" \
    --log-file="$tmp/munge/log" --seed-file="$tmp/munge/seed" >/dev/null 2>&1 &
  for _ in $(seq 1 50); do munge -S "$msock" -n >/dev/null 2>&1 && break; sleep 0.1; done
  munge -S "$msock" -n >/dev/null 2>&1 || { tail "$tmp/munge/log"; launch_skip "munged did not start"; }

  # This host, 2 CPUs, tasks tracked without cgroups.
  SLURM_NODE="$(hostname -s)"
  mkdir -m 700 "$tmp/ctld" "$tmp/slurmd"
  cat > "$tmp/slurm.conf" <<CONF
ClusterName=archipelago-test
SlurmctldHost=$SLURM_NODE(127.0.0.1)
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
SchedulerParameters=sched_min_interval=0
MpiDefault=none
ReturnToService=2
NodeName=$SLURM_NODE NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=$SLURM_NODE Default=YES MaxTime=10 State=UP OverSubscribe=YES
CONF
  echo "CgroupPlugin=cgroup/v1" > "$tmp/cgroup.conf"
  export SLURM_CONF="$tmp/slurm.conf"
  on_host slurmctld -D -f "$SLURM_CONF" >/dev/null 2>&1 &
  on_host slurmd -D -f "$SLURM_CONF" >/dev/null 2>&1 &
  for _ in $(seq 1 100); do
    state="$(on_host sinfo -h -o %t 2>/dev/null || true)"
    [ "$state" = idle ] && break
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    tail -n 5 "$tmp/slurmctld.log" "$tmp/slurmd.log" 2>/dev/null || true
    launch_skip "the one-node Slurm cluster did not come up (node state '$state')"
  fi
}

on_host() { netns_exec 1 "$@"; }
