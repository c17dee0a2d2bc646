// Everything that differs between the libtorch versions Archipelago builds
// against, in one place: Debian's libtorch 1.13 (the CPU flavour CI runs)
// and the libtorch of a current PyTorch installation (the CUDA flavour,
// docs/devices.md "Build flavours"). Code elsewhere uses only what both
// provide, or asks here.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>

#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/torch.h>
#include <torch/version.h>

#define ARCH_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// float8 dtypes (at::kFloat8_e4m3fn, at::kFloat8_e5m2) and at::_scaled_mm
// arrived in PyTorch 2.1; 2.1-2.3 return (out, amax), later versions out.
#define ARCH_TORCH_HAS_FLOAT8 ARCH_TORCH_AT_LEAST(2, 1)

// c10d's collective libraries (Gloo, NCCL) derive from c10d::ProcessGroup
// in 1.13 and from c10d::Backend since 2.0; both have the collectives
// runtime/c10d_backend.cpp calls (allreduce, allgather -> Work).
namespace c10d {
class Backend;
class ProcessGroup;
}  // namespace c10d

namespace archipelago::model::compat {

#if ARCH_TORCH_AT_LEAST(2, 0)
using C10dCollectives = ::c10d::Backend;
#else
using C10dCollectives = ::c10d::ProcessGroup;
#endif

// Causal attention over whole sequences (query i sees keys 0..i) through
// the fused kernel of PyTorch >= 2.0 (at::scaled_dot_product_attention:
// flash or memory-efficient attention on a GPU, which never writes the
// [T, T] scores to memory), or an undefined tensor where the caller's
// explicit form must run: libtorch 1.13, the CPU (so the CPU flavour and
// the fp64 references compute one way whatever the libtorch), fp64.
inline torch::Tensor fusedCausalAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
#if ARCH_TORCH_AT_LEAST(2, 0)
  if (!q.is_cpu() && q.scalar_type() != torch::kDouble) {
    return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/c10::nullopt, /*dropout_p=*/0.0,
                                            /*is_causal=*/true);
  }
#endif
  (void)q, (void)k, (void)v;
  return {};
}

// Devices of `type` that libtorch can drive (1 for the CPU, 0 when no
// backend of that type is compiled in or registered).
inline int64_t deviceCount(c10::DeviceType type) {
  if (type == c10::DeviceType::CPU) return 1;
  if (!c10::impl::hasDeviceGuardImpl(type)) return 0;
  return c10::impl::getDeviceGuardImpl(type)->deviceCount();
}

// Host memory the device can copy from and to asynchronously: page-locked
// where the device is an accelerator with a pinned allocator (CUDA / ROCm),
// ordinary memory otherwise (the CPU needs no staging at all).
inline torch::TensorOptions hostStagingOptions(const torch::Device& device, torch::ScalarType dtype) {
  auto o = torch::TensorOptions().dtype(dtype).device(torch::kCPU);
  return device.is_cuda() ? o.pinned_memory(true) : o;
}

// Waits until every operation queued on `device` has finished (timings
// of asynchronous devices are meaningless without it). No-op on the CPU.
inline void synchronize(const torch::Device& device) {
  if (device.is_cpu()) return;
  if (c10::impl::hasDeviceGuardImpl(device.type())) {
    const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
    impl->getStream(device).synchronize();
  }
}

