// The one checkpoint scheme's map (runtime/shard_map.h): a rank's flat
// buffer as pieces of the single-process model, and the writer's assembly
// of those pieces, checked against offsets written out by hand.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "archipelago/runtime/shard_map.h"

namespace archipelago::runtime {
namespace {

// Single-process layout: a [2, 3] at 0, b [4] at 6, c [5] at 10; 15 in all.
TensorLayout fullLayout() { return {{"a", {2, 3}}, {"b", {4}}, {"c", {5}}}; }

ParamSegment seg(const std::string& name, int64_t offset, std::vector<int64_t> shape) {
  ParamSegment s;
  s.name = name;
  s.offset = offset;
  s.shape = shape;
  s.numel = 1;
  for (auto d : shape) s.numel *= d;
  return s;
}

TEST(ShardMap, PiecesCutRangesAtTensorEndsAndLoadByName) {
  // A rank holding c then a (another order than the single-process one).
  auto map = ShardMap::build(fullLayout(), {seg("c", 0, {5}), seg("a", 5, {2, 3})});
  ASSERT_TRUE(map.isOk()) << map.status().toString();
  EXPECT_EQ(map->fullNumel(), 15);
  EXPECT_EQ(map->fullOffset("b"), 6);
  EXPECT_EQ(map->fullOffset("zz"), -1);
  // A ZeRO-style slice [3, 8) of the local buffer: the end of c, the start of a.
  auto p = map->pieces(3, 8);
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].name, "c");
  EXPECT_EQ(p[0].begin, 3);
  EXPECT_EQ(p[0].end, 5);
  EXPECT_EQ(p[0].local, 3);
  EXPECT_EQ(p[1].name, "a");
  EXPECT_EQ(p[1].begin, 0);
  EXPECT_EQ(p[1].end, 3);
  EXPECT_EQ(p[1].local, 5);

  const torch::Tensor full = torch::arange(15, torch::kFloat);
  torch::Tensor local = torch::full({11}, -1.0f);
  map->load(map->pieces(0, 11), full, local);
  // c is full[10..15), a is full[0..6).
  const std::vector<float> want = {10, 11, 12, 13, 14, 0, 1, 2, 3, 4, 5};
  for (int64_t i = 0; i < 11; ++i) EXPECT_EQ(local[i].item<float>(), want[static_cast<size_t>(i)]) << i;
  // Loading into a slice that starts at local offset 3 (a ZeRO-1 shard's moments).
  torch::Tensor slice = torch::zeros({5});
  map->load(p, full, slice, 3);
  EXPECT_EQ(slice[0].item<float>(), 13);
  EXPECT_EQ(slice[2].item<float>(), 0);
  EXPECT_EQ(slice[4].item<float>(), 2);
}

TEST(ShardMap, TensorParallelSlicesMapToTheirElementsOfTheWholeTensor) {
  // Two TP ranks of a = [2, 3]: rank 1's row slice (dim 0, row 1) and its
  // column slice (dim 1, columns [1, 3)) of the same tensor in two layouts.
  const model::TensorSlice rows{0, 1, 1, 2}, cols{1, 1, 2, 3};
  auto by_rows = ShardMap::build(fullLayout(), {seg("b", 0, {4}), seg("a", 4, {1, 3})}, {{"a", rows}});
  ASSERT_TRUE(by_rows.isOk()) << by_rows.status().toString();
  auto p = by_rows->pieces(4, 7);
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].begin, 3);  // row 1 of a [2, 3]
  EXPECT_EQ(p[0].end, 6);
  EXPECT_EQ(p[0].local, 4);

  auto by_cols = ShardMap::build(fullLayout(), {seg("a", 0, {2, 2})}, {{"a", cols}});
  ASSERT_TRUE(by_cols.isOk()) << by_cols.status().toString();
  // Local [a01 a02 a11 a12] (row-major [2, 2]); a ZeRO-style cut [1, 4) too.
  auto q = by_cols->pieces(0, 4);
  ASSERT_EQ(q.size(), 2u);
  EXPECT_EQ(q[0].begin, 1);
  EXPECT_EQ(q[0].end, 3);
  EXPECT_EQ(q[1].begin, 4);
  EXPECT_EQ(q[1].end, 6);
  EXPECT_EQ(q[1].local, 2);
  auto cut = by_cols->pieces(1, 4);
  ASSERT_EQ(cut.size(), 2u);
  EXPECT_EQ(cut[0].begin, 2);
  EXPECT_EQ(cut[0].end, 3);
  EXPECT_EQ(cut[0].local, 1);
  // Loading takes exactly the slice's elements out of the whole tensor.
  const torch::Tensor full = torch::arange(15, torch::kFloat);
  torch::Tensor local = torch::zeros({4});
  by_cols->load(q, full, local);
  EXPECT_TRUE(torch::equal(local, full.narrow(0, 0, 6).view({2, 3}).narrow(1, 1, 2).reshape({-1})));
  // A slice whose shape does not fit the model's is refused.
  auto wrong = ShardMap::build(fullLayout(), {seg("a", 0, {2, 2})}, {{"a", rows}});
  EXPECT_FALSE(wrong.isOk());
}

