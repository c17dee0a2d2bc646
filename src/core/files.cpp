#include "archipelago/core/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace archipelago::core {

namespace fs = std::filesystem;

namespace {

// A full disk is worth its own code: the caller can tell the user to free
// space rather than to check the path.
Status ioError(int err, const std::string& what) {
  std::string msg = what + ": " + std::strerror(err);
  return err == ENOSPC || err == EDQUOT ? resourceExhausted(msg + " (disk full?)") : unavailable(msg);
}

Status writeAll(int fd, std::string_view bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ioError(errno, "write failed");
    }
    off += static_cast<size_t>(n);
  }
  return okStatus();
}

// Unique per process and call, so that two threads writing the same path
// never share a temporary file.
fs::path tempSibling(const fs::path& path) {
  static std::atomic<uint64_t> counter{0};
  fs::path tmp = path;
  tmp += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
  return tmp;
}

}  // namespace

Result<std::string> readFile(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return notFound("cannot open '" + path.string() + "': " + std::strerror(errno));
  struct stat sb {};
  if (::fstat(fd, &sb) == 0 && S_ISDIR(sb.st_mode)) {
    ::close(fd);
    return notFound("cannot read '" + path.string() + "': it is a directory");
  }
  std::string out;
  if (sb.st_size > 0) out.reserve(static_cast<size_t>(sb.st_size));
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return dataLoss("read error on '" + path.string() + "' after " + std::to_string(out.size()) +
                      " bytes: " + std::strerror(err));
    }
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

Status writeFile(const fs::path& path, std::string_view bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ioError(errno, "cannot open '" + path.string() + "' for writing");
  Status st = writeAll(fd, bytes);
  if (::close(fd) != 0 && st.isOk()) st = ioError(errno, "close failed");
  return st.isOk() ? st : st.withContext("cannot write '" + path.string() + "'");
}

Status writeFileAtomic(const fs::path& path, std::string_view bytes) {
  const fs::path tmp = tempSibling(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ioError(errno, "cannot write '" + path.string() + "': cannot create '" + tmp.string() + "'");
  Status st = writeAll(fd, bytes);
  if (st.isOk() && ::fsync(fd) != 0) st = ioError(errno, "fsync failed");
  if (::close(fd) != 0 && st.isOk()) st = ioError(errno, "close failed");
  if (st.isOk() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = ioError(errno, "cannot rename '" + tmp.string() + "' over it");
  }
  if (!st.isOk()) {
    ::unlink(tmp.c_str());
    return st.withContext("cannot write '" + path.string() + "'");
  }
  return okStatus();
}

Result<fs::path> makeSiblingTempDir(const fs::path& path, std::string_view tag) {
  std::string templ = path.string() + std::string(tag) + "XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    return ioError(errno, "cannot create a temporary directory next to '" + path.string() + "'");
  }
  return fs::path(buf.data());
}

Status replaceDirectoryAtomic(const fs::path& tmp, const fs::path& final_dir) {
  std::error_code ec;
  if (!fs::exists(final_dir, ec)) {
    fs::rename(tmp, final_dir, ec);
    if (ec) return unavailable("cannot rename '" + tmp.string() + "' to '" + final_dir.string() + "': " + ec.message());
    return okStatus();
  }
  // A name nobody else uses; renaming a directory onto an empty directory replaces it.
  ARCH_ASSIGN_OR_RETURN(const fs::path old, makeSiblingTempDir(final_dir, ".old-"));
  fs::rename(final_dir, old, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(old, ignored);
    return unavailable("cannot move the old '" + final_dir.string() + "' aside: " + ec.message());
  }
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    std::error_code ignored;
    fs::rename(old, final_dir, ignored);
    return unavailable("cannot rename '" + tmp.string() + "' to '" + final_dir.string() + "': " + ec.message());
  }
  fs::remove_all(old, ec);  // a leftover ".old-" directory is harmless; the new one is in place
  return okStatus();
}

}  // namespace archipelago::core
