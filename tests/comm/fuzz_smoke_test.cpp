// The libFuzzer target tests/fuzz/fuzz_frame.cpp, driven for a couple of
// seconds by a small deterministic mutation loop inside the ordinary test
// binary, so every CI run exercises it even with GCC (the real libFuzzer
// run needs clang and -DARCHIPELAGO_FUZZ=ON; see docs/comm.md). The target
// traps (__builtin_trap) when an accepted header or handshake violates an
// invariant, which fails this test by crashing it.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <random>
#include <vector>

#include "../fuzz/fuzz_frame.cpp"
#include "archipelago/core/hash.h"

namespace archipelago::comm {
namespace {

// Valid seeds for each of the target's four modes, so mutations start from
// inputs that reach deep into the parsers.
std::vector<std::vector<uint8_t>> seeds() {
  std::vector<std::vector<uint8_t>> out;
  {
    std::vector<uint8_t> payload(300, 0x42);
    FrameHeader h;
    h.type = FrameType::kData;
    h.length = static_cast<uint32_t>(payload.size());
    h.offset = 100;
    h.total = 1000;
    h.crc = core::crc32c(payload.data(), payload.size());
    std::vector<uint8_t> s(1 + kFrameHeaderSize);
    s[0] = 0;
    encodeHeader(h, s.data() + 1);
    s.insert(s.end(), payload.begin(), payload.end());
    out.push_back(s);
  }
  Hello hello;
  hello.client_rank = 3;
  hello.server_rank = 1;
  hello.epoch = 5;
  auto he = encodeHello(hello);
  {
    std::vector<uint8_t> s{1};
    s.insert(s.end(), he.begin(), he.end());
    out.push_back(s);
  }
  {
    std::vector<uint8_t> s{2};
    s.resize(1 + kNonceSize + 32, 0x17);
    out.push_back(s);
  }
  {
    std::vector<uint8_t> s{3};
    s.insert(s.end(), he.begin(), he.end());
    s.resize(1 + 33 + kNonceSize + 32, 0x5c);
    out.push_back(s);
  }
  return out;
}

TEST(Fuzz, FrameAndHandshakeTargetSurvivesTwoSecondsOfMutations) {
  std::mt19937_64 rng(20240607);
  const auto base = seeds();
  size_t runs = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  std::vector<uint8_t> in;
  while (std::chrono::steady_clock::now() < until) {
    for (int k = 0; k < 256; ++k, ++runs) {
      in = base[rng() % base.size()];
      const int edits = 1 + static_cast<int>(rng() % 8);
      for (int e = 0; e < edits; ++e) {
        switch (rng() % 5) {
          case 0:  // flip a bit
            if (!in.empty()) in[rng() % in.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
            break;
          case 1:  // random byte
            if (!in.empty()) in[rng() % in.size()] = static_cast<uint8_t>(rng());
            break;
          case 2:  // truncate
            if (!in.empty()) in.resize(rng() % in.size());
            break;
          case 3:  // extend with random bytes
            for (int i = static_cast<int>(rng() % 64); i > 0; --i) in.push_back(static_cast<uint8_t>(rng()));
            break;
          case 4: {  // interesting 32-bit values (lengths, offsets)
            static const uint32_t vals[] = {0, 1, 0x7fffffff, 0x80000000u, 0xffffffffu, 1u << 16, (1u << 16) + 1};
            if (in.size() >= 5) {
              uint32_t v = vals[rng() % (sizeof(vals) / sizeof(vals[0]))];
              std::memcpy(in.data() + 1 + rng() % (in.size() - 4), &v, 4);
            }
            break;
          }
        }
      }
      LLVMFuzzerTestOneInput(in.data(), in.size());
    }
  }
  // Pure random inputs too.
  for (int k = 0; k < 20000; ++k, ++runs) {
    in.resize(rng() % 200);
    for (auto& b : in) b = static_cast<uint8_t>(rng());
    LLVMFuzzerTestOneInput(in.data(), in.size());
  }
  EXPECT_GT(runs, 20000u);
}

}  // namespace
}  // namespace archipelago::comm
