// Internal to `archipelago bench comm`: Gloo's allreduce algorithms, the
// yardstick measured in the same run as ours. Every algorithm Debian's Gloo
// offers for a float sum is a row (gloo_ring, gloo_ring_chunked,
// gloo_halving_doubling, gloo_bcube), so the bench compares against the
// best of them, not against one chosen to lose.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::comm {

// Gloo's TCP transport over 127.0.0.1, one full mesh per bench process.
class GlooYardstick {
 public:
  struct Algo {
    std::string impl;                   // row label, e.g. "gloo_ring_chunked"
    std::function<core::Status()> run;  // one allreduce (sum, in place) of the bound buffer
  };
  // Rendezvous of `world` ranks through files in `store_dir`, this rank's
  // Gloo listening on `host`. Returns null and sets *error when this build
  // has no Gloo or the rendezvous failed.
  static std::unique_ptr<GlooYardstick> connect(int rank, int world, const std::string& host,
                                                const std::string& store_dir, std::string* error);
  ~GlooYardstick();
  // One closure per algorithm, each an in-place float sum allreduce of
  // data[0..count). Every rank must call this in the same order (the
  // legacy algorithms register their buffers with the context).
  std::vector<Algo> allreduceAlgorithms(float* data, size_t count);

 private:
  struct Impl;
  explicit GlooYardstick(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// True when `impl` names a Gloo row.
inline bool isGlooImpl(const std::string& impl) { return impl.rfind("gloo_", 0) == 0; }

}  // namespace archipelago::comm