// PyTorch's own mixed precision (autocast: fp32 parameters, matmuls in
// `dtype`, reductions kept in fp32) for the span of a forward, as a user of
// bare libtorch writes it: the baseline bench/overhead_torch.cpp holds our
// bf16 path against, so it must not be that path. Backward runs outside the
// scope, as in Python; the weights' casts are cached for one forward and
// dropped when the outermost scope closes. 2.4 made the switches per device
// type; 1.13 has them for the CPU and CUDA only.
class AutocastScope {
 public:
  AutocastScope(c10::DeviceType type, torch::ScalarType dtype) : type_(type) {
#if ARCH_TORCH_AT_LEAST(2, 4)
    was_on_ = at::autocast::is_autocast_enabled(type);
    was_dtype_ = at::autocast::get_autocast_dtype(type);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::set_autocast_dtype(type, dtype);
#else
    TORCH_CHECK(type == c10::DeviceType::CPU || type == c10::DeviceType::CUDA,
                "autocast on ", c10::DeviceTypeName(type), " needs libtorch >= 2.4");
    const bool cpu = type == c10::DeviceType::CPU;
    was_on_ = cpu ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
    was_dtype_ = cpu ? at::autocast::get_autocast_cpu_dtype() : at::autocast::get_autocast_gpu_dtype();
    cpu ? at::autocast::set_cpu_enabled(true) : at::autocast::set_enabled(true);
    cpu ? at::autocast::set_autocast_cpu_dtype(dtype) : at::autocast::set_autocast_gpu_dtype(dtype);
#endif
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
#if ARCH_TORCH_AT_LEAST(2, 4)
    at::autocast::set_autocast_enabled(type_, was_on_);
    at::autocast::set_autocast_dtype(type_, was_dtype_);
#else
    const bool cpu = type_ == c10::DeviceType::CPU;
    cpu ? at::autocast::set_cpu_enabled(was_on_) : at::autocast::set_enabled(was_on_);
    cpu ? at::autocast::set_autocast_cpu_dtype(was_dtype_) : at::autocast::set_autocast_gpu_dtype(was_dtype_);
#endif
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool was_on_ = false;
  torch::ScalarType was_dtype_ = torch::kFloat32;
};

// A tensor's memory released and taken back while every view of it (the
// module's parameters, the tensors autograd saved) stays valid: the
// storage keeps its identity and allocator, only its bytes come and go, as
// FSDP frees gathered parameters between uses. Values after reallocation
// are undefined until written. Device-generic (the storage's own
// allocator: the CUDA caching allocator on a GPU).
inline void freeStorage(const torch::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  s->set_data_ptr_noswap(at::DataPtr(nullptr, s->device()));
  s->set_nbytes(0);
}
// The same as a hand-over: the memory leaves the storage (to be kept for
// reuse) and comes back, or new memory from the storage's allocator.
inline at::DataPtr takeStorage(const torch::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  s->set_nbytes(0);
  return s->set_data_ptr(at::DataPtr(nullptr, s->device()));
}
inline void giveStorage(const torch::Tensor& t, at::DataPtr&& data, size_t nbytes) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  s->set_data_ptr_noswap(std::move(data));
  s->set_nbytes(nbytes);
}
inline at::DataPtr allocateFor(const torch::Tensor& t, size_t nbytes) {
  return t.storage().unsafeGetStorageImpl()->allocator()->allocate(nbytes);
}
inline bool storageHeld(const torch::Tensor& t) { return t.storage().nbytes() > 0; }

}  // namespace archipelago::model::compat

// ===== FP8 GEMMs (PyTorch >= 2.1) =====================================================
// Compiled only against a libtorch with float8 dtypes (the CUDA flavour); the
// CPU flavour (libtorch 1.13) has none, so this block has not been compiled
// where it was written. model/fp8.cpp is its only user.
#if ARCH_TORCH_HAS_FLOAT8
namespace archipelago::model::compat {

inline torch::ScalarType float8Dtype(bool e4m3) { return e4m3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2; }

// a [M, K] row-major and b [K, N] column-major FP8 tensors; scale_a and
// scale_b fp32 scalars the product is multiplied by (dequantisation
// factors); accumulation in fp32, the result in out_dtype.
inline torch::Tensor scaledMm(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& scale_a,
                              const torch::Tensor& scale_b, torch::ScalarType out_dtype) {
#if ARCH_TORCH_AT_LEAST(2, 4)
  // 2.4 made the scales required and returns the product alone.
  return at::_scaled_mm(a, b, scale_a, scale_b, /*bias=*/c10::nullopt, /*scale_result=*/c10::nullopt, out_dtype);
#else
  // 2.1-2.3: (bias, out_dtype, scale_a, scale_b, ...) -> (product, amax).
  return std::get<0>(at::_scaled_mm(a, b, /*bias=*/c10::nullopt, out_dtype, scale_a, scale_b));
#endif
}

// Whether `device` runs FP8 GEMMs (CUDA, compute capability >= 8.9: Ada,
// Hopper and later). Probed once per device with a 16x16 product rather than
// by reading the capability, which would need the CUDA headers here.
inline bool fp8GemmAvailable(const torch::Device& device) {
  if (!device.is_cuda()) return false;
  static std::mutex mu;
  static std::map<int, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  const int index = device.has_index() ? device.index() : -1;
  auto it = known.find(index);
  if (it != known.end()) return it->second;
  bool ok = false;
  try {
    auto a = torch::zeros({16, 16}, torch::TensorOptions().device(device)).to(float8Dtype(true));
    auto one = torch::ones({}, torch::TensorOptions().device(device));
    ok = scaledMm(a, a.t(), one, one, torch::kBFloat16).defined();
  } catch (const c10::Error&) {
    ok = false;  // e.g. "torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9"
  }
  known[index] = ok;
  return ok;
}

}  // namespace archipelago::model::compat
#endif  // ARCH_TORCH_HAS_FLOAT8
