#include "archipelago/data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "archipelago/core/hash.h"

namespace archipelago::data {
namespace {

// Explicit little-endian (de)serialisation, independent of the host order.
void putLe(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t getLe(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

}  // namespace

void ShardHeader::encode(uint8_t out[kShardHeaderBytes]) const {
  std::memset(out, 0, kShardHeaderBytes);
  std::memcpy(out, kShardMagic, 8);
  putLe(out + 8, version, 4);
  putLe(out + 12, token_bytes, 4);
  putLe(out + 16, count, 8);
  putLe(out + 24, documents, 8);
  putLe(out + 32, vocab_size, 8);
  putLe(out + 40, kShardHeaderBytes, 4);
}

core::Result<ShardHeader> ShardHeader::decode(const uint8_t* in, size_t n, const std::string& origin) {
  if (n < kShardHeaderBytes) {
    return core::dataLoss("shard '" + origin + "' is truncated: " + std::to_string(n) + " bytes, shorter than its header");
  }
  if (std::memcmp(in, kShardMagic, 8) != 0) return core::dataLoss("shard '" + origin + "' has a bad magic (not a token shard)");
  ShardHeader h;
  h.version = static_cast<uint32_t>(getLe(in + 8, 4));
  h.token_bytes = static_cast<uint32_t>(getLe(in + 12, 4));
  h.count = getLe(in + 16, 8);
  h.documents = getLe(in + 24, 8);
  h.vocab_size = getLe(in + 32, 8);
  uint32_t header_bytes = static_cast<uint32_t>(getLe(in + 40, 4));
  if (h.version != kShardVersion) {
    return core::dataLoss("shard '" + origin + "' has version " + std::to_string(h.version) + ", expected " +
                          std::to_string(kShardVersion));
  }
  if (h.token_bytes != 2 && h.token_bytes != 4) {
    return core::dataLoss("shard '" + origin + "' has token width " + std::to_string(h.token_bytes) + ", expected 2 or 4");
  }
  if (header_bytes != kShardHeaderBytes) {
    return core::dataLoss("shard '" + origin + "' has header size " + std::to_string(header_bytes) + ", expected 64");
  }
  return h;
}

int tokenBytesForVocab(int64_t vocab_size) { return vocab_size <= 65535 ? 2 : 4; }

// ---- ShardWriter -------------------------------------------------------------------

ShardWriter::ShardWriter(std::filesystem::path dir, std::string prefix, int64_t vocab_size, uint64_t shard_bytes)
    : dir_(std::move(dir)),
      prefix_(std::move(prefix)),
      vocab_size_(vocab_size),
      token_bytes_(tokenBytesForVocab(vocab_size)),
      shard_bytes_(std::max<uint64_t>(shard_bytes, 1)) {}

core::Status ShardWriter::addDocument(std::span<const int32_t> tokens, int32_t eos) {
  size_t old = buf_.size();
  buf_.resize(old + (tokens.size() + 1) * static_cast<size_t>(token_bytes_));
  uint8_t* p = buf_.data() + old;
  auto put = [&](int32_t id) {
    ARCH_CHECK_MSG(id >= 0 && id < vocab_size_, "token id out of the vocabulary");
    putLe(p, static_cast<uint32_t>(id), token_bytes_);
    p += token_bytes_;
  };
  for (int32_t id : tokens) put(id);
  put(eos);
  ++buf_docs_;
  if (buf_.size() >= shard_bytes_) return flush();
  return core::okStatus();
}

core::Status ShardWriter::flush() {
  if (buf_.empty()) return core::okStatus();
  char name[64];
  std::snprintf(name, sizeof(name), "%s-%05zu.bin", prefix_.c_str(), split_.shards.size());
  auto path = dir_ / name;
  ShardHeader h;
  h.token_bytes = static_cast<uint32_t>(token_bytes_);
  h.count = buf_.size() / static_cast<size_t>(token_bytes_);
  h.documents = static_cast<uint64_t>(buf_docs_);
  h.vocab_size = static_cast<uint64_t>(vocab_size_);
  uint8_t header[kShardHeaderBytes];
  h.encode(header);

  core::Sha256 sha;
  sha.update(header, sizeof(header));
  sha.update(buf_.data(), buf_.size());
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return core::unavailable("cannot create '" + path.string() + "': " + std::strerror(errno));
  bool ok = std::fwrite(header, 1, sizeof(header), f) == sizeof(header) &&
            std::fwrite(buf_.data(), 1, buf_.size(), f) == buf_.size();
  ok = (std::fflush(f) == 0) && ok;
  ok = (::fsync(fileno(f)) == 0) && ok;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) return core::unavailable("cannot write '" + path.string() + "': " + std::strerror(errno));

  ShardInfo info;
  info.file = name;
  info.tokens = static_cast<int64_t>(h.count);
  info.documents = buf_docs_;
  info.bytes = static_cast<int64_t>(sizeof(header) + buf_.size());
  auto digest = sha.finish();
  info.sha256 = core::toHex(digest);
  split_.tokens += info.tokens;
  split_.documents += info.documents;
  split_.shards.push_back(std::move(info));
  buf_.clear();
  buf_docs_ = 0;
  return core::okStatus();
}

core::Result<SplitInfo> ShardWriter::finish() {
  ARCH_RETURN_IF_ERROR(flush());
  return split_;
}

// ---- TokenReader -------------------------------------------------------------------

TokenReader::~TokenReader() {
  for (auto& s : shards_) {
    if (s.base != nullptr) ::munmap(const_cast<uint8_t*>(s.base), s.bytes);
  }
}

core::Result<std::unique_ptr<TokenReader>> TokenReader::open(const Manifest& manifest, const SplitInfo& split,
                                                             bool verify_checksums) {
  std::unique_ptr<TokenReader> r(new TokenReader());
  r->token_bytes_ = manifest.token_bytes;
  for (const auto& info : split.shards) {
    std::string path = (manifest.dir / info.file).string();
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return core::dataLoss("shard '" + path + "' listed in the manifest cannot be opened (" + std::strerror(errno) +
                            "); re-run `archipelago data prepare`");
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      return core::dataLoss("cannot stat shard '" + path + "': " + std::strerror(e));
    }
    if (st.st_size != info.bytes) {
      ::close(fd);
      return core::dataLoss("shard '" + path + "' is " + std::to_string(st.st_size) + " bytes, the manifest says " +
                            std::to_string(info.bytes) + (st.st_size < info.bytes ? " (truncated)" : "") +
                            "; re-run `archipelago data prepare`");
    }
    void* base = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    ::close(fd);  // the mapping keeps the file alive
    if (base == MAP_FAILED) return core::dataLoss("cannot mmap shard '" + path + "': " + std::strerror(e));
    Mapped m;
    m.path = path;
    m.base = static_cast<const uint8_t*>(base);
    m.bytes = static_cast<size_t>(st.st_size);
    r->shards_.push_back(m);  // owned from here (unmapped by the destructor)

    ARCH_ASSIGN_OR_RETURN(ShardHeader h, ShardHeader::decode(m.base, m.bytes, path));
    if (static_cast<int>(h.token_bytes) != manifest.token_bytes || static_cast<int64_t>(h.count) != info.tokens ||
        static_cast<int64_t>(h.documents) != info.documents ||
        static_cast<int64_t>(h.vocab_size) != manifest.vocab_size) {
      return core::dataLoss("shard '" + path + "' header (width " + std::to_string(h.token_bytes) + ", " +
                            std::to_string(h.count) + " tokens) does not match the manifest");
    }
    if (verify_checksums) {
      auto digest = core::sha256(m.base, m.bytes);
      std::string hex = core::toHex(digest);
      if (hex != info.sha256) {
        return core::dataLoss("shard '" + path + "' fails its checksum (sha256 " + hex + ", manifest " + info.sha256 +
                              "): the file is corrupted; re-run `archipelago data prepare`");
      }
    }
    ::madvise(const_cast<uint8_t*>(m.base), m.bytes, MADV_RANDOM);
    Mapped& back = r->shards_.back();
    back.tokens = back.base + kShardHeaderBytes;
    back.count = info.tokens;
    r->starts_.push_back(r->total_);
    r->total_ += info.tokens;
  }
  return r;
}

int32_t TokenReader::token(int64_t i) const {
  ARCH_CHECK_MSG(i >= 0 && i < total_, "token index out of range");
  auto it = std::upper_bound(starts_.begin(), starts_.end(), i);
  size_t s = static_cast<size_t>(it - starts_.begin()) - 1;
  const uint8_t* p = shards_[s].tokens + (i - starts_[s]) * token_bytes_;
  return static_cast<int32_t>(getLe(p, token_bytes_));
}

template <typename T>
void TokenReader::readImpl(int64_t begin, std::span<T> out) const {
  int64_t n = static_cast<int64_t>(out.size());
  ARCH_CHECK_MSG(begin >= 0 && begin + n <= total_, "token range out of range");
  if (n == 0) return;
  auto it = std::upper_bound(starts_.begin(), starts_.end(), begin);
  size_t s = static_cast<size_t>(it - starts_.begin()) - 1;
  int64_t done = 0;
  while (done < n) {
    const Mapped& m = shards_[s];
    int64_t off = begin + done - starts_[s];
    int64_t take = std::min(n - done, m.count - off);
    const uint8_t* p = m.tokens + off * token_bytes_;
    if (token_bytes_ == 2) {
      for (int64_t k = 0; k < take; ++k) out[done + k] = static_cast<T>(p[2 * k] | (p[2 * k + 1] << 8));
    } else {
      for (int64_t k = 0; k < take; ++k) out[done + k] = static_cast<T>(getLe(p + 4 * k, 4));
    }
    done += take;
    ++s;
  }
}

void TokenReader::read(int64_t begin, std::span<int64_t> out) const { readImpl(begin, out); }
void TokenReader::read(int64_t begin, std::span<int32_t> out) const { readImpl(begin, out); }

}  // namespace archipelago::data
