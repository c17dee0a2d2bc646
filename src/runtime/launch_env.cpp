#include "archipelago/runtime/launch_env.h"

#include <cstdlib>
#include <initializer_list>

namespace archipelago::runtime {

namespace {

core::Result<LaunchValue> firstSet(std::initializer_list<const char*> names) {
  for (const char* n : names) {
    const char* v = std::getenv(n);
    if (!v) continue;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    if (!*v || *end != '\0' || x < 0 || x > 1 << 24) {
      return core::invalidArgument(std::string("environment variable ") + n + "='" + v +
                                   "' is not a rank or size (an integer >= 0): fix the launcher's setting or unset it");
    }
    return LaunchValue{static_cast<int>(x), n};
  }
  return LaunchValue{};
}

}  // namespace

core::Result<LaunchValue> rankFromEnv() { return firstSet({"RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"}); }

core::Result<LaunchValue> worldFromEnv() {
  return firstSet({"WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"});
}

core::Result<LaunchValue> localRankFromEnv() {
  return firstSet({"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"});
}

}  // namespace archipelago::runtime
