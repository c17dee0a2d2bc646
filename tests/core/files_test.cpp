// Atomic file and directory publication (core/files.h): readers see the old
// content or the whole new one, failures name the path and leave no
// temporary behind.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "archipelago/core/files.h"

namespace archipelago::core {
namespace {

namespace fs = std::filesystem;

class FilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = (fs::temp_directory_path() / "arch-files-XXXXXX").string();
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  static std::string read(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  // Entries of dir_ other than the named ones (temporary leftovers).
  int others(std::initializer_list<std::string> names) const {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir_)) {
      if (std::find(names.begin(), names.end(), e.path().filename().string()) == names.end()) ++n;
    }
    return n;
  }
  fs::path dir_;
};

TEST_F(FilesTest, WriteFileAtomicCreatesAndReplaces) {
  const fs::path p = dir_ / "a.json";
  ASSERT_TRUE(writeFileAtomic(p, "first").isOk());
  EXPECT_EQ(read(p), "first");
  ASSERT_TRUE(writeFileAtomic(p, std::string("se\0cond", 7)).isOk());
  EXPECT_EQ(read(p), std::string("se\0cond", 7));
  ASSERT_TRUE(writeFileAtomic(p, "").isOk());
  EXPECT_EQ(fs::file_size(p), 0u);
  EXPECT_EQ(others({"a.json"}), 0);
}

TEST_F(FilesTest, WriteFileAtomicFailureNamesPathAndKeepsOld) {
  const fs::path missing = dir_ / "no_such_dir" / "x.json";
  Status st = writeFileAtomic(missing, "x");
  ASSERT_FALSE(st.isOk());
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_NE(st.message().find(missing.string()), std::string::npos) << st.message();

  // The rename fails (a non-empty directory stands at the path): the old
  // entry is untouched and the temporary file is gone.
  const fs::path blocked = dir_ / "blocked";
  fs::create_directories(blocked / "inside");
  st = writeFileAtomic(blocked, "x");
  ASSERT_FALSE(st.isOk());
  EXPECT_NE(st.message().find(blocked.string()), std::string::npos) << st.message();
  EXPECT_TRUE(fs::is_directory(blocked / "inside"));
  EXPECT_EQ(others({"blocked"}), 0);
}

TEST_F(FilesTest, ReadersNeverSeeAPartialFile) {
  const fs::path p = dir_ / "state.json";
  const std::string a(1 << 20, 'a'), b(1 << 19, 'b');
  ASSERT_TRUE(writeFileAtomic(p, a).isOk());
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (int i = 0; i < 60; ++i) EXPECT_TRUE(writeFileAtomic(p, i % 2 ? a : b).isOk());
    done = true;
  });
  int reads = 0, partial = 0;
  while (!done || reads == 0) {
    const std::string got = read(p);
    if (got != a && got != b) ++partial;
    ++reads;
  }
  writer.join();
  EXPECT_EQ(partial, 0) << "of " << reads << " reads";
  EXPECT_EQ(others({"state.json"}), 0);
}

TEST_F(FilesTest, WriteFileTruncatesAndReportsFullDisk) {
  const fs::path p = dir_ / "report.txt";
  ASSERT_TRUE(writeFile(p, "a longer first text").isOk());
  ASSERT_TRUE(writeFile(p, "short").isOk());
  EXPECT_EQ(read(p), "short");
  Status st = writeFile(dir_ / "missing" / "r.txt", "x");
  ASSERT_FALSE(st.isOk());
  EXPECT_NE(st.message().find((dir_ / "missing" / "r.txt").string()), std::string::npos) << st.message();
  if (fs::exists("/dev/full")) {  // every write to it fails with ENOSPC
    st = writeFile("/dev/full", "x");
    EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.toString();
    EXPECT_NE(st.message().find("/dev/full"), std::string::npos) << st.message();
  }
}

TEST_F(FilesTest, ReadFileReturnsEveryByteAndNamesAMissingPath) {
  std::string big(300000, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 % 251);  // binary, > one read
  ASSERT_TRUE(writeFileAtomic(dir_ / "blob", big).isOk());
  auto got = readFile(dir_ / "blob");
  ASSERT_TRUE(got.isOk()) << got.status().toString();
  EXPECT_EQ(*got, big);
  ASSERT_TRUE(writeFile(dir_ / "empty", "").isOk());
  EXPECT_EQ(*readFile(dir_ / "empty"), "");

  auto missing = readFile(dir_ / "nope.json");
  ASSERT_FALSE(missing.isOk());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find((dir_ / "nope.json").string()), std::string::npos);
  auto a_dir = readFile(dir_);
  ASSERT_FALSE(a_dir.isOk());
  EXPECT_EQ(a_dir.status().code(), StatusCode::kNotFound);
}

TEST_F(FilesTest, ReplaceDirectoryPublishesNewAndRemovesOld) {
  const fs::path final_dir = dir_ / "out";
  const fs::path tmp1 = dir_ / "out.tmp-1";
  fs::create_directories(tmp1);
  ASSERT_TRUE(writeFile(tmp1 / "v", "1").isOk());
  ASSERT_TRUE(replaceDirectoryAtomic(tmp1, final_dir).isOk());
  EXPECT_EQ(read(final_dir / "v"), "1");
  EXPECT_FALSE(fs::exists(tmp1));

  const fs::path tmp2 = dir_ / "out.tmp-2";
  fs::create_directories(tmp2);
  ASSERT_TRUE(writeFile(tmp2 / "w", "2").isOk());
  ASSERT_TRUE(replaceDirectoryAtomic(tmp2, final_dir).isOk());
  EXPECT_EQ(read(final_dir / "w"), "2");
  EXPECT_FALSE(fs::exists(final_dir / "v"));  // replaced as a whole, not merged
  EXPECT_EQ(others({"out"}), 0);              // no tmp, no ".old-" left
}

TEST_F(FilesTest, SiblingTempDirsAreNewAndDistinct) {
  auto a = makeSiblingTempDir(dir_ / "out", ".tmp-");
  auto b = makeSiblingTempDir(dir_ / "out", ".tmp-");
  ASSERT_TRUE(a.isOk() && b.isOk());
  EXPECT_NE(*a, *b);
  EXPECT_TRUE(fs::is_directory(*a) && fs::is_empty(*a));
  EXPECT_EQ(a->parent_path(), dir_);
  EXPECT_EQ(a->filename().string().rfind("out.tmp-", 0), 0u) << *a;
  auto bad = makeSiblingTempDir(dir_ / "missing" / "out", ".tmp-");
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.status().message().find((dir_ / "missing" / "out").string()), std::string::npos);
}

TEST_F(FilesTest, ReplaceDirectoryFailureKeepsTheOldOne) {
  const fs::path final_dir = dir_ / "out";
  fs::create_directories(final_dir);
  ASSERT_TRUE(writeFile(final_dir / "v", "old").isOk());
  const fs::path missing = dir_ / "never_written";
  Status st = replaceDirectoryAtomic(missing, final_dir);
  ASSERT_FALSE(st.isOk());
  EXPECT_NE(st.message().find(missing.string()), std::string::npos) << st.message();
  EXPECT_NE(st.message().find(final_dir.string()), std::string::npos) << st.message();
  EXPECT_EQ(read(final_dir / "v"), "old");
  EXPECT_EQ(others({"out"}), 0);
}

}  // namespace
}  // namespace archipelago::core
