// Byte and SentencePiece tokenizers: round trips and prepare with spm.
#include <gtest/gtest.h>

#include "archipelago/data/dataset.h"
#include "archipelago/data/prepare.h"
#include "archipelago/data/tokenizer.h"
#include "data/data_test_util.h"

namespace archipelago::data {
namespace {

using testing::readAll;
using testing::ScratchDir;
using testing::writeText;

TEST(ByteTokenizer, IdsAreTheBytesAndRoundTrip) {
  ByteTokenizer t;
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  std::string text = "Fellow-Citizens \xe2\x80\x94 caf\xc3\xa9\n" + all;
  auto ids = t.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  for (size_t i = 0; i < text.size(); ++i) EXPECT_EQ(ids[i], static_cast<uint8_t>(text[i]));
  EXPECT_EQ(t.decode(ids), text);
  // Specials decode to nothing.
  ids.insert(ids.begin(), t.bosId());
  ids.push_back(t.eosId());
  ids.push_back(t.padId());
  EXPECT_EQ(t.decode(ids), text);
  EXPECT_EQ(t.vocabSize(), 259);
  EXPECT_EQ(t.eosId(), 257);
  EXPECT_EQ(ByteTokenizer(320).vocabSize(), 320);
}

std::vector<std::string> trainingSentences() {
  std::vector<std::string> s;
  for (auto& d : testing::syntheticDocs(150, 60)) {
    size_t pos = 0;
    while (pos < d.size()) {
      size_t nl = d.find('\n', pos);
      if (nl == std::string::npos) nl = d.size();
      s.push_back(d.substr(pos, nl - pos));
      pos = nl + 1;
    }
  }
  return s;
}

TEST(SpmTokenizer, TrainRoundTripAndDeterminism) {
  SpmTrainOptions o;
  o.vocab_size = 340;
  o.threads = 2;
  auto model = trainSpm(trainingSentences(), o);
  ASSERT_TRUE(model.isOk()) << model.status().toString();
  auto again = trainSpm(trainingSentences(), o);
  ASSERT_TRUE(again.isOk());
  EXPECT_EQ(*model, *again) << "SentencePiece training is not deterministic";

  auto tok = SpmTokenizer::fromSerialized(*model);
  ASSERT_TRUE(tok.isOk()) << tok.status().toString();
  EXPECT_EQ((*tok)->vocabSize(), 340);
  EXPECT_EQ((*tok)->unkId(), 0);
  EXPECT_EQ((*tok)->bosId(), 1);
  EXPECT_EQ((*tok)->eosId(), 2);
  EXPECT_EQ((*tok)->padId(), 3);
  // Seen words compress; unseen characters go through byte fallback; spacing
  // and newlines survive.
  for (std::string text : {std::string("the state of the union"), std::string("  two  spaces\n\nand\ttabs "),
                           std::string("caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80 zebra 12345"),
                           testing::syntheticDocs(1, 200, 99)[0]}) {
    auto ids = (*tok)->encode(text);
    EXPECT_EQ((*tok)->decode(ids), text);
    for (int32_t id : ids) EXPECT_NE(id, 0) << "unknown piece in '" << text << "'";
  }
  auto common = (*tok)->encode("the state of the union");
  EXPECT_LT(common.size(), 15u);
}

TEST(SpmTokenizer, PrepareWithSpmIsByteIdenticalAndLoads) {
  ScratchDir dir;
  auto docs = testing::syntheticDocs(120, 80);
  for (size_t i = 0; i < docs.size(); ++i) writeText(dir / ("in/d" + std::to_string(i) + ".txt"), docs[i]);
  PrepareOptions o;
  o.inputs = {(dir / "in").string()};
  o.tokenizer = "spm";
  o.vocab = 340;
  o.val_fraction = 0.1;
  o.out = (dir / "a").string();
  auto ra = prepareDataset(o);
  ASSERT_TRUE(ra.isOk()) << ra.status().toString();
  o.out = (dir / "b").string();
  auto rb = prepareDataset(o);
  ASSERT_TRUE(rb.isOk()) << rb.status().toString();
  for (auto& e : std::filesystem::directory_iterator(dir / "a")) {
    auto name = e.path().filename().string();
    EXPECT_EQ(readAll(e.path()), readAll(dir / "b" / name)) << name;
  }
  auto ds = PreparedDataset::open(dir / "a");
  ASSERT_TRUE(ds.isOk()) << ds.status().toString();
  EXPECT_EQ((*ds)->tokenizer().kind(), "spm");
  EXPECT_EQ((*ds)->vocabSize(), 340);
  EXPECT_EQ((*ds)->manifest().tokenizer.file, "tokenizer.model");
  // The first training document decodes back to its normalised text.
  const auto& train = (*ds)->train();
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < train.size() && train.token(i) != (*ds)->tokenizer().eosId(); ++i) ids.push_back(train.token(i));
  std::string first = (*ds)->tokenizer().decode(ids);
  bool found = false;
  for (auto& d : docs) found |= normalizeText(d) == first;
  EXPECT_TRUE(found) << first;

  // A replaced tokenizer model is refused.
  writeText(dir / "a/tokenizer.model", "garbage");
  auto bad = PreparedDataset::open(dir / "a");
  ASSERT_FALSE(bad.isOk());
  EXPECT_EQ(bad.status().code(), core::StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("tokenizer.model"), std::string::npos);
}

}  // namespace
}  // namespace archipelago::data
