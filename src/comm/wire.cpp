#include "archipelago/comm/wire.h"

#include <openssl/crypto.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>
#include <random>
#include <string>

#include "archipelago/core/hash.h"

namespace archipelago::comm {
namespace {

void put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
void put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint16_t get16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
uint32_t get32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
uint64_t get64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }

bool knownType(uint16_t t) {
  switch (static_cast<FrameType>(t)) {
    case FrameType::kData: case FrameType::kHeartbeat: case FrameType::kAbort: case FrameType::kRemote:
    case FrameType::kRemoteAck: case FrameType::kHello:
    case FrameType::kChallenge: case FrameType::kAuth: case FrameType::kAccept: case FrameType::kReject:
    case FrameType::kRequest: case FrameType::kReply:
      return true;
  }
  return false;
}

constexpr size_t kHelloSize = 1 + 4 + 4 + 4 + 4 + kNonceSize;

}  // namespace

static_assert(sizeof(uint64_t) == 8);

void encodeHeader(const FrameHeader& h, uint8_t out[kFrameHeaderSize]) {
  put32(out + 0, kFrameMagic);
  put16(out + 4, kWireVersion);
  put16(out + 6, static_cast<uint16_t>(static_cast<uint16_t>(h.type) | (static_cast<uint16_t>(h.flags) << 8)));
  put32(out + 8, h.epoch);
  put32(out + 12, h.length);
  put64(out + 16, h.tag);
  put64(out + 24, h.offset);
  put64(out + 32, h.total);
  put32(out + 40, h.crc);
  put32(out + 44, h.deliver_at_lo);
}

core::Result<FrameHeader> decodeHeader(std::span<const uint8_t> b, uint32_t max_payload) {
  if (b.size() < kFrameHeaderSize) return core::dataLoss("truncated frame header (" + std::to_string(b.size()) + " bytes)");
  if (get32(b.data()) != kFrameMagic) return core::dataLoss("bad frame magic (not an archipelago stream?)");
  uint16_t version = get16(b.data() + 4);
  if (version != kWireVersion) {
    return core::unimplemented("wire version " + std::to_string(version) + " (this build speaks " +
                               std::to_string(kWireVersion) + ")");
  }
  const uint16_t type_and_flags = get16(b.data() + 6);
  const uint16_t type = type_and_flags & 0xff;
  const uint8_t flags = static_cast<uint8_t>(type_and_flags >> 8);
  if (!knownType(type)) return core::dataLoss("unknown frame type " + std::to_string(type));
  if ((flags & ~kFrameFlagsKnown) != 0 || (flags != 0 && type != static_cast<uint16_t>(FrameType::kData))) {
    return core::dataLoss("frame type " + std::to_string(type) + " with unknown flags " + std::to_string(flags));
  }
  FrameHeader h;
  h.type = static_cast<FrameType>(type);
  h.flags = flags;
  h.epoch = get32(b.data() + 8);
  h.length = get32(b.data() + 12);
  h.tag = get64(b.data() + 16);
  h.offset = get64(b.data() + 24);
  h.total = get64(b.data() + 32);
  h.crc = get32(b.data() + 40);
  h.deliver_at_lo = get32(b.data() + 44);
  if (h.length > max_payload) {
    return core::resourceExhausted("frame payload of " + std::to_string(h.length) + " bytes exceeds the maximum " +
                                   std::to_string(max_payload));
  }
  if (h.type == FrameType::kData) {
    if (h.offset > h.total || h.length > h.total - h.offset) {
      return core::dataLoss("data frame [" + std::to_string(h.offset) + ", +" + std::to_string(h.length) +
                            ") lies outside its message of " + std::to_string(h.total) + " bytes");
    }
  } else if (h.type == FrameType::kHeartbeat && h.length != 0) {
    return core::dataLoss("heartbeat frame with a payload");
  }
  return h;
}

core::Status checkPayload(const FrameHeader& h, std::span<const uint8_t> payload) {
  if (payload.size() != h.length) return core::dataLoss("payload length mismatch");
  if (h.flags & kFrameFlagNoCrc) return core::okStatus();
  return checkPayloadCrc(h, core::crc32c(payload.data(), payload.size()));
}

core::Status checkPayloadCrc(const FrameHeader& h, uint32_t crc) {
  if (crc != h.crc) {
    return core::dataLoss("frame CRC32C mismatch (tag " + std::to_string(h.tag) + ", offset " +
                          std::to_string(h.offset) + ", " + std::to_string(h.length) + " bytes)");
  }
  return core::okStatus();
}

