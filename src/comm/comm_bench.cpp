// `archipelago bench comm`: see include/archipelago/comm/bench.h.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "archipelago/comm/bench.h"
#include "archipelago/comm/communicator.h"
#include "archipelago/comm/wire.h"
#include "archipelago/core/hash.h"
#include "archipelago/core/log.h"
#include "archipelago/core/units.h"
#include "comm/bench_gloo.h"
#include "comm/bench_tcp_floor.h"
#include "comm/launch_local.h"


namespace archipelago::comm {

bool glooAvailable() {
#if defined(ARCHIPELAGO_HAS_GLOO)
  return true;
#else
  return false;
#endif
}

namespace {

float benchValue(int rank, size_t i) {
  uint64_t h = core::mix64(static_cast<uint64_t>(rank) * 0x100000001b3ULL + i);
  return static_cast<float>(static_cast<double>(h >> 40) / static_cast<double>(1ULL << 24) * 2.0 - 1.0);
}

struct Row {
  std::string op;
  std::string impl = "archipelago";
  uint64_t bytes = 0;
  int iters = 0;
  double time_s = 0;  // per op, max over ranks
  double algbw = 0, busbw = 0;
  double strait_frac = -1;
  std::string codec;
  double wire_bytes = -1;  // strait bytes per op, all ranks
  double wire_ratio = -1;
  double max_abs = -1, max_rel = -1;
  std::string note;
};

double busFactor(const std::string& op, int n) {
  if (op == "allreduce" || op == "hier_allreduce") return 2.0 * (n - 1) / n;
  if (op == "broadcast") return 1.0;
  return static_cast<double>(n - 1) / n;
}

void printHeader(bool strait) {
  std::printf("%-15s %-16s %10s %6s %11s %10s %10s", "op", "impl", "size", "iters", "time(us)", "algbw", "busbw");
  if (strait) std::printf(" %8s", "strait%");
  std::printf(" %s\n", "notes");
  std::printf("%-15s %-16s %10s %6s %11s %10s %10s", "", "", "(bytes)", "", "", "(GB/s)", "(GB/s)");
  if (strait) std::printf(" %8s", "");
  std::printf("\n");
}

void printRow(const Row& r, bool strait) {
  std::printf("%-15s %-16s %10llu %6d %11.1f %10.4f %10.4f", r.op.c_str(), r.impl.c_str(),
              static_cast<unsigned long long>(r.bytes), r.iters, r.time_s * 1e6, r.algbw / 1e9, r.busbw / 1e9);
  if (strait) {
    if (r.strait_frac >= 0) std::printf(" %7.1f%%", r.strait_frac * 100);
    else std::printf(" %8s", "-");
  }
  std::string notes = r.note;
  if (!r.codec.empty()) {
    char buf[256];
    std::snprintf(buf, sizeof(buf), "codec=%s wire=%s (%.1f%% of fp32) max_abs=%.3g max_rel=%.3g", r.codec.c_str(),
                  core::formatBytes(r.wire_bytes).c_str(), r.wire_ratio * 100, r.max_abs, r.max_rel);
    notes += (notes.empty() ? "" : " ") + std::string(buf);
  } else if (r.max_abs >= 0) {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "max_abs=%.3g", r.max_abs);
    notes += (notes.empty() ? "" : " ") + std::string(buf);
  }
  std::printf(" %s\n", notes.c_str());
  nlohmann::json j{{"bench", "comm"}, {"op", r.op}, {"impl", r.impl}, {"bytes", r.bytes}, {"iters", r.iters},
                   {"time_us", r.time_s * 1e6}, {"algbw_GBps", r.algbw / 1e9}, {"busbw_GBps", r.busbw / 1e9}};
  if (r.strait_frac >= 0) j["strait_fraction"] = r.strait_frac;
  if (!r.codec.empty()) {
    j["codec"] = r.codec;
    j["wire_bytes"] = r.wire_bytes;
    j["wire_ratio_vs_fp32"] = r.wire_ratio;
  }
  if (r.max_abs >= 0) {
    j["max_abs_err"] = r.max_abs;
    j["max_rel_err"] = r.max_rel;
  }
  if (!r.note.empty()) j["note"] = r.note;
  std::printf("JSON %s\n", j.dump().c_str());
  std::fflush(stdout);
}

int itersFor(uint64_t bytes, int fixed, double strait_bw) {
  if (fixed > 0) return fixed;
  // About 256 MB moved per row on loopback, less over a slow strait.
  double budget = strait_bw > 0 ? std::max(strait_bw * 1.0, 4e6) : 256e6;
  return static_cast<int>(std::clamp(budget / static_cast<double>(std::max<uint64_t>(bytes, 1)), 2.0, 50.0));
}

// The TCP floor row against the others: how far each row is from what the
// kernel alone needs for the ring's bytes, and the most "x Gloo" any TCP
// allreduce could reach here.
void printFloorShares(const std::vector<std::pair<std::string, double>>& busbw_of, const std::string& size,
                      const std::string& best_gloo, double best_gloo_bw) {
  double floor = 0;
  for (const auto& [impl, bw] : busbw_of) {
    if (impl == "tcp_floor") floor = bw;
  }
  if (floor <= 0) return;
  std::string shares;
  nlohmann::json of_floor = nlohmann::json::object();
  for (const auto& [impl, bw] : busbw_of) {
    if (impl == "tcp_floor") continue;
    char one[96];
    std::snprintf(one, sizeof(one), "%s%s %.0f%%", shares.empty() ? "" : ", ", impl.c_str(), 100 * bw / floor);
    shares += one;
    of_floor[impl] = bw / floor;
  }
  std::printf("# allreduce %s: tcp_floor (the ring's bytes through plain sockets, no reduction) busbw %.3f GB/s; "
              "each row's share of it: %s\n", size.c_str(), floor / 1e9, shares.c_str());
  nlohmann::json j{{"bench", "comm"}, {"op", "allreduce"}, {"bytes_label", size}, {"tcp_floor_busbw", floor},
                   {"share_of_tcp_floor", of_floor}};
  if (best_gloo_bw > 0) {
    std::printf("# allreduce %s: tcp_floor / best Gloo (%s) = %.2fx: the most any allreduce over TCP can reach "
                "against Gloo on these hosts\n", size.c_str(), best_gloo.c_str(), floor / best_gloo_bw);
    j["floor_over_best_gloo"] = floor / best_gloo_bw;
  }
  std::printf("JSON %s\n", j.dump().c_str());
}

// After the allreduce rows of one size: each of our rows against every Gloo
// algorithm and against the best of them (the honest yardstick).
void printGlooRatios(const std::vector<std::pair<std::string, double>>& busbw_of, uint64_t bytes,
                     bool same_host_copy) {
  std::string best_impl;
  double best = 0;
  for (const auto& [impl, bw] : busbw_of) {
    if (isGlooImpl(impl) && bw > best) {
      best = bw;
      best_impl = impl;
    }
  }
  const std::string size = core::formatBytes(static_cast<double>(bytes));
  printFloorShares(busbw_of, size, best_impl, best);
  if (best <= 0) return;
  for (const auto& [impl, bw] : busbw_of) {
    if (isGlooImpl(impl) || impl == "tcp_floor") continue;
    std::string vs;
    for (const auto& [g, gbw] : busbw_of) {
      if (!isGlooImpl(g)) continue;
      char one[96];
      std::snprintf(one, sizeof(one), "%s%s %.2fx", vs.empty() ? "" : ", ", g.c_str(), bw / gbw);
      vs += one;
    }
    std::printf("# allreduce %s: %s busbw / best Gloo (%s) busbw = %.2fx  [%s]  (%s)\n", size.c_str(), impl.c_str(),
                best_impl.c_str(), bw / best, vs.c_str(),
                impl == "archipelago_tcp" || !same_host_copy
                    ? "every byte over TCP, like Gloo"
                    : "same-host single copy (process_vm_readv) for messages >= 64 KiB");
    nlohmann::json j{{"bench", "comm"}, {"op", "allreduce"}, {"ratio_of", impl}, {"bytes", bytes},
                     {"best_gloo", best_impl}, {"ratio_to_best_gloo", bw / best}};
    std::printf("JSON %s\n", j.dump().c_str());
  }
  std::fflush(stdout);
}

struct BenchCtx {
  const CommBenchOptions* opt;
  core::StraitSpec strait;
  bool emulated = false;  // islands > 1: the strait is shaped in userspace (EMULATED) or by the kernel
  int islands = 1;
};

std::string rankMain(const LocalRank& lr, const BenchCtx& bc) {
  const CommBenchOptions& opt = *bc.opt;
  const int n = lr.world, me = lr.rank;
  CommConfig cfg;
  cfg.options.streams = opt.streams;
  cfg.options.local_streams = opt.local_streams;
  cfg.options.chunk_bytes = opt.chunk_bytes;
  cfg.options.ring_max_pieces = opt.ring_max_pieces;
  cfg.options.max_frame_bytes = opt.frame_bytes;
  cfg.options.heartbeat_timeout_s = 5;
  cfg.options.same_host_copy = opt.same_host_copy;
  cfg.options.checksum = opt.checksum;
  if (bc.islands > 1) {
    core::IslandSpec a, b;
    a.name = "islandA";
    b.name = "islandB";
    a.count = (n + 1) / 2;
    b.count = n / 2;
    cfg.cluster.islands = {a, b};
    cfg.cluster.straits = {bc.strait};
    cfg.cluster.straits[0].emulate = bc.emulated ? "true" : "false";
    for (int r = 0; r < n; ++r) cfg.island_of_rank.push_back(r < (n + 1) / 2 ? 0 : 1);
  }
  core::setLogIdentity("bench r" + std::to_string(me));
  if (me != 0) core::setLogLevel("warn");
  auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(60));
  if (!cr.isOk()) return cr.status().toString();
  Group& g = *cr->world;
  if (me == 0) {
    for (const auto& line : cr->comm->emulationSummary()) std::printf("# %s\n", line.c_str());
    std::printf("# archipelago bench comm: %d ranks %s, %d streams/peer on straits, "
                "%d between local ranks, chunk %s (at most %d pieces per block), checksum %s, same-host copy %s%s\n",
                n, opt.netns.empty() ? "on this machine (127.0.0.1)" : "in network namespaces (one per host)",
                opt.streams, opt.local_streams, core::formatBytes(static_cast<double>(opt.chunk_bytes)).c_str(),
                opt.ring_max_pieces, opt.checksum.c_str(),
                opt.same_host_copy ? "on (row archipelago; row archipelago_tcp sends every byte over TCP)"
                                   : "off (all bytes over TCP)",
                bc.islands == 1 ? ""
                : bc.emulated   ? ", 2 islands joined by an EMULATED strait"
                                : ", 2 islands joined by a real link (shaped by the kernel, not by us)");
  }
  auto maxOver = [&](double v) -> core::Result<double> {
    double x = v;
    ARCH_RETURN_IF_ERROR(g.allreduce(&x, 1, DType::kF64, ReduceOp::kMax, OpOptions::within(60)));
    return x;
  };
  auto sumOver = [&](double v) -> core::Result<double> {
    double x = v;
    ARCH_RETURN_IF_ERROR(g.allreduce(&x, 1, DType::kF64, ReduceOp::kSum, OpOptions::within(60)));
    return x;
  };

