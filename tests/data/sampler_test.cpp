// Sampler: determinism across rank counts, shares, exact resume, validation.
#include <algorithm>
#include <numeric>

#include <gtest/gtest.h>

#include "archipelago/data/dataset.h"
#include "archipelago/data/prepare.h"
#include "archipelago/data/sampler.h"
#include "data/data_test_util.h"

namespace archipelago::data {
namespace {

using testing::ScratchDir;
using testing::writeText;

TEST(ShareRange, SlicesOfTheGlobalBatch) {
  std::vector<int64_t> s = {3, 0, 4, 1};
  EXPECT_EQ(shareRange(s, 0).begin, 0);
  EXPECT_EQ(shareRange(s, 0).count, 3);
  EXPECT_EQ(shareRange(s, 1).begin, 3);
  EXPECT_EQ(shareRange(s, 1).count, 0);
  EXPECT_EQ(shareRange(s, 2).begin, 3);
  EXPECT_EQ(shareRange(s, 3).begin, 7);
  EXPECT_EQ(shareRange(s, 3).count, 1);
}

// A prepared byte dataset whose token stream the test also builds itself
// (the reference): bytes of each normalised document followed by EOS.
class SamplerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    docs_ = testing::syntheticDocs(40, 50);
    for (size_t i = 0; i < docs_.size(); ++i) writeText(dir_ / ("in/d" + std::to_string(100 + i) + ".txt"), docs_[i]);
    PrepareOptions o;
    o.inputs = {(dir_ / "in").string()};
    o.out = (dir_ / "out").string();
    o.val_fraction = 0.2;
    o.shard_bytes = 2048;
    auto r = prepareDataset(o);
    ASSERT_TRUE(r.isOk()) << r.status().toString();
    auto ds = PreparedDataset::open(dir_ / "out");
    ASSERT_TRUE(ds.isOk()) << ds.status().toString();
    ds_ = std::move(*ds);
    // Files are read in sorted order (d100..d139 = creation order).
    for (auto& d : docs_) {
      std::string t = normalizeText(d);
      auto& stream = isValidationDocument(t, o.seed, o.val_fraction) ? val_stream_ : train_stream_;
      for (unsigned char c : t) stream.push_back(c);
      stream.push_back(ByteTokenizer::kEos);
    }
  }
  ScratchDir dir_;
  std::vector<std::string> docs_;
  std::unique_ptr<PreparedDataset> ds_;
  std::vector<int64_t> train_stream_, val_stream_;
};

TEST_F(SamplerTest, StreamMatchesReference) {
  ASSERT_EQ(ds_->train().size(), static_cast<int64_t>(train_stream_.size()));
  ASSERT_NE(ds_->val(), nullptr);
  ASSERT_EQ(ds_->val()->size(), static_cast<int64_t>(val_stream_.size()));
  EXPECT_GT(ds_->train().numShards(), 3);
  std::vector<int64_t> all(train_stream_.size());
  ds_->train().read(0, all);
  EXPECT_EQ(all, train_stream_);
  for (int64_t i : {int64_t{0}, int64_t{777}, ds_->train().size() - 1}) {
    EXPECT_EQ(ds_->train().token(i), train_stream_[static_cast<size_t>(i)]);
  }
}

TEST_F(SamplerTest, SamplesAreWindowsAndEachPassIsAPermutation) {
  const int64_t L = 32;
  auto s = ds_->trainSampler(11, L);
  ASSERT_TRUE(s.isOk()) << s.status().toString();
  const int64_t slots = s->slotsPerPass();
  EXPECT_EQ(slots, (static_cast<int64_t>(train_stream_.size()) - 1) / L);
  for (int64_t pass = 0; pass < 3; ++pass) {
    std::vector<int64_t> starts;
    for (int64_t j = 0; j < slots; ++j) starts.push_back(s->sampleStart(pass * slots + j));
    std::vector<int64_t> sorted = starts;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t j = 0; j < slots; ++j) ASSERT_EQ(sorted[static_cast<size_t>(j)], j * L);
    if (pass == 0) {
      std::vector<int64_t> identity(sorted);
      EXPECT_NE(starts, identity) << "not shuffled";
    }
  }
  std::vector<int64_t> in(L), tg(L);
  for (int64_t g : {int64_t{0}, int64_t{5}, slots + 3}) {
    s->sample(g, in.data(), tg.data());
    int64_t st = s->sampleStart(g);
    for (int64_t k = 0; k < L; ++k) {
      ASSERT_EQ(in[static_cast<size_t>(k)], train_stream_[static_cast<size_t>(st + k)]);
      ASSERT_EQ(tg[static_cast<size_t>(k)], train_stream_[static_cast<size_t>(st + k + 1)]);
    }
  }
  // Another seed, another order; the same seed, the same order.
  auto s2 = ds_->trainSampler(12, L);
  auto s3 = ds_->trainSampler(11, L);
  int differ = 0;
  for (int64_t g = 0; g < slots; ++g) {
    differ += s2->sampleStart(g) != s->sampleStart(g);
    EXPECT_EQ(s3->sampleStart(g), s->sampleStart(g));
  }
  EXPECT_GT(differ, slots / 2);
}

