// Helpers shared by the data layer tests: a scratch directory per test and
// small file writers.
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace archipelago::data::testing {

// A fresh directory under the gtest temp dir, removed at scope exit.
class ScratchDir {
 public:
  ScratchDir() {
    std::string templ = ::testing::TempDir() + "archdata-XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    char* p = ::mkdtemp(buf.data());
    EXPECT_NE(p, nullptr);
    path_ = p ? p : "";
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& s) const { return path_ / s; }

 private:
  std::filesystem::path path_;
};

inline void writeText(const std::filesystem::path& p, const std::string& s) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f << s;
}

inline std::string readAll(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Deterministic pseudo-English: `n` documents of words drawn by a LCG.
inline std::vector<std::string> syntheticDocs(int n, int words_per_doc, uint64_t seed = 7) {
  static const char* kWords[] = {"the",     "state",  "of",       "union",   "congress", "people",  "nation",
                                 "and",     "we",     "shall",    "must",    "freedom",  "economy", "war",
                                 "peace",   "tax",    "citizens", "senate",  "house",    "law",     "year",
                                 "america", "world",  "trade",    "future",  "history",  "great",   "public",
                                 "credit",  "revenue", "treaty",  "commerce"};
  const int nw = sizeof(kWords) / sizeof(kWords[0]);
  uint64_t x = seed;
  std::vector<std::string> docs;
  for (int d = 0; d < n; ++d) {
    std::string s;
    for (int w = 0; w < words_per_doc; ++w) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      if (w) s += (x >> 60) == 0 ? ".\n" : " ";
      s += kWords[(x >> 33) % nw];
    }
    s += " doc" + std::to_string(d) + ".";
    docs.push_back(s);
  }
  return docs;
}

}  // namespace archipelago::data::testing
