// core::holdFreedMemory: glibc keeps freed memory in the process (a block
// glibc's defaults would map and unmap on its own comes from the heap, and
// freeing it does not shrink the heap). Checked through mallinfo2.
// core::peakResidentBytes / resetPeakResident against the kernel's own
// account of pages mapped and touched.
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <gtest/gtest.h>

#include "archipelago/core/host_memory.h"

// ASan and TSan put their own allocator in place of glibc's: mallopt() is
// ignored and mallinfo2() reports zeros, so there is nothing to observe.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define ARCH_TEST_MALLOC_REPLACED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define ARCH_TEST_MALLOC_REPLACED 1
#endif
#endif

namespace archipelago::core {
namespace {

TEST(HostMemory, FreedMemoryStaysInTheProcess) {
#if defined(ARCH_TEST_MALLOC_REPLACED)
  GTEST_SKIP() << "a sanitizer's allocator replaces glibc's malloc, whose behaviour this test checks";
#elif defined(__GLIBC__)
  holdFreedMemory();
  holdFreedMemory();  // idempotent
  // 64 MiB: above the largest mmap threshold glibc's defaults ever use
  // (32 MiB), below ours (256 MiB).
  constexpr size_t kBytes = size_t{64} << 20;
  const struct mallinfo2 before = mallinfo2();
  auto* p = static_cast<char*>(std::malloc(kBytes));
  ASSERT_NE(p, nullptr);
  std::memset(p, 1, kBytes);
  const struct mallinfo2 during = mallinfo2();
  EXPECT_EQ(during.hblkhd, before.hblkhd) << "the block got a mapping of its own (which free() would unmap)";
  EXPECT_GE(during.arena, kBytes);
  std::free(p);
  const struct mallinfo2 after = mallinfo2();
  EXPECT_EQ(after.arena, during.arena) << "the heap was trimmed back to the kernel";
  EXPECT_GE(after.fordblks, kBytes);  // the block is free inside the process, ready for the next step
#else
  GTEST_SKIP() << "glibc only";
#endif
}

// 64 MiB mapped and touched raise the high-water mark by that much; after
// unmapping them, a reset brings it back down.
TEST(HostMemory, PeakResidentFollowsTouchedPagesAndResets) {
  if (!resetPeakResident()) GTEST_SKIP() << "the kernel refuses writes to /proc/self/clear_refs";
  const int64_t base = peakResidentBytes();
  ASSERT_GT(base, 0) << "no VmHWM in /proc/self/status";
  constexpr size_t kBytes = size_t{64} << 20;
  void* p = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  std::memset(p, 1, kBytes);
  const int64_t high = peakResidentBytes();
  EXPECT_GE(high, base + static_cast<int64_t>(kBytes) * 15 / 16) << "base " << base;
  ASSERT_EQ(::munmap(p, kBytes), 0);
  // The mark keeps the 64 MiB after they are gone (up to the kernel's
  // batched per-CPU RSS counters: a few hundred KiB seen here).
  EXPECT_GE(peakResidentBytes(), high - (int64_t{1} << 20)) << "the high-water mark fell with the unmapping";
  ASSERT_TRUE(resetPeakResident());
  EXPECT_LE(peakResidentBytes(), high - static_cast<int64_t>(kBytes) / 2);
}

}  // namespace
}  // namespace archipelago::core