  std::unique_ptr<GlooYardstick> gloo;
  if (opt.gloo) {
    std::string error;
    gloo = GlooYardstick::connect(me, n, lr.listen.empty() ? "127.0.0.1" : lr.listen,
                                  "/tmp/archipelago-gloo-" + std::to_string(::getppid()), &error);
    if (!gloo) return error;
  }

  // The TCP floor (bench_tcp_floor.h): the bound below every TCP row.
  const bool want_floor = !bc.emulated && bc.islands == 1 && n > 1 &&
                          std::find(opt.ops.begin(), opt.ops.end(), "allreduce") != opt.ops.end() &&
                          (opt.impls.empty() ||
                           std::find(opt.impls.begin(), opt.impls.end(), "tcp_floor") != opt.impls.end());
  std::unique_ptr<TcpFloor> floor;
  if (want_floor) {
    auto fr = TcpFloor::connect(g, lr.listen.empty() ? "127.0.0.1" : lr.listen);
    if (!fr.isOk()) return fr.status().toString();
    floor = std::move(*fr);
  }

  std::vector<std::string> ops = opt.ops;
  bool printed_header = false;
  const double strait_bw = bc.islands > 1 ? bc.strait.bandwidth : 0;
  for (const std::string& op : ops) {
    if (op == "failure") continue;  // last, below
    for (uint64_t size : opt.sizes) {
      const DType dt = DType::kF32;
      const size_t es = 4;
      size_t count = std::max<size_t>(size / es, static_cast<size_t>(n));
      const uint64_t bytes = count * es;
      const int iters = itersFor(bytes, opt.iters, strait_bw);
      std::vector<float> buf(count), out;
      std::vector<size_t> counts;
      std::vector<Row> rows;
      auto fill = [&] {
        for (size_t i = 0; i < count; ++i) buf[i] = benchValue(me, i);
      };
      // Each variant: (impl label, codec, callable)
      struct Variant {
        std::string impl;
        CodecKind codec = CodecKind::kNone;
        std::function<core::Status()> fn;
      };
      std::vector<Variant> variants;
      if (op == "allreduce") {
        variants.push_back({"archipelago", CodecKind::kNone, [&] {
                              return g.allreduce(buf.data(), count, dt, ReduceOp::kSum, OpOptions::within(600));
                            }});
        if (opt.same_host_copy && !bc.emulated) {
          // Same op with every byte through TCP (no process_vm_readv), the
          // like-for-like comparison with Gloo's TCP transport.
          variants.push_back({"archipelago_tcp", CodecKind::kNone, [&] {
                                OpOptions o = OpOptions::within(600);
                                o.same_host_copy = false;
                                return g.allreduce(buf.data(), count, dt, ReduceOp::kSum, o);
                              }});
          // The same, each algorithm forced: rows run only when --impls
          // names them (choosing the auto thresholds).
          for (auto [name, algo] : {std::pair{"ring", AllreduceAlgo::kRing},
                                    std::pair{"halving_doubling", AllreduceAlgo::kHalvingDoubling},
                                    std::pair{"recursive_doubling", AllreduceAlgo::kRecursiveDoubling}}) {
            const std::string impl = std::string("archipelago_tcp_") + name;
            if (std::find(opt.impls.begin(), opt.impls.end(), impl) == opt.impls.end()) continue;
            variants.push_back({impl, CodecKind::kNone, [&, algo] {
                                  OpOptions o = OpOptions::within(600);
                                  o.same_host_copy = false;
                                  o.algo = algo;
                                  return g.allreduce(buf.data(), count, dt, ReduceOp::kSum, o);
                                }});
          }
        }
        if (floor) {
          out.resize(count);
          variants.push_back({"tcp_floor", CodecKind::kNone, [&] {
                                return floor->exchange(buf.data(), out.data(), bytes);
                              }});
        }
        if (gloo) {
          for (auto& algo : gloo->allreduceAlgorithms(buf.data(), count)) {
            variants.push_back({algo.impl, CodecKind::kNone, algo.run});
          }
        }
      } else if (op == "hier_allreduce") {
        variants.push_back({"archipelago", CodecKind::kNone, [&] {
                              return g.hierarchicalAllreduce(buf.data(), count, dt, ReduceOp::kSum,
                                                             OpOptions::within(600));
                            }});
        auto ck = parseCodec(opt.codec);
        if (ck.isOk() && *ck != CodecKind::kNone) {
          CodecKind kind = *ck;
          variants.push_back({"archipelago", kind, [&, kind] {
                                OpOptions o = OpOptions::within(600);
                                o.codec = kind;
                                return g.hierarchicalAllreduce(buf.data(), count, dt, ReduceOp::kSum, o);
                              }});
        }
      } else if (op == "allgather") {
        size_t per = count / static_cast<size_t>(n);
        out.resize(per * static_cast<size_t>(n));
        variants.push_back({"archipelago", CodecKind::kNone, [&, per] {
                              return g.allgather(buf.data(), out.data(), per, dt, OpOptions::within(600));
                            }});
      } else if (op == "reduce_scatter") {
        counts.assign(static_cast<size_t>(n), count / static_cast<size_t>(n));
        counts[0] += count % static_cast<size_t>(n);
        out.resize(counts[0]);
        variants.push_back({"archipelago", CodecKind::kNone, [&] {
                              return g.reduceScatter(buf.data(), out.data(), counts, dt, ReduceOp::kSum,
                                                     OpOptions::within(600));
                            }});
      } else if (op == "broadcast") {
        variants.push_back({"archipelago", CodecKind::kNone, [&] {
                              return g.broadcast(buf.data(), count, dt, 0, OpOptions::within(600));
                            }});
      } else if (op == "alltoall") {
        size_t per = count / static_cast<size_t>(n);
        out.resize(per * static_cast<size_t>(n));
        variants.push_back({"archipelago", CodecKind::kNone, [&, per] {
                              return g.alltoall(buf.data(), out.data(), per, dt, OpOptions::within(600));
                            }});
      } else {
        return "unknown op '" + op + "' (allreduce, hier_allreduce, allgather, reduce_scatter, broadcast, alltoall, failure)";
      }
      if (!opt.impls.empty()) {  // e.g. profiling one implementation alone
        std::vector<Variant> keep;
        for (auto& v : variants) {
          if (std::find(opt.impls.begin(), opt.impls.end(), v.impl) != opt.impls.end()) keep.push_back(v);
        }
        variants = std::move(keep);
      }
      double none_wire = -1;
      std::vector<std::pair<std::string, double>> busbw_of;  // allreduce rows, for the ratios to Gloo
      // Variants are measured in alternating rounds (best round counts), so
      // load from other processes on this machine hits all of them alike.
      const int rounds = opt.rounds;
      std::vector<double> best_t(variants.size(), 1e30), best_wire(variants.size(), 0);
      for (size_t vi = 0; vi < variants.size(); ++vi) {
        fill();
        core::Status st = variants[vi].fn();  // warm-up (connections, page faults)
        if (!st.isOk()) return st.toString();
      }
      for (int round = 0; round < rounds; ++round) {
        for (size_t vi = 0; vi < variants.size(); ++vi) {
          if (auto e = g.barrier(OpOptions::within(60)); !e.isOk()) return e.toString();
          uint64_t wire0 = g.straitBytesSent();
          auto t0 = core::Clock::now();
          for (int it = 0; it < iters; ++it) {
            core::Status st = variants[vi].fn();
            if (!st.isOk()) return st.toString();
          }
          double t = core::secondsSince(t0) / iters;
          auto tmax = maxOver(t);
          if (!tmax.isOk()) return tmax.status().toString();
          if (*tmax < best_t[vi]) {
            best_t[vi] = *tmax;
            best_wire[vi] = static_cast<double>(g.straitBytesSent() - wire0) / iters;
          }
        }
      }
      for (size_t vi = 0; vi < variants.size(); ++vi) {
        auto& v = variants[vi];
        core::Status st;
        auto tmax = core::Result<double>(best_t[vi]);
        auto wsum = sumOver(best_wire[vi]);
        if (!wsum.isOk()) return wsum.status().toString();
        Row r;
        r.op = op;
        r.impl = v.impl;
        r.bytes = bytes;
        r.iters = iters;
        r.time_s = *tmax;
        r.algbw = static_cast<double>(bytes) / r.time_s;
        r.busbw = r.algbw * busFactor(op, n);
        if (bc.islands > 1 && (op == "allreduce" || op == "hier_allreduce")) {
          r.strait_frac = r.algbw * 2.0 * (bc.islands - 1) / bc.islands / bc.strait.bandwidth;
        }
        if (op == "hier_allreduce") {
          if (v.codec == CodecKind::kNone) none_wire = *wsum;
          // One more run on fresh inputs to measure the error against fp64.
          fill();
          st = v.fn();
          if (!st.isOk()) return st.toString();
          double max_abs = 0, max_ref = 0;
          for (size_t i = 0; i < count; ++i) {
            double ref = 0;
            for (int q = 0; q < n; ++q) ref += benchValue(q, i);
            max_abs = std::max(max_abs, std::abs(buf[i] - ref));
            max_ref = std::max(max_ref, std::abs(ref));
          }
          r.max_abs = max_abs;
          r.max_rel = max_abs / std::max(max_ref, 1e-30);
          if (v.codec != CodecKind::kNone) {
            r.codec = std::string(codecName(v.codec));
            r.wire_bytes = *wsum;
            r.wire_ratio = none_wire > 0 ? *wsum / none_wire : -1;
          }
        }
        if (bc.islands > 1 && (op == "allreduce" || op == "hier_allreduce")) {
          r.note = bc.emulated ? "EMULATED strait" : "kernel-shaped strait";
        }
        if (me == 0) {
          if (!printed_header) {
            printHeader(bc.islands > 1);
            printed_header = true;
          }
          printRow(r, bc.islands > 1);
          if (op == "allreduce") busbw_of.emplace_back(v.impl, r.busbw);
        }
      }
      if (me == 0) printGlooRatios(busbw_of, bytes, opt.same_host_copy);
    }
  }
  if (std::find(ops.begin(), ops.end(), "failure") != ops.end()) {
    // Rank n-1 SIGKILLs itself while every rank loops over 1 MB allreduces;
    // survivors time how long after the kill their op returned kUnavailable.
    std::vector<float> x(1 << 18, 1.0f);
    for (int it = 0; it < 1000000; ++it) {
      if (me == n - 1 && it == 5) {
        lr.shared->slot[0].store(core::nowMicros());
        ::raise(SIGKILL);
      }
      core::Status st = g.allreduce(x.data(), x.size(), DType::kF32, ReduceOp::kSum, OpOptions::within(30));
      if (!st.isOk()) {
        double detect = static_cast<double>(core::nowMicros() - lr.shared->slot[0].load()) / 1e6;
        lr.shared->slot[1 + me].store(static_cast<int64_t>(detect * 1e6) + 1);
        if (me == 0) {
          auto wait_until = core::Deadline::afterSeconds(3);
          double worst = 0;
          for (int q = 0; q < n - 1; ++q) {
            while (lr.shared->slot[1 + q].load() == 0 && !wait_until.expired()) ::usleep(1000);
            worst = std::max(worst, static_cast<double>(lr.shared->slot[1 + q].load() - 1) / 1e6);
          }
          std::printf("# failure detection: SIGKILL of rank %d during allreduce -> %s on every survivor; "
                      "slowest survivor after %.1f ms\n", n - 1, std::string(core::statusCodeName(st.code())).c_str(),
                      worst * 1e3);
          nlohmann::json j{{"bench", "comm"}, {"op", "failure"}, {"killed_rank", n - 1},
                           {"code", std::string(core::statusCodeName(st.code()))}, {"detect_ms_max", worst * 1e3},
                           {"error", st.toString()}};
          std::printf("JSON %s\n", j.dump().c_str());
          std::fflush(stdout);
        }
        break;
      }
    }
  }
  return "";
}

