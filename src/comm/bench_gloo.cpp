// Gloo's allreduce algorithms for `archipelago bench comm` (bench_gloo.h).
#include "comm/bench_gloo.h"

#if defined(ARCHIPELAGO_HAS_GLOO)
#include <gloo/allreduce.h>
#include <gloo/allreduce_halving_doubling.h>
#include <gloo/allreduce_ring_chunked.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#endif

namespace archipelago::comm {

struct GlooYardstick::Impl {
#if defined(ARCHIPELAGO_HAS_GLOO)
  int rank = 0, world = 0;
  std::string store_dir;
  std::shared_ptr<gloo::transport::Device> device;
  int contexts = 0;
  // Ring and bcube (the collective API, tag-addressed buffers).
  std::shared_ptr<gloo::rendezvous::Context> ctx;
  // A full mesh of its own. The algorithm classes claim slots with
  // Context::nextSlot and register buffers with the pairs; sharing a
  // context with the collective API slowed gloo_ring 30x here (and hung
  // a run with all four), so each of them gets a fresh one.
  std::shared_ptr<gloo::rendezvous::Context> newContext() {
    gloo::rendezvous::FileStore store(store_dir);
    gloo::rendezvous::PrefixStore prefix("bench" + std::to_string(contexts++), store);
    auto c = std::make_shared<gloo::rendezvous::Context>(rank, world);
    c->setTimeout(std::chrono::seconds(120));
    c->connectFullMesh(prefix, device);
    return c;
  }
#endif
};

GlooYardstick::GlooYardstick(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GlooYardstick::~GlooYardstick() = default;

std::unique_ptr<GlooYardstick> GlooYardstick::connect(int rank, int world, const std::string& host,
                                                      const std::string& store_dir, std::string* error) {
#if defined(ARCHIPELAGO_HAS_GLOO)
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = host;
    auto impl = std::make_unique<Impl>();
    impl->rank = rank;
    impl->world = world;
    impl->store_dir = store_dir;
    impl->device = gloo::transport::tcp::CreateDevice(attr);
    impl->ctx = impl->newContext();
    return std::unique_ptr<GlooYardstick>(new GlooYardstick(std::move(impl)));
  } catch (const std::exception& e) {
    *error = std::string("gloo setup failed: ") + e.what();
    return nullptr;
  }
#else
  (void)rank;
  (void)world;
  (void)store_dir;
  (void)host;
  *error = "this build has no Gloo (ARCHIPELAGO_WITH_GLOO)";
  return nullptr;
#endif
}

#if defined(ARCHIPELAGO_HAS_GLOO)
namespace {

// Runs one Gloo call, turning its exceptions into a status.
template <typename F>
core::Status guarded(F&& f) {
  try {
    f();
    return core::okStatus();
  } catch (const std::exception& e) {
    return core::unavailable(std::string("gloo: ") + e.what());
  }
}

}  // namespace
#endif

std::vector<GlooYardstick::Algo> GlooYardstick::allreduceAlgorithms(float* data, size_t count) {
  std::vector<Algo> out;
#if defined(ARCHIPELAGO_HAS_GLOO)
  auto ctx = impl_->ctx;
  // The collective API (gloo/allreduce.h): RING and BCUBE.
  auto modern = [ctx, data, count](gloo::AllreduceOptions::Algorithm algo) {
    return [ctx, data, count, algo] {
      return guarded([&] {
        gloo::AllreduceOptions o(ctx);
        o.setAlgorithm(algo);
        o.setInput(data, count);
        o.setOutput(data, count);
        o.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
        gloo::allreduce(o);
      });
    };
  };
  out.push_back({"gloo_ring", modern(gloo::AllreduceOptions::Algorithm::RING)});
  // The algorithm classes: built once per buffer (they register their
  // staging buffers with the pairs), run per op, each on its own context.
  std::vector<float*> ptrs{data};
  try {
    auto chunked =
        std::make_shared<gloo::AllreduceRingChunked<float>>(impl_->newContext(), ptrs, static_cast<int>(count));
    out.push_back({"gloo_ring_chunked", [chunked] { return guarded([&] { chunked->run(); }); }});
    auto hd =
        std::make_shared<gloo::AllreduceHalvingDoubling<float>>(impl_->newContext(), ptrs, static_cast<int>(count));
    out.push_back({"gloo_halving_doubling", [hd] { return guarded([&] { hd->run(); }); }});
  } catch (const std::exception& e) {
    std::string why = std::string("gloo setup failed: ") + e.what();
    out.push_back({"gloo_ring_chunked", [why] { return core::unavailable(why); }});
  }
  out.push_back({"gloo_bcube", modern(gloo::AllreduceOptions::Algorithm::BCUBE)});
#else
  (void)data;
  (void)count;
#endif
  return out;
}

}  // namespace archipelago::comm
