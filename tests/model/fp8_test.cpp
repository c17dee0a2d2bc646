// FP8 quantisation and the FP8 linear (model/fp8.h). Rounding is checked
// against the comm codecs' scalar conversions (comm/numeric.h: integer bit
// arithmetic, an implementation independent of the torch-op emulation);
// scaling against hand-worked cases; the linear against fp64 products of
// operands quantised by those scalar conversions.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "archipelago/comm/numeric.h"
#include "archipelago/model/fp8.h"
#include "archipelago/model/transformer.h"
#include "model/test_util.h"

namespace archipelago::model {
namespace {

using testing::toVec;

float commRound(float v, Fp8Format f) {
  return f == Fp8Format::kE4M3 ? comm::fp8E4M3ToFloat(comm::floatToFp8E4M3Sat(v))
                               : comm::fp8E5M2ToFloat(comm::floatToFp8E5M2Sat(v));
}

float commDecode(int code, Fp8Format f) {
  return f == Fp8Format::kE4M3 ? comm::fp8E4M3ToFloat(static_cast<uint8_t>(code))
                               : comm::fp8E5M2ToFloat(static_cast<uint8_t>(code));
}

// roundToFp8 and the comm conversion agree bit for bit (sign of zero
// included) on every value; NaN only needs to be NaN on both sides.
void expectMatchesComm(const std::vector<float>& in, Fp8Format f) {
  auto out = roundToFp8(torch::tensor(in, torch::kFloat), f).contiguous();
  const float* got = out.data_ptr<float>();
  int reported = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const float want = commRound(in[i], f);
    const bool same = (std::isnan(want) && std::isnan(got[i])) ||
                      std::bit_cast<uint32_t>(want) == std::bit_cast<uint32_t>(got[i]);
    if (!same && reported++ < 10) {
      ADD_FAILURE() << fp8Spec(f).name << ": " << in[i] << " (bits 0x" << std::hex << std::bit_cast<uint32_t>(in[i])
                    << std::dec << ") -> " << got[i] << ", comm codec gives " << want;
    }
  }
  EXPECT_EQ(reported, 0);
}

class Fp8Rounding : public ::testing::TestWithParam<Fp8Format> {};

TEST_P(Fp8Rounding, EveryBitPatternIsAFixedPoint) {
  const Fp8Format f = GetParam();
  std::vector<float> values;
  for (int code = 0; code < 256; ++code) values.push_back(commDecode(code, f));
  expectMatchesComm(values, f);
  auto out = roundToFp8(torch::tensor(values), f).contiguous();
  for (int code = 0; code < 256; ++code) {
    const float v = values[static_cast<size_t>(code)], r = out.data_ptr<float>()[code];
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(r)) << "code " << code;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(v), std::bit_cast<uint32_t>(r)) << "code " << code << " value " << v;
    }
  }
}

TEST_P(Fp8Rounding, TiesAndNeighboursOfEveryMidpoint) {
  const Fp8Format f = GetParam();
  std::set<float> finite;
  for (int code = 0; code < 256; ++code) {
    const float v = commDecode(code, f);
    if (std::isfinite(v)) finite.insert(v);
  }
  std::vector<float> sorted(finite.begin(), finite.end()), in;
  for (size_t i = 0; i + 1 < sorted.size(); ++i) {
    const float mid = (sorted[i] + sorted[i + 1]) / 2;  // exact: both have few mantissa bits
    for (float v : {mid, std::nextafter(mid, -INFINITY), std::nextafter(mid, INFINITY)}) in.push_back(v);
  }
  expectMatchesComm(in, f);
}

TEST_P(Fp8Rounding, RandomValuesOverEveryBinade) {
  const Fp8Format f = GetParam();
  std::mt19937 gen(7);
  std::uniform_int_distribution<int> exponent(-30, 20);
  std::uniform_int_distribution<uint32_t> mantissa(0, (1u << 23) - 1);
  std::vector<float> in;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t e = static_cast<uint32_t>(exponent(gen) + 127);
    const uint32_t sign = (i & 1) ? 0x80000000u : 0u;
    in.push_back(std::bit_cast<float>(sign | (e << 23) | mantissa(gen)));
  }
  expectMatchesComm(in, f);
}

