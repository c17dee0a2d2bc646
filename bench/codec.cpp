// bench_codec: throughput and accuracy of the strait codecs (comm/codec.h).
//
// For every codec and buffer size (fp32 bytes, 1 MB .. 64 MB by default) it
// prints encode and decode throughput in GB/s of fp32 data on one core, the
// bytes on the wire as % of fp32, and the max abs error and relative L2 error
// on N(0,1) data and on a gradient-like heavy-tailed distribution (Student-t
// with 3 degrees of freedom, scaled by 1e-3, with per-4096-element magnitudes
// spread over two decades like different layers). Baseline measured in the
// same run: memcpy of the same fp32 buffer. A table, then one JSON line per
// row (prefixed "JSON ").
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "archipelago/comm/codec.h"

namespace {

using archipelago::comm::CodecKind;
namespace comm = archipelago::comm;

using Clock = std::chrono::steady_clock;

// Best-of time in seconds for fn(), repeated until min_seconds have passed
// (at least 3 runs after one warm-up).
template <typename Fn>
double bestTime(Fn&& fn, double min_seconds) {
  fn();
  double best = 1e30, total = 0;
  int runs = 0;
  while (runs < 3 || total < min_seconds) {
    const auto t0 = Clock::now();
    fn();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::min(best, dt);
    total += dt;
    ++runs;
  }
  return best;
}

struct ErrorStats {
  double max_abs = 0;
  double rel_l2 = 0;
};

ErrorStats errors(const std::vector<float>& x, const std::vector<float>& y) {
  double num = 0, den = 0, mx = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = static_cast<double>(x[i]) - y[i];
    mx = std::max(mx, std::fabs(d));
    num += d * d;
    den += static_cast<double>(x[i]) * x[i];
  }
  return {mx, den > 0 ? std::sqrt(num / den) : 0.0};
}

std::vector<float> normalData(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = nd(rng);
  return x;
}

std::vector<float> heavyData(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::student_t_distribution<float> td(3.0f);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  std::vector<float> x(n);
  float mag = 1e-3f;
  for (size_t i = 0; i < n; ++i) {
    if (i % 4096 == 0) mag = 1e-3f * std::pow(10.0f, ud(rng));
    x[i] = mag * td(rng);
  }
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_codec: encode/decode throughput and error of the strait codecs"};
  std::vector<size_t> sizes_mb = {1, 4, 16, 64};
  double min_seconds = 0.2;
  std::vector<std::string> codec_names;
  app.add_option("--sizes-mb", sizes_mb, "fp32 buffer sizes in MB (2^20 bytes)");
  app.add_option("--min-seconds", min_seconds, "minimum timed seconds per measurement");
  app.add_option("--codecs", codec_names, "codecs to run (default: all)");
  CLI11_PARSE(app, argc, argv);

  std::vector<CodecKind> codecs;
  if (codec_names.empty()) {
    codecs = {CodecKind::kNone, CodecKind::kBF16, CodecKind::kFP16, CodecKind::kInt8,
              CodecKind::kFP8E4M3, CodecKind::kFP8E5M2, CodecKind::kInt4};
  }
  for (const std::string& name : codec_names) {
    auto k = comm::parseCodec(name);
    if (!k.isOk()) {
      std::fprintf(stderr, "bench_codec: --codecs: %s\n", k.status().message().c_str());
      return 2;
    }
    codecs.push_back(*k);
  }

  std::vector<nlohmann::json> rows;
  std::printf("%-9s %6s %9s %9s %9s %7s %11s %10s %11s %10s\n", "codec", "MB", "enc GB/s", "dec GB/s",
              "memcpy", "wire%", "N01 maxabs", "N01 relL2", "heavy maxab", "heavy rL2");
  for (size_t mb : sizes_mb) {
    const size_t n = mb * (size_t{1} << 20) / sizeof(float);
    const double bytes = static_cast<double>(n) * sizeof(float);
    const std::vector<float> normal = normalData(n, 1);
    const std::vector<float> heavy = heavyData(n, 2);
    std::vector<float> copy(n, 0.0f), y(n, 0.0f);
    const double memcpy_s = bestTime([&] { std::memcpy(copy.data(), normal.data(), bytes); }, min_seconds);
    const double memcpy_gbps = bytes / memcpy_s / 1e9;
    for (CodecKind k : codecs) {
      std::vector<uint8_t> wire(comm::encodedSize(k, n), 0);
      const double enc_s = bestTime([&] { comm::encode(k, normal, wire); }, min_seconds);
      const double dec_s = bestTime(
          [&] {
            const archipelago::core::Status st = comm::decode(k, wire, y);
            if (!st.isOk()) std::abort();
          },
          min_seconds);
      const ErrorStats en = errors(normal, y);
      comm::encode(k, heavy, wire);
      if (!comm::decode(k, wire, y).isOk()) return 1;
      const ErrorStats eh = errors(heavy, y);
      const double wire_pct = 100.0 * static_cast<double>(wire.size()) / bytes;
      const double enc_gbps = bytes / enc_s / 1e9, dec_gbps = bytes / dec_s / 1e9;
      std::printf("%-9s %6zu %9.2f %9.2f %9.2f %6.2f%% %11.3e %10.3e %11.3e %10.3e\n",
                  std::string(comm::codecName(k)).c_str(), mb, enc_gbps, dec_gbps, memcpy_gbps, wire_pct,
                  en.max_abs, en.rel_l2, eh.max_abs, eh.rel_l2);
      std::fflush(stdout);
      rows.push_back({{"bench", "codec"},
                      {"codec", comm::codecName(k)},
                      {"mb", mb},
                      {"elements", n},
                      {"encode_gbps", enc_gbps},
                      {"decode_gbps", dec_gbps},
                      {"memcpy_gbps", memcpy_gbps},
                      {"wire_bytes", wire.size()},
                      {"wire_pct_of_fp32", wire_pct},
                      {"normal_max_abs_err", en.max_abs},
                      {"normal_rel_l2_err", en.rel_l2},
                      {"heavy_max_abs_err", eh.max_abs},
                      {"heavy_rel_l2_err", eh.rel_l2}});
    }
  }
  std::printf("(GB/s = 1e9 bytes of fp32 data per second, one thread; memcpy = baseline on the same buffer)\n");
  for (const auto& r : rows) std::printf("JSON %s\n", r.dump().c_str());
  return 0;
}
