// data prepare: normalisation, dedup, atomic output, byte-identical re-runs,
// manifest consistency, checksum failures.
#include <algorithm>
#include <set>

#include <gtest/gtest.h>

#include "archipelago/core/hash.h"
#include "archipelago/data/dataset.h"
#include "archipelago/data/prepare.h"
#include "archipelago/data/shard.h"
#include "data/data_test_util.h"

namespace archipelago::data {
namespace {

using testing::readAll;
using testing::ScratchDir;
using testing::writeText;

TEST(Normalize, KnownCases) {
  EXPECT_EQ(normalizeText("a\r\nb\rc\n"), "a\nb\nc");
  EXPECT_EQ(normalizeText("  lead  \t\n\n"), "lead");
  EXPECT_EQ(normalizeText("x  \ny\t\t\n"), "x\ny");
  EXPECT_EQ(normalizeText("p1\n\np2"), "p1\n\np2");
  EXPECT_EQ(normalizeText("p1\n\n\np2"), "p1\n\n\np2");             // two blank lines kept
  EXPECT_EQ(normalizeText("p1\n\n\n\n\n\np2"), "p1\n\n\np2");       // five collapse to two
  EXPECT_EQ(normalizeText("p1\r\n \r\n\t\r\n  \r\n\r\np2"), "p1\n\n\np2");
  EXPECT_EQ(normalizeText("  indented\n  second"), "indented\n  second");
  EXPECT_EQ(normalizeText(" \n\t\r\n "), "");
  EXPECT_EQ(normalizeText(""), "");
}

TEST(Normalize, ValidationSplitIsSeededAndNearFraction) {
  int hits = 0;
  for (int i = 0; i < 20000; ++i) hits += isValidationDocument("doc " + std::to_string(i), 1, 0.1) ? 1 : 0;
  EXPECT_NEAR(hits / 20000.0, 0.1, 0.01);
  int differ = 0;
  for (int i = 0; i < 200; ++i) {
    std::string d = "doc " + std::to_string(i);
    differ += isValidationDocument(d, 1, 0.5) != isValidationDocument(d, 2, 0.5);
  }
  EXPECT_GT(differ, 50);
  EXPECT_FALSE(isValidationDocument("x", 1, 0.0));
}

// Decodes a split's stream back into documents (EOS-separated).
std::vector<std::string> splitDocuments(const PreparedDataset& ds, const TokenReader& r) {
  std::vector<int32_t> all(static_cast<size_t>(r.size()));
  r.read(0, all);
  std::vector<std::string> docs;
  std::vector<int32_t> cur;
  for (int32_t id : all) {
    if (id == ds.tokenizer().eosId()) {
      docs.push_back(ds.tokenizer().decode(cur));
      cur.clear();
    } else {
      cur.push_back(id);
    }
  }
  EXPECT_TRUE(cur.empty()) << "stream does not end with EOS";
  return docs;
}

PrepareOptions byteOptions(const ScratchDir& dir, std::vector<std::string> inputs, const std::string& out) {
  PrepareOptions o;
  o.inputs = std::move(inputs);
  o.out = (dir / out).string();
  o.tokenizer = "byte";
  o.val_fraction = 0.25;
  o.seed = 5;
  return o;
}

TEST(Prepare, DedupNormalisesAndCounts) {
  ScratchDir dir;
  auto in = dir / "in";
  writeText(in / "a.txt", "Hello world.\r\nSecond line.  \n");
  writeText(in / "a.json", R"({"text": "Hello world.\nSecond line.", "year": 1790})");  // same after normalising
  writeText(in / "sub/b.jsonl", "{\"text\": \"alpha\"}\n\n{\"text\": \"beta\"}\n{\"text\": \"alpha\"}\n");
  writeText(in / "c.json", R"([{"text": "gamma"}, {"text": "   \n\n "}, {"text": "beta"}])");
  writeText(in / "ignored.md", "not an input");

  auto r = prepareDataset(byteOptions(dir, {in.string()}, "out"));
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  const Manifest& m = r->manifest;
  EXPECT_EQ(m.dedup.documents_read, 8);
  EXPECT_EQ(m.dedup.empty_dropped, 1);
  EXPECT_EQ(m.dedup.duplicates_removed, 3);  // a.txt (dup of a.json), alpha, beta
  EXPECT_EQ(m.dedup.documents_kept, 4);
  ASSERT_EQ(m.inputs.size(), 4u);  // sorted: a.json, a.txt, c.json, sub/b.jsonl
  EXPECT_EQ(m.inputs[0].path, (in / "a.json").string());
  EXPECT_EQ(m.inputs[1].path, (in / "a.txt").string());
  EXPECT_EQ(m.inputs[2].path, (in / "c.json").string());
  EXPECT_EQ(m.inputs[3].path, (in / "sub/b.jsonl").string());
  EXPECT_EQ(m.inputs[3].documents, 3);

  auto ds = PreparedDataset::open(dir / "out");
  ASSERT_TRUE(ds.isOk()) << ds.status().toString();
  std::multiset<std::string> got;
  for (auto& d : splitDocuments(**ds, (*ds)->train())) got.insert(d);
  ASSERT_NE((*ds)->val(), nullptr);
  for (auto& d : splitDocuments(**ds, *(*ds)->val())) got.insert(d);
  std::multiset<std::string> want = {"Hello world.\nSecond line.", "gamma", "beta", "alpha"};
  EXPECT_EQ(got, want);
  EXPECT_EQ(m.train.documents + m.val.documents, 4);
  EXPECT_GE(m.val.documents, 1);
}

TEST(Prepare, ByteIdenticalRerunAndManifestConsistency) {
  ScratchDir dir;
  auto docs = testing::syntheticDocs(60, 120);
  for (size_t i = 0; i < docs.size(); ++i) writeText(dir / ("in/d" + std::to_string(i) + ".txt"), docs[i]);
  auto o1 = byteOptions(dir, {(dir / "in").string()}, "run1");
  o1.shard_bytes = 4096;  // several shards
  auto o2 = o1;
  o2.out = (dir / "run2").string();
  auto r1 = prepareDataset(o1);
  auto r2 = prepareDataset(o2);
  ASSERT_TRUE(r1.isOk()) << r1.status().toString();
  ASSERT_TRUE(r2.isOk()) << r2.status().toString();

  auto o3 = o1;  // no in-memory cache: pass 2 re-reads the inputs
  o3.out = (dir / "run3").string();
  o3.cache_bytes = 0;
  ASSERT_TRUE(prepareDataset(o3).isOk());
  for (auto& e : std::filesystem::directory_iterator(dir / "run1")) {
    EXPECT_EQ(readAll(e.path()), readAll(dir / "run3" / e.path().filename())) << e.path();
  }

  std::vector<std::string> names1, names2;
  for (auto& e : std::filesystem::directory_iterator(dir / "run1")) names1.push_back(e.path().filename().string());
  for (auto& e : std::filesystem::directory_iterator(dir / "run2")) names2.push_back(e.path().filename().string());
  std::sort(names1.begin(), names1.end());
  std::sort(names2.begin(), names2.end());
  ASSERT_EQ(names1, names2);
  for (auto& n : names1) EXPECT_EQ(readAll(dir / "run1" / n), readAll(dir / "run2" / n)) << n;

  // Manifest vs. files, with OpenSSL's sha256 of the file as the reference.
  auto m = loadManifest(dir / "run1");
  ASSERT_TRUE(m.isOk()) << m.status().toString();
  EXPECT_GT(m->train.shards.size(), 2u);
  EXPECT_EQ(m->dtype, "uint16");
  EXPECT_EQ(m->vocab_size, 259);
  int64_t bytes_total = 0;
  for (const SplitInfo* s : {&m->train, &m->val}) {
    for (auto& sh : s->shards) {
      auto path = dir / "run1" / sh.file;
      EXPECT_EQ(static_cast<int64_t>(std::filesystem::file_size(path)), 64 + 2 * sh.tokens);
      EXPECT_EQ(*core::sha256File(path), sh.sha256);
      bytes_total += sh.tokens - sh.documents;  // payload bytes without EOS
    }
  }
  // Byte tokenizer: one token per byte of each kept (all unique, none empty) document.
  int64_t text_bytes = 0;
  for (auto& d : docs) text_bytes += static_cast<int64_t>(normalizeText(d).size());
  EXPECT_EQ(bytes_total, text_bytes);
  EXPECT_EQ(m->train.documents + m->val.documents, 60);
  EXPECT_EQ(m->dedup.documents_kept, 60);
  for (auto& in : m->inputs) EXPECT_EQ(*core::sha256File(in.path), in.sha256);
  EXPECT_EQ(m->options.val_fraction, 0.25);
  EXPECT_EQ(m->options.shard_bytes, 4096u);
}

TEST(Prepare, ErrorsLeaveNothingBehind) {
  ScratchDir dir;
  writeText(dir / "in/a.txt", "fine");
  writeText(dir / "in/b.jsonl", "{\"text\": \"ok\"}\n{\"txt\": \"no text field\"}\n");
  auto r = prepareDataset(byteOptions(dir, {(dir / "in").string()}, "out"));
  ASSERT_FALSE(r.isOk());
  EXPECT_EQ(r.status().code(), core::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("b.jsonl:2"), std::string::npos) << r.status().message();
  // Neither the output nor a temporary directory exists.
  int entries = 0;
  for (auto& e : std::filesystem::directory_iterator(dir.path())) entries += e.path().filename() != "in";
  EXPECT_EQ(entries, 0);

  auto missing = prepareDataset(byteOptions(dir, {(dir / "nope").string()}, "out"));
  ASSERT_FALSE(missing.isOk());
  EXPECT_NE(missing.status().message().find("nope"), std::string::npos);

  auto o = byteOptions(dir, {(dir / "in/a.txt").string()}, "out");
  o.tokenizer = "wordpiece";
  EXPECT_EQ(prepareDataset(o).status().code(), core::StatusCode::kInvalidArgument);
}

// --force replaces a prepared dataset only: never an input, a directory
// holding one, one inside an input, or a directory of other files. Each
// refusal leaves every file where it was.
TEST(Prepare, ForceNeverReplacesInputsOrDirectoriesThatAreNotDatasets) {
  ScratchDir dir;
  writeText(dir / "in/a.txt", "one document");
  writeText(dir / "notes/keep.txt", "somebody's notes");
  auto intact = [&] {
    return std::filesystem::exists(dir / "in/a.txt") && std::filesystem::exists(dir / "notes/keep.txt");
  };
  struct Case {
    std::string out, want;
  };
  const std::vector<Case> cases = {
      {"in", "is or contains the input"},         // --out the input itself
      {".", "is or contains the input"},          // --out a parent of the input
      {"in/data", "inside the input directory"},  // --out inside the input
      {"notes", "not a prepared dataset"},        // a directory of other files
  };
  for (const auto& c : cases) {
    auto o = byteOptions(dir, {(dir / "in").string()}, c.out);
    o.force = true;
    auto r = prepareDataset(o);
    ASSERT_FALSE(r.isOk()) << c.out;
    EXPECT_NE(r.status().message().find(c.want), std::string::npos) << c.out << ": " << r.status().toString();
    EXPECT_NE(r.status().message().find("--out"), std::string::npos);
    EXPECT_TRUE(intact()) << "--out " << c.out << " --force lost files";
  }
  // A single input file: --out its directory is refused too.
  auto o = byteOptions(dir, {(dir / "in/a.txt").string()}, "in");
  o.force = true;
  EXPECT_FALSE(prepareDataset(o).isOk());
  EXPECT_TRUE(intact());
}

TEST(Prepare, ExistingOutputNeedsForce) {
  ScratchDir dir;
  writeText(dir / "in/a.txt", "one document");
  writeText(dir / "in/b.txt", "another document");
  auto o = byteOptions(dir, {(dir / "in").string()}, "out");
  ASSERT_TRUE(prepareDataset(o).isOk());
  auto again = prepareDataset(o);
  ASSERT_FALSE(again.isOk());
  EXPECT_EQ(again.status().code(), core::StatusCode::kAlreadyExists);
  o.force = true;
  o.val_fraction = 0.0;
  auto forced = prepareDataset(o);
  ASSERT_TRUE(forced.isOk()) << forced.status().toString();
  auto m = loadManifest(dir / "out");
  ASSERT_TRUE(m.isOk());
  EXPECT_EQ(m->options.val_fraction, 0.0);
  EXPECT_EQ(m->val.documents, 0);
  int entries = 0;
  for (auto& e : std::filesystem::directory_iterator(dir.path())) entries += e.path().filename() != "in";
  EXPECT_EQ(entries, 1);  // only "out"
}

TEST(Shard, HeaderIsLittleEndianAtFixedOffsets) {
  ShardHeader h;
  h.token_bytes = 4;
  h.count = 0x0102030405060708ULL;
  h.documents = 3;
  h.vocab_size = 70000;
  uint8_t b[kShardHeaderBytes];
  h.encode(b);
  const uint8_t want_prefix[] = {'A', 'R', 'C', 'H', 'T', 'O', 'K', 0, 1, 0, 0, 0, 4, 0, 0, 0,
                                 8, 7, 6, 5, 4, 3, 2, 1, 3, 0, 0, 0, 0, 0, 0, 0,
                                 0x70, 0x11, 0x01, 0, 0, 0, 0, 0, 64, 0, 0, 0};
  for (size_t i = 0; i < sizeof(want_prefix); ++i) EXPECT_EQ(b[i], want_prefix[i]) << "byte " << i;
  for (size_t i = sizeof(want_prefix); i < kShardHeaderBytes; ++i) EXPECT_EQ(b[i], 0) << "byte " << i;
  auto d = ShardHeader::decode(b, sizeof(b), "x");
  ASSERT_TRUE(d.isOk());
  EXPECT_EQ(d->count, h.count);
  EXPECT_EQ(d->vocab_size, 70000u);
  EXPECT_FALSE(ShardHeader::decode(b, 10, "x").isOk());
}

TEST(Prepare, LargeVocabUsesUint32) {
  ScratchDir dir;
  writeText(dir / "in/a.txt", "abc");
  writeText(dir / "in/b.txt", "\xff\x01");
  auto o = byteOptions(dir, {(dir / "in").string()}, "out");
  o.vocab = 70000;
  o.val_fraction = 0;
  ASSERT_TRUE(prepareDataset(o).isOk());
  auto ds = PreparedDataset::open(dir / "out");
  ASSERT_TRUE(ds.isOk()) << ds.status().toString();
  EXPECT_EQ((*ds)->manifest().dtype, "uint32");
  EXPECT_EQ((*ds)->vocabSize(), 70000);
  std::vector<int64_t> all(7);
  (*ds)->train().read(0, all);
  EXPECT_EQ(all, (std::vector<int64_t>{'a', 'b', 'c', 257, 0xff, 0x01, 257}));
  EXPECT_EQ(std::filesystem::file_size(dir / "out/train-00000.bin"), 64u + 7 * 4);
}

class CorruptionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto docs = testing::syntheticDocs(20, 80);
    for (size_t i = 0; i < docs.size(); ++i) writeText(dir_ / ("in/d" + std::to_string(i) + ".txt"), docs[i]);
    auto o = byteOptions(dir_, {(dir_ / "in").string()}, "out");
    auto r = prepareDataset(o);
    ASSERT_TRUE(r.isOk()) << r.status().toString();
    shard_ = dir_ / "out" / r->manifest.train.shards[0].file;
    ASSERT_TRUE(PreparedDataset::open(dir_ / "out").isOk());
  }
  ScratchDir dir_;
  std::filesystem::path shard_;
};

