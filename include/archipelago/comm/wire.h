// The wire format of every comm-layer TCP stream (peer links and the
// coordinator): fixed 48-byte little-endian frame headers with a CRC32C of
// the payload and a hard maximum payload size, plus the three messages of the
// authenticated handshake. Everything here is a pure function of bytes so the
// parsers can be fuzzed (tests/fuzz/) and unit-tested without sockets.
//
// Frame header (48 bytes, little-endian):
//   u32 magic  'ARCH' (0x48435241)   u16 version (1)
//   u16 type: low byte FrameType, high byte flags (kFrameFlag*; data frames only)
//   u32 epoch                        u32 length (payload bytes)
//   u64 tag   (collective tag: group|op sequence|step, or request id)
//   u64 offset (byte offset of this payload inside the tagged message)
//   u64 total  (total bytes of the tagged message)
//   u32 crc32c (of the payload; 0 and not checked when kFrameFlagNoCrc is set)
//   u32 deliver_at_lo (see below)
// deliver_at: link emulation only; the sender's steady-clock microsecond at
// which the frame may be delivered (lower 32 bits; the receiver reconstructs
// the full value near its own clock). 0 = deliver now.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::comm {

inline constexpr uint32_t kFrameMagic = 0x48435241;  // "ARCH"
inline constexpr uint16_t kWireVersion = 1;
inline constexpr size_t kFrameHeaderSize = 48;
// Hard cap on one frame's payload; larger messages are split into frames.
inline constexpr uint32_t kMaxFramePayload = 16u << 20;
inline constexpr size_t kNonceSize = 16;
inline constexpr size_t kMacSize = 32;

enum class FrameType : uint16_t {
  kData = 1,       // a piece of a tagged message
  kHeartbeat = 2,  // liveness only, empty payload
  kAbort = 3,      // the sender aborts: payload is the reason (UTF-8)
  kRemote = 4,     // same-host single copy: "read [offset,+len) of tag from my memory" (see mesh.h)
  kRemoteAck = 5,  // the reader copied (or could not copy) a kRemote range
  kHello = 10,     // handshake 1: client -> server
  kChallenge = 11, // handshake 2: server -> client
  kAuth = 12,      // handshake 3: client -> server
  kAccept = 13,    // handshake 4: server -> client (empty) ...
  kReject = 14,    // ... or a reason
  kRequest = 20,   // coordinator RPC (JSON payload)
  kReply = 21,
};

// Flags of a data frame (the high byte of the type field).
// kFrameFlagNoCrc: the crc field is not set; the link is one the job trusts
// (loopback, TLS, or `checksum: off`; see docs/comm.md "Checksums"). A
// receiver whose link requires checksums rejects such a frame (kDataLoss).
inline constexpr uint8_t kFrameFlagNoCrc = 1;
inline constexpr uint8_t kFrameFlagsKnown = kFrameFlagNoCrc;

struct FrameHeader {
  FrameType type = FrameType::kData;
  uint8_t flags = 0;  // kFrameFlag*, data frames only
  uint32_t epoch = 0;
  uint32_t length = 0;
  uint64_t tag = 0;
  uint64_t offset = 0;
  uint64_t total = 0;
  uint32_t crc = 0;
  uint32_t deliver_at_lo = 0;
};

void encodeHeader(const FrameHeader& h, uint8_t out[kFrameHeaderSize]);
// Validates magic, version, type, length <= max_payload and offset+length <=
// total for data frames. Errors: kDataLoss (garbage), kResourceExhausted (too
// large), kUnimplemented (other version).
core::Result<FrameHeader> decodeHeader(std::span<const uint8_t> bytes, uint32_t max_payload = kMaxFramePayload);
// kDataLoss if the payload's length or CRC32C does not match the header (a
// frame flagged kFrameFlagNoCrc has only its length checked).
core::Status checkPayload(const FrameHeader& h, std::span<const uint8_t> payload);
// Same verdict for a CRC32C the caller accumulated while the payload arrived
// in pieces (core::crc32c chained over the pieces). Always compares: the
// caller skips it for a kFrameFlagNoCrc frame its link accepts.
core::Status checkPayloadCrc(const FrameHeader& h, uint32_t crc);

// ---- handshake -----------------------------------------------------------------
// client -> HELLO{role, client_rank, server_rank, epoch, stream, nonce_c}
// server -> CHALLENGE{nonce_s, mac_s = HMAC(secret, "S" | transcript)}
// client -> AUTH{mac_c = HMAC(secret, "C" | transcript)}
// server -> ACCEPT | REJECT{reason}
// transcript = role|client_rank|server_rank|epoch|stream|nonce_c|nonce_s|channel
// where channel is TLS exporter keying material when TLS is on (binds the
// authentication to the encrypted channel), else empty. Both sides prove the
// secret; neither reveals it; nonces make a recorded handshake useless.

enum class PeerRole : uint8_t { kPeer = 1, kCoordinatorClient = 2 };

struct Hello {
  PeerRole role = PeerRole::kPeer;
  int32_t client_rank = 0;
  int32_t server_rank = 0;
  uint32_t epoch = 0;
  uint32_t stream = 0;
  std::array<uint8_t, kNonceSize> nonce{};
};

std::vector<uint8_t> encodeHello(const Hello& h);
core::Result<Hello> decodeHello(std::span<const uint8_t> payload);

using Mac = std::array<uint8_t, kMacSize>;
// HMAC-SHA256 over the transcript; side is 'S' (server proof) or 'C'.
Mac handshakeMac(std::string_view secret, char side, const Hello& hello,
                 std::span<const uint8_t> server_nonce, std::span<const uint8_t> channel = {});
// Constant-time comparison.
bool macEqual(std::span<const uint8_t> a, std::span<const uint8_t> b);
void randomBytes(std::span<uint8_t> out);

// CHALLENGE payload = nonce_s | mac_s ; AUTH payload = mac_c.
struct Challenge {
  std::array<uint8_t, kNonceSize> nonce{};
  Mac mac{};
};
std::vector<uint8_t> encodeChallenge(const Challenge& c);
core::Result<Challenge> decodeChallenge(std::span<const uint8_t> payload);
core::Result<Mac> decodeAuth(std::span<const uint8_t> payload);

// Server-side verdict on a HELLO + AUTH pair (pure; used by the listener and
// by the fuzz target). current_epoch is the server's epoch: an older epoch is
// refused (kFailedPrecondition), a bad MAC is refused (kPermissionDenied).
core::Status verifyClient(std::string_view secret, const Hello& hello, const Challenge& challenge,
                          std::span<const uint8_t> auth_payload, uint32_t current_epoch, int32_t my_rank,
                          std::span<const uint8_t> channel = {});

}  // namespace archipelago::comm
