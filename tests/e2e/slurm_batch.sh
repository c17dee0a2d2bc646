#!/usr/bin/env bash
# deploy/slurm/train.sbatch on a one-node Slurm cluster the test starts by
# itself (tests/e2e/lib/slurm_cluster.sh): `sbatch` with 4 tasks on the
# node; the batch script starts the coordinator on the allocation's first
# node at its NodeAddr and srun the 4 workers (rank and world size from
# SLURM_PROCID / SLURM_NTASKS), the secret in the environment. The job must
# train the single-process loss curve. Reported as skipped (exit 77) when the
# services cannot start here. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/e2e/lib/tiny_job.sh"
source "$src/tests/e2e/lib/slurm_cluster.sh"
tmp="$(mktemp -d)"
slurm_up "$tmp"
tiny_job_prepare "$bin" "$tmp"

# The batch script reads the secret from a file here (ARCHIPELAGO_SECRET_FILE).
unset ARCHIPELAGO_SECRET
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$tmp/secret"
chmod 600 "$tmp/secret"
# (sbatch --wait polls at growing intervals, up to 30 s late: poll here instead.)
id="$(on_host sbatch --parsable --nodes=1 --ntasks=4 --ntasks-per-node=4 --cpus-per-task=1 --overcommit --time=4 \
  --output="$tmp/batch.out" \
  --export="ALL,ARCHIPELAGO_JOB=$tmp/job.yaml,ARCHIPELAGO_BIN=$bin,ARCHIPELAGO_SECRET_FILE=$tmp/secret" \
  "$src/deploy/slurm/train.sbatch" 2>"$tmp/sbatch.log")" || launch_fail "sbatch refused the job" "$tmp/sbatch.log"
state=""
for _ in $(seq 1 1200); do
  info="$(on_host scontrol show job "$id" -o 2>/dev/null || true)"
  state="$(sed -n 's/.* JobState=\([A-Z_]*\) .*/\1/p' <<<"$info")"
  case "$state" in PENDING | CONFIGURING | RUNNING | COMPLETING | "") sleep 0.2 ;; *) break ;; esac
done
if [ "$state" != COMPLETED ] || ! grep -q " ExitCode=0:0 " <<<"$info"; then
  launch_fail "the batch job ended $state: $(grep -o ' ExitCode=[^ ]*' <<<"$info")" "$tmp/batch.out" "$tmp/slurmd.log"
fi
grep -q "coordinator on $SLURM_NODE (127.0.0.1:29500), 4 workers on 1 nodes" "$tmp/batch.out" ||
  launch_fail "train.sbatch did not start the coordinator on the first node" "$tmp/batch.out"
for r in 0 1 2 3; do
  grep -q "rank $r of 4 (SLURM_PROCID, SLURM_NTASKS), local rank $r (SLURM_LOCALID)" "$tmp/batch.out" ||
    launch_fail "train.sbatch: no worker ran as rank $r of 4 from SLURM_*" "$tmp/batch.out"
done
tiny_job_check "$tmp"
