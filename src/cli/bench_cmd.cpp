// archipelago bench ...: `bench comm` measures the comm layer's collectives
// (and Gloo's ring allreduce in the same run) on forked local ranks.
#include "archipelago/comm/bench.h"
#include "archipelago/core/strings.h"
#include "archipelago/core/units.h"
#include "cli/commands.h"

namespace archipelago::cli {
namespace {

// "4KB..256MB" (powers of 4 between the ends) or "4KB,1MB,64MB".
core::Result<std::vector<uint64_t>> parseSizes(const std::string& text) {
  std::vector<uint64_t> out;
  auto dots = text.find("..");
  if (dots != std::string::npos) {
    auto lo = core::parseByteSize(text.substr(0, dots));
    auto hi = core::parseByteSize(text.substr(dots + 2));
    if (!lo.isOk() || !hi.isOk() || *lo == 0 || *lo > *hi) {
      return core::invalidArgument("--sizes '" + text + "': expected LOW..HIGH like 4KB..256MB");
    }
    for (uint64_t s = *lo; s <= *hi; s *= 4) out.push_back(s);
    if (out.back() != *hi) out.push_back(*hi);
    return out;
  }
  for (const auto& item : core::splitList(text)) {
    auto v = core::parseByteSize(item);
    if (!v.isOk()) return core::invalidArgument("--sizes: '" + item + "' is not a size like 64MB");
    out.push_back(*v);
  }
  return out;
}

}  // namespace

void addBenchCommands(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks (nccl-tests style tables + JSON lines)");
  CLI::App* c = bench->add_subcommand("comm", "Collectives on N local ranks vs Gloo's ring allreduce");
  struct Opts {
    comm::CommBenchOptions o;
    std::string sizes, ops, impls, netns;
    bool no_gloo = false;
  };
  auto opts = std::make_shared<Opts>();
  c->add_option("--ranks", opts->o.ranks, "ranks (processes) to fork, 2..64")->capture_default_str();
  c->add_option("--sizes", opts->sizes, "buffer sizes: 4KB..256MB or a list 1MB,64MB (default: 4KB..64MB)");
  c->add_option("--ops", opts->ops,
                "allreduce,hier_allreduce,allgather,reduce_scatter,broadcast,alltoall,failure");
  c->add_option("--strait", opts->o.strait, "EMULATED strait between two islands: \"1Gbit/s,20ms[,jitter[,loss]]\"");
  c->add_option("--codec", opts->o.codec, "codec on the cross-island leg of hier_allreduce (int8, bf16, fp8_e4m3, ...)")
      ->capture_default_str();
  c->add_flag("--gloo,!--no-gloo", opts->o.gloo, "also run Gloo's allreduce algorithms: ring, ring_chunked, halving_doubling, bcube (default on)");
  c->add_option("--streams", opts->o.streams, "TCP streams per peer pair across a strait")->capture_default_str();
  c->add_option("--local-streams", opts->o.local_streams, "TCP streams between ranks on this host")
      ->capture_default_str();
  c->add_option("--chunk", opts->o.chunk_bytes, "ring pipeline chunk in bytes")->capture_default_str();
  c->add_option("--frame", opts->o.frame_bytes, "payload bytes per TCP frame on fast links (4096..16777216)")
      ->capture_default_str();
  c->add_option("--ring-pieces", opts->o.ring_max_pieces, "at most this many ring pipeline pieces per block (1..64)")
      ->capture_default_str();
  c->add_option("--iters", opts->o.iters, "timed iterations per row (0 = by size)")->capture_default_str();
  c->add_flag("!--no-same-host-copy", opts->o.same_host_copy,
              "send bulk bytes between local ranks over TCP too (no process_vm_readv single copy)");
  c->add_option("--checksum", opts->o.checksum, "frame CRC32C: auto (per link, docs/comm.md), on, off")
      ->capture_default_str();
  c->add_option("--rounds", opts->o.rounds, "alternating rounds per row (best reported)")->capture_default_str();
  c->add_option("--impls", opts->impls,
                "only these rows: archipelago,archipelago_tcp,tcp_floor,gloo_ring,gloo_ring_chunked,"
                "gloo_halving_doubling,gloo_bcube (default: all); archipelago_tcp_ring, archipelago_tcp_halving_doubling, "
                "archipelago_tcp_recursive_doubling (TCP only, that algorithm forced) run only when named");
  c->add_option("--netns", opts->netns,
                "run rank i in network namespace i of this list (one per rank; needs root; tests/netns/hosts.sh)");
  c->add_option("--coordinator-host", opts->o.coordinator_host,
                "where the bench's coordinator listens (with --netns: an address every namespace reaches)")
      ->capture_default_str();
  c->add_flag("--kernel-shaped", opts->o.kernel_shaped,
              "the --strait rate is enforced by the kernel (tc tbf) on a real link: islands, but no emulation");
  setAction(c, [opts]() -> core::Status {
    comm::CommBenchOptions o = opts->o;
    if (!opts->sizes.empty()) {
      ARCH_ASSIGN_OR_RETURN(o.sizes, parseSizes(opts->sizes));
    }
    if (!opts->ops.empty()) o.ops = core::splitList(opts->ops);
    if (!opts->impls.empty()) o.impls = core::splitList(opts->impls);
    if (!opts->netns.empty()) o.netns = core::splitList(opts->netns);
    return comm::runCommBench(o);
  });
}

}  // namespace archipelago::cli