TEST_F(CorruptionTest, FlippedByteIsDataLossNamingTheFile) {
  std::string bytes = readAll(shard_);
  bytes[bytes.size() / 2] ^= 0x01;
  writeText(shard_, bytes);
  auto ds = PreparedDataset::open(dir_ / "out");
  ASSERT_FALSE(ds.isOk());
  EXPECT_EQ(ds.status().code(), core::StatusCode::kDataLoss);
  EXPECT_NE(ds.status().message().find(shard_.string()), std::string::npos) << ds.status().message();
  EXPECT_NE(ds.status().message().find("checksum"), std::string::npos) << ds.status().message();
  // Without checksum verification the header/size checks still pass.
  EXPECT_TRUE(PreparedDataset::open(dir_ / "out", /*verify_checksums=*/false).isOk());
}

TEST_F(CorruptionTest, TruncatedShardIsDataLoss) {
  std::string bytes = readAll(shard_);
  writeText(shard_, bytes.substr(0, bytes.size() - 3));
  auto ds = PreparedDataset::open(dir_ / "out", /*verify_checksums=*/false);
  ASSERT_FALSE(ds.isOk());
  EXPECT_EQ(ds.status().code(), core::StatusCode::kDataLoss);
  EXPECT_NE(ds.status().message().find(shard_.string()), std::string::npos);
  EXPECT_NE(ds.status().message().find("truncated"), std::string::npos) << ds.status().message();
}