TEST_P(Fp8Rounding, EdgeValues) {
  const Fp8Format f = GetParam();
  const float max = static_cast<float>(fp8Spec(f).max);
  const float min_sub = f == Fp8Format::kE4M3 ? std::ldexp(1.0f, -9) : std::ldexp(1.0f, -16);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> in = {0.0f, -0.0f, min_sub, min_sub / 2, min_sub * 0.5001f, min_sub * 1.5f, -min_sub * 2.5f,
                           std::ldexp(1.0f, -40), std::numeric_limits<float>::denorm_min(), max, -max,
                           std::nextafter(max, inf), max * 1.0625f, max * 1.0625f * 1.0001f, max * 2, 1e30f,
                           std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), inf, -inf,
                           std::numeric_limits<float>::quiet_NaN()};
  expectMatchesComm(in, f);
  // The rules, spelled out: finite overflow saturates; E4M3 has no infinity.
  auto out = roundToFp8(torch::tensor({max * 4, -1e30f, inf, -0.0f}), f).contiguous();
  const float* r = out.data_ptr<float>();
  EXPECT_EQ(r[0], max);
  EXPECT_EQ(r[1], -max);
  EXPECT_TRUE(f == Fp8Format::kE4M3 ? std::isnan(r[2]) : r[2] == inf);
  EXPECT_TRUE(std::signbit(r[3]));
}

INSTANTIATE_TEST_SUITE_P(Formats, Fp8Rounding, ::testing::Values(Fp8Format::kE4M3, Fp8Format::kE5M2),
                         [](const auto& info) { return std::string(fp8Spec(info.param).name); });

TEST(Fp8Rounding, KeepsTheInputDevice) {
  auto x = torch::randn({4, 4}, torch::kBFloat16);
  auto r = roundToFp8(x, Fp8Format::kE4M3);
  EXPECT_EQ(r.device(), x.device());
  EXPECT_EQ(r.scalar_type(), torch::kFloat);
}

// Block scaling, worked by hand: 1x128 tiles on a [2, 130] activation (the
// second tile of each row is 2 wide), 128x128 blocks on a [130, 130] weight.
TEST(Fp8Scaling, TilesOfOneBy128WithAShortLastTile) {
  auto x = torch::zeros({2, 130});
  x[0][5] = 3.5;     // row 0, tile 0: amax 3.5 -> scale 448 / 3.5 = 128
  x[0][7] = 0.1;     // 0.1 * 128 = 12.8 -> 13 (spacing 1 in [8, 16)) -> 13 / 128
  x[0][129] = -0.25; // row 0, tile 1: amax 0.25 -> 1792
  x[1][128] = 1024;  // row 1, tile 1: amax 1024 -> 0.4375; row 1, tile 0 is all zero -> scale 1
  Fp8Tensor q = quantizeTiles(x, Fp8Format::kE4M3, 1, kFp8Tile);
  ASSERT_EQ(q.scale.sizes(), torch::IntArrayRef({2, 2}));
  auto s = toVec(q.scale);
  EXPECT_EQ(s[0], 128.0);
  EXPECT_EQ(s[1], 1792.0);
  EXPECT_EQ(s[2], 1.0);
  EXPECT_EQ(s[3], 0.4375);
  ASSERT_EQ(q.values.sizes(), x.sizes());
  auto d = q.dequantize();
  EXPECT_EQ(d[0][5].item<double>(), 3.5);
  EXPECT_EQ(d[0][7].item<double>(), 13.0 / 128.0);
  EXPECT_EQ(d[0][129].item<double>(), -0.25);
  EXPECT_EQ(d[1][128].item<double>(), 1024.0);
  EXPECT_EQ(q.values[0][5].item<double>(), 448.0);
  EXPECT_EQ(d.abs().sum().item<double>(), 3.5 + 13.0 / 128.0 + 0.25 + 1024.0);
}

TEST(Fp8Scaling, BlocksOf128By128WithShortEdges) {
  auto w = torch::zeros({130, 130});
  w[3][4] = 2;        // block (0, 0): amax 2 -> 224
  w[0][129] = -0.5;   // block (0, 1): amax 0.5 -> 896
  w[129][0] = 8;      // block (1, 0): amax 8 -> 56
  w[127][127] = 1.0;  // still block (0, 0)
  Fp8Tensor q = quantizeTiles(w, Fp8Format::kE4M3, kFp8Tile, kFp8Tile);
  ASSERT_EQ(q.scale.sizes(), torch::IntArrayRef({2, 2}));
  auto s = toVec(q.scale);
  EXPECT_EQ(s[0], 224.0);
  EXPECT_EQ(s[1], 896.0);
  EXPECT_EQ(s[2], 56.0);
  EXPECT_EQ(s[3], 1.0);  // block (1, 1), a 2x2 corner of zeros
  auto d = q.dequantize();
  EXPECT_EQ(d[3][4].item<double>(), 2.0);
  EXPECT_EQ(d[0][129].item<double>(), -0.5);
  EXPECT_EQ(d[129][0].item<double>(), 8.0);
  EXPECT_EQ(d[127][127].item<double>(), 1.0);  // 224 is exactly representable in E4M3
}

