// A tensor's elements where the comm layer (which works on host memory by
// pointer) can read and write them: the tensor itself when it is
// contiguous host memory of the wanted dtype (no copy: the CPU's common
// case), otherwise a host copy that land() writes back. The gradient
// bucketer keeps its own reusable, page-locked buffers for the hot path;
// this is for the paths that run once per step or less (docs/runtime.md
// "Devices").
#pragma once

#include <torch/torch.h>

namespace archipelago::runtime {

class HostView {
 public:
  HostView(torch::Tensor t, torch::ScalarType dtype) : t_(std::move(t)) {
    staged_ = !t_.device().is_cpu() || t_.scalar_type() != dtype || !t_.is_contiguous();
    host_ = staged_ ? t_.detach().to(torch::kCPU, dtype).contiguous() : t_;
  }
  torch::Tensor& host() { return host_; }
  template <typename T> T* data() { return host_.data_ptr<T>(); }
  // The host copy's values back into the tensor (no-op without one).
  void land() {
    if (!staged_) return;
    torch::NoGradGuard ng;
    t_.copy_(host_);
  }

 private:
  torch::Tensor t_;
  torch::Tensor host_;
  bool staged_ = false;
};

}  // namespace archipelago::runtime