TEST_F(CorruptionTest, MissingShardAndBadHeader) {
  std::string bytes = readAll(shard_);
  bytes[0] = 'X';  // magic
  writeText(shard_, bytes);
  auto bad = PreparedDataset::open(dir_ / "out", false);
  ASSERT_FALSE(bad.isOk());
  EXPECT_EQ(bad.status().code(), core::StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("magic"), std::string::npos);
  std::filesystem::remove(shard_);
  auto missing = PreparedDataset::open(dir_ / "out");
  ASSERT_FALSE(missing.isOk());
  EXPECT_EQ(missing.status().code(), core::StatusCode::kDataLoss);
  EXPECT_NE(missing.status().message().find(shard_.string()), std::string::npos);
}

TEST_F(CorruptionTest, BrokenManifestNamesTheField) {
  auto mpath = dir_ / "out/manifest.json";
  std::string text = readAll(mpath);
  auto pos = text.find("\"dtype\"");
  ASSERT_NE(pos, std::string::npos);
  text.replace(pos, 7, "\"dtypo\"");
  writeText(mpath, text);
  auto ds = PreparedDataset::open(dir_ / "out");
  ASSERT_FALSE(ds.isOk());
  EXPECT_EQ(ds.status().code(), core::StatusCode::kDataLoss);
  EXPECT_NE(ds.status().message().find("dtype"), std::string::npos) << ds.status().message();
}

}  // namespace
}  // namespace archipelago::data