TEST(Fp8Scaling, ZeroInfAndNanAmaxesKeepTheFallback) {
  auto amax = torch::tensor({0.0f, std::numeric_limits<float>::infinity(), std::nanf(""), 2.0f});
  auto s = toVec(scaleFromAmax(amax, Fp8Format::kE5M2, torch::full({4}, 3.0f)));
  EXPECT_EQ(s, (std::vector<double>{3.0, 3.0, 3.0, 28672.0}));
}

// Delayed scaling, history of 3 steps. Each step's tensor has amax a_t:
//   step  a_t   history before      scale
//   1     2     (empty)             448 / 2 = 224   (own amax: first step)
//   2     8     2                   448 / 2 = 224
//   3     4     8, 2                448 / 8 = 56
//   4     1     4, 8, 2             56
//   5     1     1, 4, 8             56
//   6     0.5   1, 1, 4             448 / 4 = 112
//   7     0     0.5, 1, 1           448 / 1 = 448
// A history never moves itself (its copies would not follow): a tensor on
// another device is refused, naming both devices.
TEST(Fp8Scaling, AHistoryRefusesATensorOnAnotherDevice) {
  AmaxHistory h(2);
  const auto meta = torch::empty({4}, torch::TensorOptions().device(torch::kMeta));
  try {
    h.scaleFor(meta, Fp8Format::kE4M3, true);
    ADD_FAILURE() << "a meta tensor was scaled by a CPU history";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("AmaxHistory on cpu used for a tensor on meta"), std::string::npos) << e.what();
  }
  EXPECT_EQ(h.steps(), 0);
}

TEST(Fp8Scaling, DelayedScalingFollowsTheAmaxHistory) {
  AmaxHistory h(3);
  const std::vector<double> amax = {2, 8, 4, 1, 1, 0.5, 0};
  const std::vector<double> want = {224, 224, 56, 56, 56, 112, 448};
  for (size_t t = 0; t < amax.size(); ++t) {
    const float a = static_cast<float>(amax[t]);
    auto x = torch::tensor({a / 2, -a, 0.0f});
    // A read without recording (an evaluation pass) sees the same scale and changes nothing.
    EXPECT_EQ(h.scaleFor(x, Fp8Format::kE4M3, false).item<double>(), want[t]) << "step " << t + 1;
    EXPECT_EQ(h.steps(), static_cast<int64_t>(t));
    EXPECT_EQ(h.scaleFor(x, Fp8Format::kE4M3, true).item<double>(), want[t]) << "step " << t + 1;
  }
  EXPECT_EQ(toVec(h.amaxes()), (std::vector<double>{0, 0.5, 1}));
  // An all-zero history keeps the previous scale rather than dividing by zero.
  AmaxHistory z(2);
  z.scaleFor(torch::tensor({4.0f}), Fp8Format::kE4M3, true);  // scale 112
  z.scaleFor(torch::zeros({3}), Fp8Format::kE4M3, true);
  z.scaleFor(torch::zeros({3}), Fp8Format::kE4M3, true);
  EXPECT_EQ(z.scaleFor(torch::zeros({3}), Fp8Format::kE4M3, true).item<double>(), 112.0);
}

