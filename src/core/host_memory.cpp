#include "archipelago/core/host_memory.h"

#include <cstdlib>  // a libc header first: it defines __GLIBC__
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <string>

namespace archipelago::core {

void holdFreedMemory() {
#if defined(__GLIBC__)
  static const bool done = [] {
    // Setting any of these also turns off glibc's dynamic thresholds.
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    mallopt(M_TOP_PAD, 64 << 20);
    return true;
  }();
  (void)done;
#endif
}

int64_t peakResidentBytes() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    // "VmHWM:     123456 kB" (proc(5)).
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoll(line.c_str() + 6, nullptr, 10) * 1024;
  }
  return 0;
}

bool resetPeakResident() {
  const int fd = ::open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, "5", 1) == 1;
  ::close(fd);
  return ok;
}

}  // namespace archipelago::core
