// How a training process keeps its memory: one allocator policy for every
// worker process, set before its threads start.
#pragma once

#include <cstdint>

namespace archipelago::core {

// Makes glibc keep freed memory in the process instead of returning it to
// the kernel: fixed mmap threshold 256 MiB, trim threshold 1 GiB, top pad
// 64 MiB. A training step frees and re-allocates the same activation
// buffers every step; with glibc's defaults they go back to the kernel and
// are faulted in again, which on a VM that hands free pages back to its
// host cost more than the compute (measured: trainer 0.50-0.78 s/step vs
// 0.19-0.20 s with the thresholds). Called first thing in a worker process
// and again by the trainers; idempotent; no-op without glibc.
// docs/runtime.md, "Host memory".
void holdFreedMemory();

// The kernel's high-water mark of this process's resident memory (VmHWM
// in /proc/self/status), in bytes: the most it held at once since it
// started or since the last resetPeakResident(). 0 where it cannot be read.
int64_t peakResidentBytes();

// Starts a new high-water mark at the current resident size (writes "5" to
// /proc/self/clear_refs: Linux >= 4.0, cheap, touches no page). False where
// the kernel refuses; the mark then keeps counting from the start.
bool resetPeakResident();

}  // namespace archipelago::core
