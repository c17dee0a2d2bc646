// Where a worker started by Slurm, mpirun, Kubernetes or torchrun-style
// launchers finds its rank, the world size and its rank on the node: the
// first of each list of environment variables that is set. A variable that
// is set but not an integer >= 0 is an error naming it. Slurm's come last:
// mpirun started inside a Slurm allocation (a batch script) leaves the batch
// step's SLURM_PROCID=0 / SLURM_NTASKS in every process it starts, while its
// own OMPI_* / PMI_* variables are the ones that tell the processes apart.
#pragma once

#include <string>

#include "archipelago/core/status.h"

namespace archipelago::runtime {

struct LaunchValue {
  int value = -1;    // -1: none of the variables is set
  std::string from;  // the variable it came from; empty when none is set
};

// RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID.
core::Result<LaunchValue> rankFromEnv();
// WORLD_SIZE, OMPI_COMM_WORLD_SIZE, PMI_SIZE, SLURM_NTASKS.
core::Result<LaunchValue> worldFromEnv();
// LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, SLURM_LOCALID.
core::Result<LaunchValue> localRankFromEnv();

}  // namespace archipelago::runtime