TEST(ShardMap, UnknownTensorsAndOtherShapesAreRefused) {
  auto unknown = ShardMap::build(fullLayout(), {seg("d", 0, {4})});
  ASSERT_FALSE(unknown.isOk());
  EXPECT_NE(unknown.status().message().find("'d'"), std::string::npos);
  auto reshaped = ShardMap::build(fullLayout(), {seg("a", 0, {3, 2})});
  ASSERT_FALSE(reshaped.isOk());
  EXPECT_NE(reshaped.status().message().find("another shape"), std::string::npos);
}

TEST(AssembledState, TakesEachElementOnceAndNamesGaps) {
  auto map = ShardMap::build(fullLayout(), {seg("a", 0, {2, 3}), seg("b", 6, {4}), seg("c", 10, {5})});
  ASSERT_TRUE(map.isOk());
  const torch::Tensor full = torch::arange(15, torch::kFloat) * 0.5;
  AssembledState got(*map);
  auto piece = [&](const std::string& n, int64_t b, int64_t e) { return ShardPiece{n, b, e, 0}; };
  auto values = [&](const std::string& n, int64_t b, int64_t e) { return full.narrow(0, map->fullOffset(n) + b, e - b); };

  EXPECT_TRUE(got.wants("weight", piece("a", 0, 6)));
  got.put("weight", piece("a", 0, 6), values("a", 0, 6));
  EXPECT_FALSE(got.wants("weight", piece("a", 2, 4)));  // a replica's copy is not asked for
  EXPECT_TRUE(got.wants("exp_avg", piece("a", 0, 6)));  // kinds are separate
  got.put("weight", piece("b", 2, 4), values("b", 2, 4));
  EXPECT_TRUE(got.wants("weight", piece("b", 0, 4)));   // b[0, 2) still missing
  EXPECT_FALSE(got.wants("weight", piece("b", 2, 3)));
  auto gap = got.complete("weight");
  ASSERT_FALSE(gap.isOk());
  EXPECT_NE(gap.message().find("'b'"), std::string::npos);

  got.put("weight", piece("b", 0, 2), values("b", 0, 2));
  got.put("weight", piece("c", 0, 5), values("c", 0, 5));
  ASSERT_TRUE(got.complete("weight").isOk());
  EXPECT_TRUE(torch::equal(got.flat("weight"), full));
  auto named = got.tensors("weight");
  ASSERT_EQ(named.size(), 3u);
  EXPECT_EQ(named[0].first, "a");
  EXPECT_EQ(named[0].second.sizes().vec(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(named[2].second[4].item<float>(), 7.0f);
  EXPECT_TRUE(got.wantsBuffer("bias"));
  got.putBuffer("bias", torch::ones({3}));
  EXPECT_FALSE(got.wantsBuffer("bias"));
}

}  // namespace
}  // namespace archipelago::runtime