TEST_F(SamplerTest, RankSlicesConcatenateToTheGlobalBatch) {
  const int64_t L = 16;
  auto s = ds_->trainSampler(3, L);
  ASSERT_TRUE(s.isOk());
  const std::vector<std::vector<int64_t>> layouts = {{7}, {3, 4}, {1, 4, 2}, {0, 6, 1}};
  for (int64_t step = 0; step < 40; step += 13) {  // crosses pass boundaries
    Batch ref = s->batchForRank(step, {7}, 0);
    ASSERT_EQ(ref.n, 7);
    for (int64_t k = 0; k < 7; ++k) EXPECT_EQ(ref.indices[static_cast<size_t>(k)], step * 7 + k);
    for (const auto& shares : layouts) {
      std::vector<int64_t> in, tg, idx;
      for (int r = 0; r < static_cast<int>(shares.size()); ++r) {
        Batch b = s->batchForRank(step, shares, r);
        EXPECT_EQ(b.n, shares[static_cast<size_t>(r)]);
        EXPECT_EQ(b.input.size(), static_cast<size_t>(b.n * L));
        in.insert(in.end(), b.input.begin(), b.input.end());
        tg.insert(tg.end(), b.target.begin(), b.target.end());
        idx.insert(idx.end(), b.indices.begin(), b.indices.end());
      }
      EXPECT_EQ(idx, ref.indices);
      EXPECT_EQ(in, ref.input);
      EXPECT_EQ(tg, ref.target);
    }
  }
}

TEST_F(SamplerTest, ExactResumeFromSavedPosition) {
  const int64_t L = 24;
  auto a = ds_->trainSampler(9, L);
  ASSERT_TRUE(a.isOk());
  // Shares change mid-run (rebalancing); the global batch stays 6.
  auto sharesAt = [](int step) { return step < 5 ? std::vector<int64_t>{2, 4} : std::vector<int64_t>{3, 1, 2}; };
  std::vector<std::vector<int64_t>> uninterrupted;
  int64_t saved = -1;
  for (int step = 0; step < 12; ++step) {
    if (step == 7) saved = a->position();
    auto shares = sharesAt(step);
    std::vector<int64_t> global;
    // Every rank's cursor advances alike; use copies for the other ranks.
    for (int r = 0; r < static_cast<int>(shares.size()); ++r) {
      Batch b = a->batchAt(a->position(), shares, r);
      global.insert(global.end(), b.input.begin(), b.input.end());
    }
    a->nextBatch(shares, 0);
    uninterrupted.push_back(global);
  }
  ASSERT_EQ(saved, 7 * 6);
  auto b = ds_->trainSampler(9, L);
  ASSERT_TRUE(b.isOk());
  b->setPosition(saved);
  for (int step = 7; step < 12; ++step) {
    auto shares = sharesAt(step);
    std::vector<int64_t> global;
    for (int r = 0; r < static_cast<int>(shares.size()); ++r) {
      Batch bb = b->batchAt(b->position(), shares, r);
      global.insert(global.end(), bb.input.begin(), bb.input.end());
    }
    b->nextBatch(shares, 0);
    EXPECT_EQ(global, uninterrupted[static_cast<size_t>(step)]) << "step " << step;
  }
  EXPECT_EQ(a->position(), b->position());
}

TEST_F(SamplerTest, ValidationIsSequentialAndDeterministic) {
  const int64_t L = 8;
  auto v1 = ds_->valSampler(L);
  auto v2 = ds_->valSampler(L);
  ASSERT_TRUE(v1.isOk()) << v1.status().toString();
  const int64_t slots = v1->slotsPerPass();
  EXPECT_EQ(slots, (static_cast<int64_t>(val_stream_.size()) - 1) / L);
  for (int64_t i = 0; i < 5; ++i) {
    Batch a = v1->batchAt(i * 4, {4}, 0);
    Batch b = v2->batchAt(i * 4, {1, 3}, 1);
    for (int64_t k = 0; k < 4; ++k) {
      int64_t g = i * 4 + k;
      int64_t start = (g % slots) * L;
      for (int64_t t = 0; t < L; ++t) {
        ASSERT_EQ(a.input[static_cast<size_t>(k * L + t)], val_stream_[static_cast<size_t>(start + t)]);
        ASSERT_EQ(a.target[static_cast<size_t>(k * L + t)], val_stream_[static_cast<size_t>(start + t + 1)]);
      }
    }
    std::vector<int64_t> tail(a.input.begin() + L, a.input.end());
    EXPECT_EQ(b.input, tail);
  }
  auto too_long = ds_->valSampler(1 << 20);
  EXPECT_EQ(too_long.status().code(), core::StatusCode::kFailedPrecondition);
}

TEST(PreparedDataset, OpenOrPrepareFromJobConfig) {
  ScratchDir dir;
  auto docs = testing::syntheticDocs(10, 40);
  for (size_t i = 0; i < docs.size(); ++i) writeText(dir / ("in/d" + std::to_string(i) + ".txt"), docs[i]);
  core::DataConfig cfg;
  cfg.dir = (dir / "prepared").string();
  cfg.inputs = {(dir / "in").string()};
  cfg.val_fraction = 0.1;
  auto ds = PreparedDataset::openOrPrepare(cfg, false);
  ASSERT_TRUE(ds.isOk()) << ds.status().toString();
  EXPECT_EQ((*ds)->manifest().dedup.documents_kept, 10);
  EXPECT_NE((*ds)->val(), nullptr);
  auto again = PreparedDataset::openOrPrepare(cfg, false);  // now just opens
  ASSERT_TRUE(again.isOk());
  cfg.dir = (dir / "absent").string();
  cfg.inputs.clear();
  auto missing = PreparedDataset::openOrPrepare(cfg, false);
  ASSERT_FALSE(missing.isOk());
  EXPECT_EQ(missing.status().code(), core::StatusCode::kNotFound);
}

}  // namespace
}  // namespace archipelago::data
