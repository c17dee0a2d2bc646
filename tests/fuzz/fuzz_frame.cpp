// libFuzzer target: the frame header parser and payload check, and the
// handshake messages and server-side verdict, on arbitrary bytes. Built only
// with -DARCHIPELAGO_FUZZ=ON and clang (tests/fuzz/CMakeLists.txt); a short
// run over tests/fuzz/corpus/frame is the CTest test fuzz.fuzz_frame, and
// tests/comm/fuzz_smoke_test.cpp drives the same function in CI.
//
// Input layout: byte 0 selects the target; the rest is the message.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "archipelago/comm/wire.h"

namespace archipelago::fuzz {

inline int fuzzFrame(const uint8_t* data, size_t size) {
  using namespace archipelago::comm;
  if (size < 1) return 0;
  const uint8_t which = data[0] % 4;
  std::span<const uint8_t> in(data + 1, size - 1);
  switch (which) {
    case 0: {  // header + payload, as a receiver sees a stream
      auto h = decodeHeader(in, 1 << 16);
      if (h.isOk()) {
        // Invariants every accepted data header must satisfy before a receiver
        // writes h.length bytes at h.offset into a message of h.total bytes.
        if (h->length > (1u << 16)) __builtin_trap();
        if (h->type == FrameType::kData && (h->offset > h->total || h->length > h->total - h->offset)) __builtin_trap();
        auto rest = in.subspan(std::min(in.size(), kFrameHeaderSize));
        if (rest.size() >= h->length) (void)checkPayload(*h, rest.first(h->length));
      }
      break;
    }
    case 1: {  // HELLO
      auto h = decodeHello(in);
      if (h.isOk()) {
        auto again = decodeHello(encodeHello(*h));
        if (!again.isOk() || again->client_rank != h->client_rank || again->epoch != h->epoch) __builtin_trap();
      }
      break;
    }
    case 2: {  // CHALLENGE
      (void)decodeChallenge(in);
      break;
    }
    case 3: {  // a full server-side verdict: HELLO (33) | nonce (16) | AUTH (rest)
      if (in.size() < 33 + kNonceSize) return 0;
      auto hello = decodeHello(in.first(33));
      if (!hello.isOk()) return 0;
      Challenge ch;
      std::memcpy(ch.nonce.data(), in.data() + 33, kNonceSize);
      auto auth = in.subspan(33 + kNonceSize);
      auto st = verifyClient("fuzz-secret", *hello, ch, auth, 5, 0);
      // Random bytes must never authenticate.
      if (st.isOk()) __builtin_trap();
      break;
    }
  }
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzFrame themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzFrame(data, size);
}
#endif
