// Live and peak bytes of the tensors a process holds in host memory: the
// CPU counterpart of a GPU caching allocator's allocated / max-allocated
// statistics. trackTensorMemory() wraps libtorch's CPU allocator with a
// counter (every CPU tensor allocated afterwards is counted until it is
// freed); the process's resident memory (core/host_memory.h) also holds
// libtorch itself and whatever the C allocator keeps after a free, this
// holds only tensors, which is what a memory model can predict.
#pragma once

#include <cstdint>

namespace archipelago::model {

struct TensorMemory {
  int64_t live = 0;  // bytes of CPU tensors allocated and not yet freed
  int64_t peak = 0;  // the most live at once since tracking began or the last resetTensorMemoryPeak()
};

// Idempotent and thread-safe; call before the model is built (tensors
// allocated before are not counted, and their frees are not subtracted).
void trackTensorMemory();
bool tensorMemoryTracked();
TensorMemory tensorMemory();
// peak := live.
void resetTensorMemoryPeak();

}  // namespace archipelago::model