core::Result<core::StraitSpec> parseStrait(const std::string& text) {
  core::StraitSpec s;
  s.a = "islandA";
  s.b = "islandB";
  std::vector<std::string> parts;
  std::stringstream ss(text);
  std::string p;
  while (std::getline(ss, p, ',')) parts.push_back(p);
  if (parts.empty() || parts.size() > 4) {
    return core::invalidArgument("--strait '" + text + "': expected BANDWIDTH,LATENCY[,JITTER[,LOSS]] e.g. \"1Gbit/s,20ms\"");
  }
  auto bw = core::parseBandwidth(parts[0]);
  if (!bw.isOk()) return bw.status().withContext("--strait bandwidth");
  s.bandwidth = *bw;
  if (parts.size() > 1) {
    auto lat = core::parseDuration(parts[1]);
    if (!lat.isOk()) return lat.status().withContext("--strait latency");
    s.latency = *lat;
  }
  if (parts.size() > 2) {
    auto j = core::parseDuration(parts[2]);
    if (!j.isOk()) return j.status().withContext("--strait jitter");
    s.jitter = *j;
  }
  if (parts.size() > 3) {
    try {
      s.loss = std::stod(parts[3]);
    } catch (...) {
      return core::invalidArgument("--strait loss '" + parts[3] + "' is not a probability");
    }
  }
  return s;
}

}  // namespace

