// `archipelago bench comm`: nccl-tests style measurement of our collectives
// on this machine, with Gloo's allreduce algorithms (ring, ring_chunked,
// halving_doubling, bcube) measured in the same run as the yardstick. Forks `ranks` worker processes that rendezvous through an
// in-process coordinator on 127.0.0.1 (port 0). Rank 0 prints a table plus
// one JSON line per row to stdout.
//
// algbw = bytes / time; busbw = algbw x 2(n-1)/n (allreduce),
// (n-1)/n (allgather, reduce-scatter), 1 (broadcast, alltoall: (n-1)/n).
// With an emulated strait the ranks are split into two islands and rows
// also report strait_frac = (algbw x 2(L-1)/L) / strait bandwidth: the share
// of the strait's capacity that the collective kept busy (L = islands).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::comm {

struct CommBenchOptions {
  int ranks = 4;
  std::vector<uint64_t> sizes;          // bytes per rank buffer; empty = default list
  std::vector<std::string> ops;         // allreduce, hier_allreduce, allgather, reduce_scatter,
                                        // broadcast, alltoall, failure; empty = default
  std::string strait;                   // "1Gbit/s,20ms[,jitter[,loss]]"; empty = no emulation
  std::string codec = "none";           // codec on the cross-island leg (hier_allreduce rows)
  bool gloo = true;                     // also run Gloo's allreduce algorithms (if built with Gloo)
  int streams = 4;                      // TCP streams per peer pair across straits / hosts
  int local_streams = 1;                // TCP streams between ranks on this host
  uint64_t chunk_bytes = 1 << 20;
  int ring_max_pieces = 4;              // CommOptions::ring_max_pieces
  uint32_t frame_bytes = 256 << 10;     // CommOptions::max_frame_bytes
  int iters = 0;                        // 0 = chosen per size
  int rounds = 3;                       // alternating rounds per row; the best round is reported
  bool same_host_copy = true;           // false: bulk bytes go through TCP even between local ranks
                                        // (true: allreduce rows show both paths, archipelago and
                                        // archipelago_tcp)
  std::vector<std::string> impls;       // rows to run: archipelago, archipelago_tcp, gloo_*; empty = all
  std::string dtype = "f32";
  std::string checksum = "auto";        // CommOptions::checksum: auto | on | off (A/B of the frame CRC)
  // The multi-host test bed (tests/netns/hosts.sh): rank i runs in network
  // namespace netns[i] (one name per rank; empty = all here), and the
  // coordinator listens on coordinator_host, an address every namespace reaches.
  std::vector<std::string> netns;
  std::string coordinator_host = "127.0.0.1";
  bool kernel_shaped = false;           // --strait is a real link's rate (tc), not emulated
};

core::Status runCommBench(const CommBenchOptions& options);
bool glooAvailable();

}  // namespace archipelago::comm
