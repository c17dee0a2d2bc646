#!/usr/bin/env bash
# Launch by MPI: Debian's OpenMPI starts 4 workers,
# `mpirun --allow-run-as-root --oversubscribe -np 4 archipelago worker`, which
# take rank and world size from OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE
# (the workers do not call MPI: mpirun only starts them), even with a Slurm
# batch step's SLURM_PROCID=0 / SLURM_NTASKS=1 in the environment. As on a real
# cluster, the script starts the coordinator first on the launching host and
# passes it with --coordinator; the secret travels with `-x`. Everything runs
# in a network namespace the test creates. The job must train the
# single-process loss curve. Reported as skipped (exit 77) when mpirun
# cannot run here. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/e2e/lib/tiny_job.sh"
[ "$(id -u)" = 0 ] || launch_skip "needs root for its network namespace"
command -v mpirun >/dev/null || launch_skip "mpirun is not installed: scripts/setup.sh installs openmpi-bin"
source "$src/tests/netns/hosts.sh"
netns_up 1 || launch_skip "cannot create a network namespace (ip netns)"
tmp="$(mktemp -d)"
trap 'netns_down; rm -rf "$tmp"' EXIT
on_host() { netns_exec 1 "$@"; }
mpi=(mpirun --allow-run-as-root --oversubscribe --mca btl self --mca oob_tcp_if_include lo)

# mpirun itself must work before the job is blamed for anything.
on_host timeout 30 "${mpi[@]}" -np 2 true >"$tmp/probe.log" 2>&1 ||
  { tail "$tmp/probe.log"; launch_skip "mpirun cannot start 2 processes here"; }

tiny_job_prepare "$bin" "$tmp"
export ARCHIPELAGO_SECRET="mpi-$$-$RANDOM"
on_host "$bin" coordinator --host 127.0.0.1 --port 0 >"$tmp/coord.log" 2>&1 &
coord="$(wait_for_coordinator "$tmp/coord.log")"
# As in a Slurm batch script, which runs mpirun with the batch step's SLURM_*.
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0
on_host timeout 240 "${mpi[@]}" -np 4 -x ARCHIPELAGO_SECRET --output-filename "$tmp/out" \
  "$bin" worker --job "$tmp/job.yaml" --coordinator "$coord" >"$tmp/mpirun.log" 2>&1 ||
  launch_fail "mpirun exited with $?" "$tmp/mpirun.log" "$tmp"/out/1/rank.*/std*

# Process r took its rank, the world size and its local rank from OpenMPI,
# not from the batch step's SLURM_* it inherited.
for r in 0 1 2 3; do
  grep -qs "rank $r of 4 (OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE), local rank $r (OMPI_COMM_WORLD_LOCAL_RANK)" \
    "$tmp/out/1/rank.$r/stderr" "$tmp/out/1/rank.$r/stdout" ||
    launch_fail "process $r did not run as rank $r of 4 from OMPI_COMM_WORLD_*" "$tmp/out/1/rank.$r/stderr"
done
tiny_job_check "$tmp"