TEST(Fp8Scaling, DeferredRecordingEntersOneAmaxPerStepAsACommitSays) {
  // Two micro-batches a step with amaxes {2, 8}, then {1, 4}: recorded by
  // step, the history holds each step's largest (what the loop commits
  // after its max over the replicas), and every micro-batch of a step uses
  // the scale of the committed steps only.
  AmaxHistory h(3);
  h.deferRecording();
  ASSERT_TRUE(h.deferred());
  auto x = [](float a) { return torch::tensor({a, -a / 2}); };
  // Step 1, nothing committed: each micro-batch scales by its own amax.
  EXPECT_EQ(h.scaleFor(x(2), Fp8Format::kE4M3, true).item<double>(), 224);
  EXPECT_EQ(h.scaleFor(x(8), Fp8Format::kE4M3, true).item<double>(), 56);
  EXPECT_EQ(h.steps(), 0);
  EXPECT_EQ(h.takePending().item<double>(), 8);
  EXPECT_EQ(h.takePending().item<double>(), 0);  // taken
  h.commit(torch::tensor(16.0f));                 // a replica saw 16
  EXPECT_EQ(h.steps(), 1);
  // Step 2: both micro-batches use max / 16, whatever their own amax.
  EXPECT_EQ(h.scaleFor(x(1), Fp8Format::kE4M3, true).item<double>(), 28);
  EXPECT_EQ(h.scaleFor(x(4), Fp8Format::kE4M3, true).item<double>(), 28);
  EXPECT_EQ(h.takePending().item<double>(), 4);
  h.commit(torch::tensor(4.0f));
  EXPECT_EQ(toVec(h.amaxes()), (std::vector<double>{4, 16, 0}));
  // A backward's copy (state()) records into the same pending amax.
  AmaxHistory copy = AmaxHistory::fromState(h.state());
  ASSERT_TRUE(copy.deferred());
  copy.scaleFor(x(64), Fp8Format::kE5M2, true);
  EXPECT_EQ(h.takePending().item<double>(), 64);
  // What a checkpoint keeps restores the scale.
  AmaxHistory r(3);
  r.restore(h.amaxes(), h.steps());
  EXPECT_EQ(r.steps(), 2);
  EXPECT_EQ(r.scaleFor(x(1), Fp8Format::kE4M3, false).item<double>(), 28);
}

// ---- the FP8 linear against fp64 ----------------------------------------------

// x quantised by the comm codec's scalar conversion: q = round(float(x) * s),
// then divided by the scale in fp64.
std::vector<double> quantizedRef(const std::vector<double>& x, const std::vector<double>& scale_per_element,
                                 Fp8Format f) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float s = static_cast<float>(scale_per_element[i]);
    out[i] = static_cast<double>(commRound(static_cast<float>(x[i]) * s, f)) / static_cast<double>(s);
  }
  return out;
}

// Per-element scale of [rows, cols] under tiles tr x tc (a tile's amax
// maps to the format's max; an all-zero tile has scale 1).
std::vector<double> tileScales(const std::vector<double>& x, int64_t rows, int64_t cols, int64_t tr, int64_t tc,
                               Fp8Format f) {
  std::vector<double> s(x.size());
  for (int64_t r0 = 0; r0 < rows; r0 += tr) {
    for (int64_t c0 = 0; c0 < cols; c0 += tc) {
      double amax = 0;
      for (int64_t r = r0; r < std::min(rows, r0 + tr); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + tc); ++c) amax = std::max(amax, std::abs(x[r * cols + c]));
      const float scale = amax > 0 ? static_cast<float>(fp8Spec(f).max) / static_cast<float>(amax) : 1.0f;
      for (int64_t r = r0; r < std::min(rows, r0 + tr); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + tc); ++c) s[r * cols + c] = scale;
    }
  }
  return s;
}

// c[i][j] = sum_k a[i][k] b[j][k] (both row-major, a [m, k], b [n, k]).
std::vector<double> productNT(const std::vector<double>& a, const std::vector<double>& b, int64_t m, int64_t k,
                              int64_t n, std::vector<double>* abs_sum) {
  std::vector<double> c(static_cast<size_t>(m * n));
  abs_sum->assign(c.size(), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, sa = 0;
      for (int64_t l = 0; l < k; ++l) {
        s += a[i * k + l] * b[j * k + l];
        sa += std::abs(a[i * k + l] * b[j * k + l]);
      }
      c[i * n + j] = s;
      (*abs_sum)[i * n + j] = sa;
    }
  return c;
}

