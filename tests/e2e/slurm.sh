#!/usr/bin/env bash
# Launch by Slurm: on a one-node Slurm cluster the test starts by itself
# (tests/e2e/lib/slurm_cluster.sh), the script starts the coordinator, then
# `srun -n 4 --overcommit archipelago worker` the workers, which take rank
# and world size from SLURM_PROCID / SLURM_NTASKS. The job must train the
# single-process loss curve. deploy/slurm/train.sbatch is e2e.slurm_batch.
# Reported as skipped (exit 77) when the services cannot start here.
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/e2e/lib/tiny_job.sh"
source "$src/tests/e2e/lib/slurm_cluster.sh"
tmp="$(mktemp -d)"
slurm_up "$tmp"
tiny_job_prepare "$bin" "$tmp"

export ARCHIPELAGO_SECRET="slurm-$$-$RANDOM"
on_host "$bin" coordinator --host 127.0.0.1 --port 0 >"$tmp/coord.log" 2>&1 &
coord="$(wait_for_coordinator "$tmp/coord.log")"
on_host timeout 240 srun -n 4 --overcommit --kill-on-bad-exit=1 --time=4 --output="$tmp/w%t.log" \
  "$bin" worker --job "$tmp/job.yaml" --coordinator "$coord" >"$tmp/srun.log" 2>&1 ||
  launch_fail "srun exited with $?" "$tmp/srun.log" "$tmp"/w?.log

# Task t took its rank, the world size and its local rank from Slurm.
for r in 0 1 2 3; do
  grep -q "rank $r of 4 (SLURM_PROCID, SLURM_NTASKS), local rank $r (SLURM_LOCALID)" "$tmp/w$r.log" ||
    launch_fail "task $r did not run as rank $r of 4 from SLURM_*" "$tmp/w$r.log"
done
tiny_job_check "$tmp"
