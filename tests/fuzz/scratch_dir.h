// A private scratch directory for the fuzz targets whose parser takes a
// path (job YAML, token shards): one per process, removed at exit.
//
// It lives under /dev/shm when that exists: there a small file write costs
// microseconds, while on a busy disk it cost milliseconds and made the CI
// smoke loops twenty times slower. Elsewhere it is under the system
// temporary directory ($TMPDIR).
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>

namespace archipelago::fuzz {

inline const std::filesystem::path& scratchDir() {
  struct Dir {
    std::filesystem::path path;
    Dir() {
      std::error_code ec;
      const std::filesystem::path shm = "/dev/shm";
      const auto base = std::filesystem::is_directory(shm, ec) && ::access(shm.c_str(), W_OK) == 0
                            ? shm
                            : std::filesystem::temp_directory_path();
      path = base / ("archipelago-fuzz-" + std::to_string(::getpid()));
      std::filesystem::create_directories(path, ec);
    }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static Dir dir;
  return dir.path;
}

}  // namespace archipelago::fuzz