std::vector<double> transpose(const std::vector<double>& a, int64_t rows, int64_t cols) {
  std::vector<double> t(a.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
  return t;
}

// |got - want| <= one bf16 rounding of the result plus fp32 accumulation.
void expectClose(const torch::Tensor& got, const std::vector<double>& want, const std::vector<double>& abs_sum,
                 const char* what) {
  auto g = toVec(got);
  ASSERT_EQ(g.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double tol = std::ldexp(1.0, -8) * std::abs(want[i]) + 1e-5 * abs_sum[i] + 1e-30;
    if (std::abs(g[i] - want[i]) > tol && bad++ < 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << g[i] << ", fp64 reference " << want[i];
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

class Fp8LinearTest : public ::testing::TestWithParam<Fp8Recipe> {};

TEST_P(Fp8LinearTest, ForwardAndBackwardMatchFp64OfTheQuantisedOperands) {
  const Fp8Recipe recipe = GetParam();
  const int64_t b = 2, t = 3, m = b * t, k = 200, n = 72;  // k: a full and a short 128-tile
  torch::manual_seed(3);
  auto x = torch::randn({b, t, k}).to(torch::kBFloat16);
  x.index_put_({0, 1, 150}, 40.0);  // an outlier in one tile
  auto w = (torch::randn({n, k}) * 0.05).to(torch::kBFloat16);
  auto g = (torch::randn({b, t, n}) * 1e-4).to(torch::kBFloat16);
  Fp8Options o;
  o.recipe = recipe;
  Fp8Linear linear(o);
  auto xl = x.clone().requires_grad_(true), wl = w.clone().requires_grad_(true);
  auto y = linear->forward(xl, wl);
  ASSERT_EQ(y.sizes(), torch::IntArrayRef({b, t, n}));
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  y.backward(g);

  const bool block = recipe == Fp8Recipe::kBlock;
  const auto xv = toVec(x), wv = toVec(w), gv = toVec(g);
  // First step: delayed scaling scales each tensor by its own amax.
  const auto xs = tileScales(xv, m, k, block ? 1 : m, block ? kFp8Tile : k, Fp8Format::kE4M3);
  const auto ws = tileScales(wv, n, k, block ? kFp8Tile : n, block ? kFp8Tile : k, Fp8Format::kE4M3);
  const auto gs = tileScales(gv, m, n, block ? 1 : m, block ? kFp8Tile : n, Fp8Format::kE5M2);
  const auto xq = quantizedRef(xv, xs, Fp8Format::kE4M3);
  const auto wq = quantizedRef(wv, ws, Fp8Format::kE4M3);
  const auto gq = quantizedRef(gv, gs, Fp8Format::kE5M2);
  std::vector<double> abs_sum;
  expectClose(y, productNT(xq, wq, m, k, n, &abs_sum), abs_sum, "y");
  // grad_x [m, k] = gq [m, n] wq [n, k]; grad_W [n, k] = gq^T [n, m] xq [m, k].
  expectClose(xl.grad(), productNT(gq, transpose(wq, n, k), m, n, k, &abs_sum), abs_sum, "grad_x");
  expectClose(wl.grad(), productNT(transpose(gq, m, n), transpose(xq, m, k), n, m, k, &abs_sum), abs_sum, "grad_W");

  // The test can tell FP8 from a plain product: the unquantised result is
  // outside the tolerance somewhere.
  auto plain = productNT(xv, wv, m, k, n, &abs_sum);
  auto yv = toVec(y);
  double worst = 0;
  for (size_t i = 0; i < yv.size(); ++i) worst = std::max(worst, std::abs(yv[i] - plain[i]) / (1e-3 + std::abs(plain[i])));
  EXPECT_GT(worst, 0.02);
}

TEST_P(Fp8LinearTest, TrainingRecordsAmaxesAndEvaluationDoesNot) {
  Fp8Options o;
  o.recipe = GetParam();
  o.amax_history = 4;
  Fp8Linear linear(o);
  auto w = torch::randn({8, 16}).requires_grad_(true);
  linear->forward(torch::randn({3, 16}), w).sum().backward();
  const int64_t recorded = o.recipe == Fp8Recipe::kDelayed ? 1 : 0;
  EXPECT_EQ(linear->inputHistory().steps(), recorded);
  EXPECT_EQ(linear->weightHistory().steps(), recorded);
  EXPECT_EQ(linear->gradHistory().steps(), recorded);
  // The amax lands in the module's own history, not only in the copy the
  // backward pass carried (the output gradient of sum() is all ones).
  EXPECT_EQ(linear->gradHistory().amaxes()[0].item<double>(), recorded ? 1.0 : 0.0);
  EXPECT_EQ(linear->gradHistory().lastScale().item<double>(), recorded ? 57344.0 : 1.0);
  linear->eval();
  linear->forward(torch::randn({3, 16}), w).sum().backward();
  EXPECT_EQ(linear->inputHistory().steps(), recorded);
  EXPECT_EQ(linear->gradHistory().steps(), recorded);
}

INSTANTIATE_TEST_SUITE_P(Recipes, Fp8LinearTest, ::testing::Values(Fp8Recipe::kDelayed, Fp8Recipe::kBlock),
                         [](const auto& info) { return fp8RecipeName(info.param); });

// ---- the model -----------------------------------------------------------------

TEST(Fp8Model, ConvertsProjectionsButNotEmbeddingHeadOrRouter) {
  auto c = testing::tinyMoeConfig();
  c.moe.every = 2;  // layer 0 dense, layer 1 MoE
  Transformer model(c, 5);
  const auto names_before = model->namedTensors();
  // Dense layer: 4 attention + 3 mlp; MoE layer: 4 attention + 4 experts x 3 + shared expert 3.
  EXPECT_EQ(setFp8(*model, Fp8Options{}), 7 + 4 + 4 * 3 + 3);
  EXPECT_EQ(fp8Of(*model->lm_head), nullptr);
  auto moe = model->moeLayers();
  ASSERT_EQ(moe.size(), 1u);
  EXPECT_EQ(fp8Of(*moe[0]->gate), nullptr);
  EXPECT_NE(fp8Of(*moe[0]->experts[0]->as<SwiGluImpl>()->down), nullptr);
  // Names, shapes and order of every checkpointed tensor are unchanged.
  const auto names_after = model->namedTensors();
  ASSERT_EQ(names_after.size(), names_before.size());
  for (size_t i = 0; i < names_after.size(); ++i) EXPECT_EQ(names_after[i].first, names_before[i].first);
}

TEST(Fp8Model, TrainsCloseToTheUnquantisedModelAndClearsBitExactly) {
  auto c = testing::tinyConfig();
  Transformer model(c, 9);
  model->to(torch::kBFloat16);
  auto ids = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  auto tgt = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  auto plain = model->forward(ids);
  for (Fp8Recipe recipe : {Fp8Recipe::kDelayed, Fp8Recipe::kBlock}) {
    Fp8Options o;
    o.recipe = recipe;
    setFp8(*model, o);
    auto loss = model->lossAndStats(ids, tgt).loss;
    loss.backward();
    for (const auto& [name, p] : model->namedParameters()) {
      ASSERT_TRUE(p.grad().defined()) << name;
      EXPECT_TRUE(torch::isfinite(p.grad()).all().item<bool>()) << name;
    }
    auto fp8 = model->forward(ids);
    const double rel = (fp8.to(torch::kFloat) - plain.to(torch::kFloat)).abs().max().item<double>() /
                       plain.to(torch::kFloat).abs().max().item<double>();
    EXPECT_GT(rel, 0.0) << fp8RecipeName(recipe);
    EXPECT_LT(rel, 0.1) << fp8RecipeName(recipe);
    model->zero_grad();
  }
  clearFp8(*model);
  EXPECT_TRUE(torch::equal(model->forward(ids), plain));
}

TEST(Fp8Options, ParsesTheJobFieldsAndNamesBadOnes) {
  auto ok = parseFp8Options("block", 8);
  ASSERT_TRUE(ok.isOk());
  EXPECT_EQ(ok->recipe, Fp8Recipe::kBlock);
  EXPECT_EQ(ok->amax_history, 8);
  auto bad = parseFp8Options("tensorwise", 8);
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.status().message().find("train.fp8_recipe"), std::string::npos);
  auto bad_len = parseFp8Options("delayed", 0);
  ASSERT_FALSE(bad_len.isOk());
  EXPECT_NE(bad_len.status().message().find("train.fp8_amax_history"), std::string::npos);
}

TEST(Fp8Options, ModelDtypeFp8Resolves) {
  core::ModelConfig c = testing::tinyConfig();
  c.dtype = "fp8";
  EXPECT_TRUE(resolveModelConfig(c).isOk());
  c.dtype = "fp9";
  auto bad = resolveModelConfig(c);
  ASSERT_FALSE(bad.isOk());
  EXPECT_NE(bad.status().message().find("model.dtype: 'fp9'"), std::string::npos) << bad.status().message();
}

TEST(Fp8Options, TheCpuBackendIsLabelledEmulated) {
  EXPECT_EQ(fp8Backend(torch::kCPU, Fp8Recipe::kDelayed), "EMULATED (quantise-dequantise)");
  EXPECT_EQ(fp8Backend(torch::kCPU, Fp8Recipe::kBlock), "EMULATED (quantise-dequantise)");
}

}  // namespace
}  // namespace archipelago::model