std::vector<uint8_t> encodeHello(const Hello& h) {
  std::vector<uint8_t> out(kHelloSize);
  out[0] = static_cast<uint8_t>(h.role);
  put32(out.data() + 1, static_cast<uint32_t>(h.client_rank));
  put32(out.data() + 5, static_cast<uint32_t>(h.server_rank));
  put32(out.data() + 9, h.epoch);
  put32(out.data() + 13, h.stream);
  std::memcpy(out.data() + 17, h.nonce.data(), kNonceSize);
  return out;
}

core::Result<Hello> decodeHello(std::span<const uint8_t> p) {
  if (p.size() != kHelloSize) return core::dataLoss("HELLO of " + std::to_string(p.size()) + " bytes");
  Hello h;
  if (p[0] != static_cast<uint8_t>(PeerRole::kPeer) && p[0] != static_cast<uint8_t>(PeerRole::kCoordinatorClient)) {
    return core::dataLoss("HELLO with unknown role " + std::to_string(p[0]));
  }
  h.role = static_cast<PeerRole>(p[0]);
  h.client_rank = static_cast<int32_t>(get32(p.data() + 1));
  h.server_rank = static_cast<int32_t>(get32(p.data() + 5));
  h.epoch = get32(p.data() + 9);
  h.stream = get32(p.data() + 13);
  std::memcpy(h.nonce.data(), p.data() + 17, kNonceSize);
  if (h.client_rank < -1 || h.server_rank < -1 || h.stream > 1024) return core::dataLoss("HELLO with invalid fields");
  return h;
}

Mac handshakeMac(std::string_view secret, char side, const Hello& hello, std::span<const uint8_t> server_nonce,
                 std::span<const uint8_t> channel) {
  std::vector<uint8_t> msg;
  msg.push_back(static_cast<uint8_t>(side));
  auto hb = encodeHello(hello);
  msg.insert(msg.end(), hb.begin(), hb.end());
  msg.insert(msg.end(), server_nonce.begin(), server_nonce.end());
  msg.insert(msg.end(), channel.begin(), channel.end());
  Mac mac{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), msg.data(), msg.size(), mac.data(), &len);
  return mac;
}

bool macEqual(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

void randomBytes(std::span<uint8_t> out) {
  if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) {
    std::random_device rd;
    for (auto& b : out) b = static_cast<uint8_t>(rd());
  }
}

std::vector<uint8_t> encodeChallenge(const Challenge& c) {
  std::vector<uint8_t> out(kNonceSize + kMacSize);
  std::memcpy(out.data(), c.nonce.data(), kNonceSize);
  std::memcpy(out.data() + kNonceSize, c.mac.data(), kMacSize);
  return out;
}

core::Result<Challenge> decodeChallenge(std::span<const uint8_t> p) {
  if (p.size() != kNonceSize + kMacSize) return core::dataLoss("CHALLENGE of " + std::to_string(p.size()) + " bytes");
  Challenge c;
  std::memcpy(c.nonce.data(), p.data(), kNonceSize);
  std::memcpy(c.mac.data(), p.data() + kNonceSize, kMacSize);
  return c;
}

core::Result<Mac> decodeAuth(std::span<const uint8_t> p) {
  if (p.size() != kMacSize) return core::dataLoss("AUTH of " + std::to_string(p.size()) + " bytes");
  Mac m;
  std::memcpy(m.data(), p.data(), kMacSize);
  return m;
}

core::Status verifyClient(std::string_view secret, const Hello& hello, const Challenge& challenge,
                          std::span<const uint8_t> auth_payload, uint32_t current_epoch, int32_t my_rank,
                          std::span<const uint8_t> channel) {
  ARCH_ASSIGN_OR_RETURN(Mac got, decodeAuth(auth_payload));
  Mac want = handshakeMac(secret, 'C', hello, challenge.nonce, channel);
  if (!macEqual(got, want)) {
    return core::permissionDenied("handshake from rank " + std::to_string(hello.client_rank) +
                                  " failed authentication (wrong job secret?)");
  }
  if (hello.epoch < current_epoch) {
    return core::failedPrecondition("rank " + std::to_string(hello.client_rank) + " connects with stale epoch " +
                                    std::to_string(hello.epoch) + " (current " + std::to_string(current_epoch) + ")");
  }
  if (hello.role == PeerRole::kPeer && hello.server_rank != my_rank) {
    return core::invalidArgument("rank " + std::to_string(hello.client_rank) + " meant to reach rank " +
                                 std::to_string(hello.server_rank) + " but reached rank " + std::to_string(my_rank));
  }
  return core::okStatus();
}

}  // namespace archipelago::comm
