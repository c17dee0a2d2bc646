#include "archipelago/core/host_memory.h"

#include <cstdlib>  // a libc header first: it defines __GLIBC__
#if defined(__GLIBC__)
#include <malloc.h>
#endif

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

}  // namespace archipelago::core
