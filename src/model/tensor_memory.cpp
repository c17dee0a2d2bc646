#include "archipelago/model/tensor_memory.h"

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <mutex>

namespace archipelago::model {
namespace {

std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};

// Each block is allocated 64 bytes larger from the wrapped allocator: the
// header keeps what a free needs, so the raw deleter (which sees only the
// data pointer) works as well as the DataPtr's. 64 keeps libtorch's
// alignment of the data.
constexpr size_t kHeader = 64;
struct Header {
  c10::DataPtr inner;
  size_t bytes = 0;
};

void freeBlock(void* data) {
  if (data == nullptr) return;
  auto* slot = reinterpret_cast<Header**>(static_cast<char*>(data) - kHeader);
  Header* h = *slot;
  g_live.fetch_sub(static_cast<int64_t>(h->bytes), std::memory_order_relaxed);
  delete h;  // frees the block through the wrapped allocator's deleter
}

class CountingCpuAllocator final : public c10::Allocator {
 public:
  explicit CountingCpuAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr block = inner_->allocate(n + kHeader);
    char* base = static_cast<char*>(block.get());
    auto* h = new Header{std::move(block), n};
    *reinterpret_cast<Header**>(base) = h;
    const int64_t live = g_live.fetch_add(static_cast<int64_t>(n), std::memory_order_relaxed) + static_cast<int64_t>(n);
    int64_t peak = g_peak.load(std::memory_order_relaxed);
    while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
    }
    void* data = base + kHeader;
    return {data, data, &freeBlock, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &freeBlock; }

 private:
  c10::Allocator* inner_;
};

std::once_flag g_once;
std::atomic<bool> g_tracked{false};

}  // namespace

void trackTensorMemory() {
  std::call_once(g_once, [] {
    // Never freed: tensors counted by it may outlive every other object.
    static auto* counting = new CountingCpuAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(counting, /*priority=*/100);
    g_tracked = c10::GetCPUAllocator() == counting;
  });
}

bool tensorMemoryTracked() { return g_tracked.load(); }

TensorMemory tensorMemory() { return {g_live.load(), g_peak.load()}; }

void resetTensorMemoryPeak() { g_peak.store(g_live.load()); }

}  // namespace archipelago::model