core::Status runCommBench(const CommBenchOptions& in) {
  CommBenchOptions opt = in;
  if (opt.ranks < 2 || opt.ranks > 64) {
    return core::invalidArgument("--ranks " + std::to_string(opt.ranks) + ": expected 2..64");
  }
  if (opt.streams < 1 || opt.streams > 64) return core::invalidArgument("--streams: expected 1..64");
  if (opt.local_streams < 1 || opt.local_streams > 64) return core::invalidArgument("--local-streams: expected 1..64");
  if (opt.frame_bytes < 4096 || opt.frame_bytes > kMaxFramePayload) {
    return core::invalidArgument("--frame " + std::to_string(opt.frame_bytes) + ": expected 4096..16777216 bytes");
  }
  auto codec = parseCodec(opt.codec);
  if (!codec.isOk()) return codec.status().withContext("--codec");
  BenchCtx bc;
  bc.opt = &opt;
  if (!opt.strait.empty()) {
    ARCH_ASSIGN_OR_RETURN(bc.strait, parseStrait(opt.strait));
    bc.emulated = !opt.kernel_shaped;
    bc.islands = 2;
  } else if (opt.kernel_shaped) {
    return core::invalidArgument("--kernel-shaped: name the rate the kernel enforces with --strait BANDWIDTH,LATENCY");
  }
  if (!opt.netns.empty() && opt.netns.size() != static_cast<size_t>(opt.ranks)) {
    return core::invalidArgument("--netns lists " + std::to_string(opt.netns.size()) + " namespaces for " +
                                 std::to_string(opt.ranks) + " ranks: name one per rank (e.g. h1,h1,h2,h2)");
  }
  if (opt.sizes.empty()) {
    opt.sizes = bc.islands > 1 ? std::vector<uint64_t>{64 << 10, 1 << 20, 16 << 20}
                            : std::vector<uint64_t>{4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20};
  }
  if (opt.ops.empty()) {
    opt.ops = bc.islands > 1 ? std::vector<std::string>{"allreduce", "hier_allreduce"}
                          : std::vector<std::string>{"allreduce", "allgather", "reduce_scatter", "broadcast",
                                                     "alltoall"};
  }
  for (const auto& op : opt.ops) {
    static const std::vector<std::string> known = {"allreduce", "hier_allreduce", "allgather", "reduce_scatter",
                                                   "broadcast", "alltoall", "failure"};
    if (std::find(known.begin(), known.end(), op) == known.end()) {
      return core::invalidArgument("--ops: '" + op +
                                   "' is not one of allreduce, hier_allreduce, allgather, reduce_scatter, broadcast, "
                                   "alltoall, failure");
    }
  }
  if (opt.gloo && !glooAvailable()) {
    std::printf("# Gloo comparison unavailable: this build has no Gloo (ARCHIPELAGO_WITH_GLOO)\n");
    opt.gloo = false;
  }
  if (bc.emulated) opt.gloo = false;  // Gloo's traffic cannot pass our userspace shaper
  std::string gloo_dir = "/tmp/archipelago-gloo-" + std::to_string(::getpid());
  std::filesystem::remove_all(gloo_dir);
  std::filesystem::create_directories(gloo_dir);
  LocalLaunchOptions lo;
  lo.world = opt.ranks;
  lo.netns = opt.netns;
  lo.coordinator.host = opt.coordinator_host;
  lo.secret = "bench-" + std::to_string(::getpid()) + "-" + std::to_string(core::nowMicros());
  lo.timeout_s = 3600;
  if (std::find(opt.ops.begin(), opt.ops.end(), "failure") != opt.ops.end()) lo.expendable.insert(opt.ranks - 1);
  auto res = launchLocal(lo, [&](const LocalRank& lr) { return rankMain(lr, bc); });
  std::filesystem::remove_all(gloo_dir);
  if (!res.isOk()) return res.status();
  for (int r = 0; r < opt.ranks; ++r) {
    const auto& o = (*res)[static_cast<size_t>(r)];
    if (lo.expendable.count(r)) continue;
    if (!o.message.empty()) return core::internalError("bench rank " + std::to_string(r) + ": " + o.message);
    if (!o.reported) return core::internalError("bench rank " + std::to_string(r) + " died (signal " + std::to_string(o.signal) + ")");
  }
  return core::okStatus();
}

}  // namespace archipelago::comm
