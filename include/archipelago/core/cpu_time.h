// CPU time of this thread and of this process, and its page faults: with
// the wall time, how much of a phase ran and how much waited for a core
// (step records, calibration, the local step prediction).
#pragma once

#include <cstdint>

namespace archipelago::core {

double threadCpuSeconds();   // CLOCK_THREAD_CPUTIME_ID
double processCpuSeconds();  // CLOCK_PROCESS_CPUTIME_ID
// Minor page faults of this process so far (a fresh page touched: a
// growing heap, or memory the allocator returned and takes back).
int64_t minorFaults();

}  // namespace archipelago::core
