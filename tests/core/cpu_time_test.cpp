// CPU time and page faults measured by their effect: a busy loop advances
// this thread's CPU clock (and the process's at least as far); touching
// fresh pages adds minor faults.
#include <sys/mman.h>

#include <gtest/gtest.h>

#include "archipelago/core/cpu_time.h"

namespace archipelago::core {
namespace {

TEST(CpuTime, BusyLoopAdvancesThreadAndProcessClocks) {
  // The process's interval encloses the thread's (read first, read last):
  // read the other way round, the gap between the two first reads (0.1 ms
  // under AddressSanitizer) was the thread's alone and failed the check below.
  const double p0 = processCpuSeconds(), t0 = threadCpuSeconds();
  volatile double x = 0;
  while (threadCpuSeconds() - t0 < 0.05) x = x + 1.0;
  const double dt = threadCpuSeconds() - t0, dp = processCpuSeconds() - p0;
  EXPECT_GE(dt, 0.05);
  EXPECT_LT(dt, 5.0);
  EXPECT_GE(dp, dt * 0.99);  // the process's clock counts this thread too
}

TEST(CpuTime, FreshPagesAreMinorFaults) {
  constexpr size_t kPages = 256, kPage = 4096;
  void* p = ::mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  ::madvise(p, kPages * kPage, MADV_NOHUGEPAGE);  // one fault per page (best effort; checked below)
  const int64_t f0 = minorFaults();
  for (size_t i = 0; i < kPages; ++i) static_cast<volatile char*>(p)[i * kPage] = 1;
  EXPECT_GE(minorFaults() - f0, static_cast<int64_t>(kPages) / 2);
  ::munmap(p, kPages * kPage);
}

}  // namespace
}  // namespace archipelago::core
