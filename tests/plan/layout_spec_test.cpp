// User-given layouts (`plan --layout`, `simulate --layout`): the syntax,
// its defaults and errors, and the reference that matters: the layout the
// search chose, written back as text and parsed, prices to the same plan.
#include <gtest/gtest.h>

#include "archipelago/core/config.h"
#include "archipelago/plan/layout_spec.h"
#include "archipelago/plan/planner.h"
#include "plan_test_util.h"

namespace archipelago::plan {
namespace {

using testing::catalog;

core::ClusterSpec twoIslands() {
  core::ClusterSpec c;
  c.name = "two";
  core::IslandSpec a;
  a.name = "east";
  a.device = "h100";
  a.count = 64;
  core::IslandSpec b = a;
  b.name = "west";
  b.device = "a100";
  b.count = 32;
  c.islands = {a, b};
  core::StraitSpec s;
  s.a = "east";
  s.b = "west";
  s.bandwidth = 12.5e9;
  c.straits = {s};
  return c;
}

TEST(LayoutSpec, OneLayoutIsAppliedToEveryIslandWithDpFromItsDevices) {
  auto ls = parseLayouts({"tp=8,pp=2,mb=2,recompute=full"}, twoIslands());
  ASSERT_TRUE(ls.isOk()) << ls.status().toString();
  ASSERT_EQ(ls->size(), 2u);
  EXPECT_EQ((*ls)[0].islands, std::vector<int>{0});
  EXPECT_EQ((*ls)[0].dp, 4);  // 64 / (8 x 2)
  EXPECT_EQ((*ls)[1].dp, 2);  // 32 / (8 x 2)
  EXPECT_EQ((*ls)[1].micro_batch, 2);
  EXPECT_EQ((*ls)[1].recompute, Recompute::kFull);
}

TEST(LayoutSpec, GroupsNameTheirIslandsAndMayDifferOrSpan) {
  auto ls = parseLayouts({"islands=east,tp=2,pp=2", "islands=west,pp=4,dp=2,zero=3"}, twoIslands());
  ASSERT_TRUE(ls.isOk()) << ls.status().toString();
  EXPECT_EQ((*ls)[0].tp, std::vector<int64_t>{2});
  EXPECT_EQ((*ls)[1].pp, std::vector<int64_t>{4});
  EXPECT_EQ((*ls)[1].zero, 3);
  auto span = parseLayouts({"islands=east+west,tp=8,pp=4+4,vpp=2"}, twoIslands());
  ASSERT_TRUE(span.isOk()) << span.status().toString();
  EXPECT_EQ((*span)[0].islands, (std::vector<int>{0, 1}));
  EXPECT_EQ((*span)[0].tp, (std::vector<int64_t>{8, 8}));
  EXPECT_EQ((*span)[0].dp, 1);  // west fits 32 / (8 x 4) = 1
  EXPECT_EQ((*span)[0].schedule, Schedule::kInterleaved);  // vpp > 1 implies it
}

TEST(LayoutSpec, ErrorsNameTheLayoutTheKeyAndTheFix) {
  const auto c = twoIslands();
  auto msg = [&](std::vector<std::string> s) { return parseLayouts(s, c).status().message(); };
  EXPECT_NE(msg({"tp=8,color=red"}).find("unknown key 'color'"), std::string::npos);
  EXPECT_NE(msg({"tp=8,tp=4"}).find("given twice"), std::string::npos);
  EXPECT_NE(msg({"tp=x"}).find("tp: 'x' is not an integer >= 1"), std::string::npos);
  EXPECT_NE(msg({"tp=64,pp=2"}).find("fewer than tp x pp"), std::string::npos);
  EXPECT_NE(msg({"tp=8,dp=9"}).find("at most"), std::string::npos);
  EXPECT_NE(msg({"islands=north"}).find("no island 'north'"), std::string::npos);
  EXPECT_NE(msg({"islands=east+west,pp=1+2+3"}).find("3 values for 2 islands"), std::string::npos);
  EXPECT_NE(msg({"islands=east", "islands=east"}).find("already in another group"), std::string::npos);
  EXPECT_NE(msg({"tp=8", "tp=4"}).find("name each group's islands"), std::string::npos);
  EXPECT_NE(msg({"recompute=most"}).find("expected none, selective or full"), std::string::npos);
  EXPECT_NE(msg({"zero=4"}).find("expected 1, 2 or 3"), std::string::npos);
}

TEST(LayoutSpec, TheSearchedLayoutWrittenAsTextPricesToTheSamePlan) {
  const auto c = twoIslands();
  auto model = preset("llama3-8b");
  ASSERT_TRUE(model.isOk());
  PlanOptions o;
  o.strategy = "sync";
  o.setup.global_batch_tokens = 4 << 20;
  auto r = searchPlans(c, *model, catalog(), o);
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  const Plan& best = r->plans.front();
  std::vector<std::string> text;
  for (const auto& g : best.groups) {
    FixedLayout L{g.islands, g.tp, g.pp, g.dp, g.ep, g.micro_batch, g.virtual_stages, g.schedule, g.recompute, g.zero, {}};
    text.push_back(formatLayout(L, c));
  }
  auto ls = parseLayouts(text, c);
  ASSERT_TRUE(ls.isOk()) << ls.status().toString() << " from " << text.front();
  auto again = evaluateLayout(c, *model, catalog(), o, *ls);
  ASSERT_TRUE(again.isOk()) << again.status().toString();
  EXPECT_EQ(again->summary, best.summary);
  EXPECT_NEAR(again->step_s, best.step_s, 1e-9 * best.step_s);
}

TEST(LayoutSpec, ZeroThreeWithPipelinesPaysAGatherPerMicroBatch) {
  // The runtime gathers each stage's weights for every micro-batch's forward
  // and backward: priced so, the data-parallel time grows with the
  // micro-batches, and the state per device shrinks against ZeRO-1. Short
  // sequences, so a micro-batch's compute cannot hide its gathers.
  const auto c = twoIslands();
  auto model = preset("llama3-8b");
  ASSERT_TRUE(model.isOk());
  PlanOptions o;
  o.strategy = "sync";
  o.setup.seq_len = 128;
  o.setup.global_batch_tokens = 128 * 256;
  auto price = [&](const std::string& text) {
    auto ls = parseLayouts({"islands=east," + text}, c);
    EXPECT_TRUE(ls.isOk()) << ls.status().toString();
    ls->resize(1);
    auto p = evaluateLayout(c, *model, catalog(), o, *ls);
    EXPECT_TRUE(p.isOk()) << text << ": " << p.status().toString();
    return p.isOk() ? p->groups.front() : GroupPlan{};
  };
  const GroupPlan z1 = price("tp=8,pp=2,mb=1,zero=1"), z3 = price("tp=8,pp=2,mb=1,zero=3"),
                  z3mb = price("tp=8,pp=2,mb=4,zero=3");
  ASSERT_EQ(z3.stages.size(), 2u);
  ASSERT_EQ(z1.stages.size(), 2u);
  ASSERT_EQ(z3mb.stages.size(), 2u);
  EXPECT_GT(z3.micro_batches, z3mb.micro_batches);
  for (size_t s = 0; s < 2; ++s) {
    EXPECT_GT(z3.stages[s].dp_s, z1.stages[s].dp_s) << "stage " << s;
    EXPECT_GT(z3.stages[s].dp_s, z3mb.stages[s].dp_s) << "stage " << s << ": more micro-batches, more gathers";
    EXPECT_LT(z3.stages[s].memory_bytes, z1.stages[s].memory_bytes) << "stage " << s;
  }
}

}  // namespace
}  // namespace archipelago::plan
