#include "archipelago/core/cpu_time.h"

#include <sys/resource.h>
#include <time.h>

namespace archipelago::core {

namespace {
double seconds(clockid_t clock) {
  timespec ts{};
  ::clock_gettime(clock, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
}  // namespace

double threadCpuSeconds() { return seconds(CLOCK_THREAD_CPUTIME_ID); }
double processCpuSeconds() { return seconds(CLOCK_PROCESS_CPUTIME_ID); }

int64_t minorFaults() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_minflt;
}

}  // namespace archipelago::core
