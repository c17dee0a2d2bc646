// Hashes used across layers: SHA-256 for files and checkpoints (integrity a
// person can check with sha256sum), CRC32C for transport frames (fast,
// hardware-accelerated where the CPU has SSE4.2), FNV-1a 64 for cheap
// in-memory keys (dedup), and SplitMix64 for deterministic indexing.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

#include "archipelago/core/status.h"

namespace archipelago::core {

using Sha256Digest = std::array<uint8_t, 32>;

// Incremental SHA-256 (OpenSSL EVP underneath).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n);
  void update(std::string_view s) { update(s.data(), s.size()); }
  Sha256Digest finish();

 private:
  void* ctx_;
};

Sha256Digest sha256(const void* data, size_t n);
std::string toHex(std::span<const uint8_t> bytes);
std::string sha256Hex(std::string_view data);
// SHA-256 of a whole file, streamed; error names the file.
Result<std::string> sha256File(const std::filesystem::path& path);

uint32_t crc32c(const void* data, size_t n, uint32_t seed = 0);

uint64_t fnv1a64(std::string_view s);

// SplitMix64 finaliser: a bijective, well-mixed map of 64-bit integers.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace archipelago::core
