// Tests of the run report (report.h, report_chart.h): torch-free. A synthetic
// run directory is written to a temp dir; expected values are computed by
// hand in the comments next to them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "archipelago/report/report.h"
#include "report/report_test_util.h"
#include "archipelago/report/report_chart.h"

namespace archipelago::report {
namespace {

namespace fs = std::filesystem;

std::string readAll(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void writeAll(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

using report::testing::TempDir;

// Loss of rank r at step s in the synthetic run. Step 5 is special-cased so
// that its mean is a hand-checkable number.
double lossOf(int step, int rank) {
  if (step == 5) return rank == 0 ? 2.0 : rank == 1 ? 2.5 : 4.0;  // mean 8.5 / 3
  return 4.0 - 0.1 * step + 0.01 * rank;
}

constexpr int kSteps = 10;
constexpr int kRanks = 3;
constexpr double kStarted = 1000.0;

// Three workers: r0, r1 on island "fast" (slowdown 1), r2 on "slow"
// (slowdown 2). Each step: r0/r1 compute 0.4 s, r2 0.8 s; comm 0.1 s; every
// step lasts 1.0 s; step s ends at kStarted + s + 1. Tokens 1000 per rank
// per step; samples 4/4/2.
void writeRun(const fs::path& dir, const std::string& strategy, double loss_offset, bool with_extras) {
  fs::create_directories(dir);
  writeAll(dir / "run.json",
           R"({"job":"tiny","started":1000.0,"world":3,"strategy":")" + strategy +
               R"(","emulated":true,"ranks":[{"rank":0,"island":"fast","device":"cpu","slowdown":1.0},)"
               R"({"rank":1,"island":"fast","device":"cpu","slowdown":1.0},)"
               R"({"rank":2,"island":"slow","device":"cpu","slowdown":2.0}],"future_field":[1,2]})");
  std::ostringstream m;
  for (int s = 0; s < kSteps; ++s) {
    for (int r = 0; r < kRanks; ++r) {
      const double compute = r == 2 ? 0.8 : 0.4;
      m << R"({"kind":"step","step":)" << s << R"(,"rank":)" << r << R"(,"island":")" << (r == 2 ? "slow" : "fast")
        << R"(","epoch":0,"loss":)" << lossOf(s, r) + loss_offset << R"(,"lr":0.003,"samples":)" << (r == 2 ? 2 : 4)
        << R"(,"tokens":1000,"compute_s":)" << compute << R"(,"comm_s":0.1,"wait_s":)" << 0.9 - compute
        << R"(,"step_s":1.0,"tokens_per_s":1000.0,"grad_norm":1.2,"time":)" << kStarted + s + 1
        << R"(,"new_field":"ignored"})" << "\n";
    }
    if (s == 4 || s == 9) {
      m << R"({"kind":"eval","step":)" << s << R"(,"val_loss":)" << 3.5 - 0.1 * s + loss_offset << R"(,"time":)"
        << kStarted + s + 1.5 << "}\n";
    }
  }
  if (with_extras) {
    m << R"({"kind":"event","event":"checkpoint","step":4,"time":1005.2,"detail":"ckpt <step-4> & co"})" << "\n";
    m << R"({"kind":"event","event":"failure","step":7,"time":1008.1,"detail":"rank 2 lost"})" << "\n";
    m << R"({"kind":"outer","step":5,"round":1,"bytes_strait":1048576,"sync_s":0.5,"wait_s":0.1,"time":1006})"
      << "\n";
    m << R"({"kind":"moe","step":9,"rank":0,"layer":1,"tokens_per_expert":[10,20,30,40],"dropped":0,"aux_loss":0.01})"
      << "\n";
    m << R"({"kind":"moe","step":9,"rank":1,"layer":1,"tokens_per_expert":[5,5,5,5],"dropped":0,"aux_loss":0.01})"
      << "\n";
    m << R"({"kind":"telemetry","gpu_temp":71})" << "\n";  // unknown kind: ignored
    // Malformed lines: skipped and counted (5).
    m << "this is not json\n";
    m << R"({"kind":"step"})" << "\n";
    m << "[1,2,3]\n";
    m << R"({"no_kind":true})" << "\n";
    m << R"({"kind":"summary","steps":10,"wall_s":10.0,"tokens":30000,"final_loss":3.1,"final_val_loss":2.6,)"
      << R"("predicted_step_s":0.9,"measured_step_s":1.0})" << "\n";
    m << R"({"kind":"step","step":9,"rank":0,"loss":)";  // truncated last line (a crash mid-write)
  }
  writeAll(dir / "metrics.jsonl", m.str());
  writeAll(dir / "trace.json", R"({"traceEvents":[]})");
}

// Points of the polyline whose data-series is `name` (-1 if absent).
int polylinePoints(const std::string& svg, const std::string& name) {
  const std::string key = "data-series=\"" + name + "\"";
  size_t at = svg.find("<polyline class=\"series\" " + key);
  if (at == std::string::npos) return -1;
  size_t p = svg.find("points=\"", at);
  size_t e = svg.find('"', p + 8);
  std::istringstream pts(svg.substr(p + 8, e - p - 8));
  int n = 0;
  std::string tok;
  while (pts >> tok) ++n;
  return n;
}

std::vector<double> tickValues(const std::string& svg, const std::string& cls) {
  std::vector<double> out;
  std::regex re("<text class=\"" + cls + "\"[^>]*>([^<]*)</text>");
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), re); it != std::sregex_iterator(); ++it) {
    out.push_back(std::stod((*it)[1].str()));
  }
  return out;
}

// step = m * 10^k with m in {1, 2, 2.5, 5}.
bool isNiceStep(double step) {
  const double mag = std::pow(10.0, std::floor(std::log10(step)));
  const double m = step / mag;
  for (double c : {1.0, 2.0, 2.5, 5.0}) {
    if (std::abs(m - c) < 1e-9) return true;
  }
  return false;
}

TEST(ReportChart, NiceTicksKnownRanges) {
  auto t = chart::niceTicks(0, 199, 8);  // raw step 28.4 -> 50
  EXPECT_DOUBLE_EQ(t.step, 50);
  EXPECT_EQ(t.values, (std::vector<double>{0, 50, 100, 150, 200}));

  t = chart::niceTicks(2.13, 4.07, 6);  // raw step 0.388 -> 0.5, 2.0 .. 4.5
  EXPECT_DOUBLE_EQ(t.step, 0.5);
  ASSERT_EQ(t.values.size(), 6u);
  EXPECT_DOUBLE_EQ(t.values.front(), 2.0);
  EXPECT_DOUBLE_EQ(t.values.back(), 4.5);

  t = chart::niceTicks(-0.3, 0.3, 6);  // raw 0.12 -> 0.2: -0.4 .. 0.4
  EXPECT_DOUBLE_EQ(t.step, 0.2);
  EXPECT_DOUBLE_EQ(t.values.front(), -0.4);
  EXPECT_DOUBLE_EQ(t.values.back(), 0.4);

  t = chart::niceTicks(5, 5, 6);  // degenerate: padded to [4.5, 5.5]
  EXPECT_LE(t.values.front(), 5);
  EXPECT_GE(t.values.back(), 5);
  EXPECT_GT(t.values.size(), 1u);
  t = chart::niceTicks(0, 0, 6);
  EXPECT_EQ(t.values.front(), 0);
  EXPECT_EQ(t.values.back(), 1);
}

TEST(ReportChart, NiceTicksCoverRandomRanges) {
  const double ranges[][2] = {{0.001234, 0.00987}, {3.3e6, 4.1e7}, {-17, 903}, {0.95, 1.05}, {1e-3, 1e5}};
  for (const auto& r : ranges) {
    const auto t = chart::niceTicks(r[0], r[1], 6);
    SCOPED_TRACE(std::to_string(r[0]) + ".." + std::to_string(r[1]));
    EXPECT_TRUE(isNiceStep(t.step)) << t.step;
    EXPECT_LE(t.values.front(), r[0]);
    EXPECT_GE(t.values.back(), r[1]);
    EXPECT_GE(t.values.size(), 3u);
    EXPECT_LE(t.values.size(), 12u);
    for (double v : t.values) EXPECT_NEAR(v / t.step, std::round(v / t.step), 1e-6);
  }
}

TEST(ReportChart, FormatTickAndEscape) {
  EXPECT_EQ(chart::formatTick(0.25, 0.25), "0.25");
  EXPECT_EQ(chart::formatTick(2.5, 0.5), "2.5");
  EXPECT_EQ(chart::formatTick(200, 50), "200");
  EXPECT_EQ(chart::formatTick(0.30000000000000004, 0.1), "0.3");
  EXPECT_EQ(chart::formatTick(-0.0, 0.1), "0.0");
  EXPECT_EQ(chart::escapeXml("a<b & \"c\" 'd'>\x01"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
}

TEST(ReportChart, LineChartEscapesAndCountsPoints) {
  chart::LineChart c;
  c.title = "loss <of> \"run\" & more";
  chart::Series s;
  s.name = "a&b";
  s.x = {0, 1, 2, NAN, 4};
  s.y = {1, 2, 3, 4, 5};
  c.series.push_back(s);
  c.markers.push_back({2, "fail<ure>", "rank 2 & 3", ""});
  const std::string svg = chart::renderLineChart(c);
  EXPECT_NE(svg.find("<title>loss &lt;of&gt; &quot;run&quot; &amp; more</title>"), std::string::npos);
  EXPECT_EQ(svg.find("<of>"), std::string::npos);
  EXPECT_EQ(polylinePoints(svg, "a&amp;b"), 4);  // the NaN point is skipped
  EXPECT_NE(svg.find("data-group=\"fail&lt;ure&gt;\""), std::string::npos);
}

TEST(ReportChart, StackedBars) {
  chart::StackedBarChart c;
  c.title = "t";
  c.categories = {"r0", "r1"};
  c.segments = {{"compute", {0.4, 0.8}, ""}, {"comm", {0.1, 0.1}, ""}};
  const std::string svg = chart::renderStackedBarChart(c);
  size_t n = 0;
  for (size_t p = svg.find("class=\"bar\""); p != std::string::npos; p = svg.find("class=\"bar\"", p + 1)) ++n;
  EXPECT_EQ(n, 4u);
  const auto ticks = tickValues(svg, "ytick");
  ASSERT_FALSE(ticks.empty());
  EXPECT_EQ(ticks.front(), 0);
  EXPECT_GE(ticks.back(), 0.9);  // tallest bar: 0.8 + 0.1
}

TEST(ReportChart, Downsample) {
  std::vector<double> x, y;
  for (int i = 0; i < 1000; ++i) x.push_back(i), y.push_back(2.0 * i);
  chart::downsample(x, y, 100);
  ASSERT_EQ(x.size(), 100u);
  EXPECT_DOUBLE_EQ(x[0], 4.5);  // mean of 0..9
  EXPECT_DOUBLE_EQ(y[0], 9.0);
}

TEST(ReportParse, MalformedAndUnknownLines) {
  RunData run;
  parseMetricsLine("", run);  // blank: not counted
  parseMetricsLine("garbage", run);
  parseMetricsLine(R"({"kind":5})", run);
  parseMetricsLine(R"({"kind":"eval","step":3})", run);  // no val_loss
  parseMetricsLine(R"({"kind":"step","step":1,"rank":0,"loss":2.5,"extra":{"x":1}})", run);
  parseMetricsLine(R"({"kind":"eval","step":3,"val_loss":null})", run);  // diverged: kept as NaN
  parseMetricsLine(R"({"kind":"sparkles","step":3})", run);
  EXPECT_EQ(run.lines, 6);
  EXPECT_EQ(run.malformed, 3);
  EXPECT_EQ(run.unknown_kinds, 1);
  ASSERT_EQ(run.steps.size(), 1u);
  EXPECT_DOUBLE_EQ(run.steps[0].loss, 2.5);
  EXPECT_TRUE(std::isnan(run.steps[0].comm_s));
  ASSERT_EQ(run.evals.size(), 1u);
  EXPECT_TRUE(std::isnan(run.evals[0].val_loss));
}

TEST(ReportParse, MeanLossPerStepByHand) {
  TempDir tmp;
  writeRun(tmp.path() / "sync", "sync", 0.0, true);
  auto run = loadRunDir(tmp.path() / "sync");
  ASSERT_TRUE(run.isOk()) << run.status().toString();
  EXPECT_EQ(run->malformed, 5);
  EXPECT_EQ(run->unknown_kinds, 1);
  EXPECT_TRUE(run->emulated);
  EXPECT_TRUE(run->has_trace);
  ASSERT_EQ(run->ranks.size(), 3u);
  EXPECT_DOUBLE_EQ(run->ranks[2].slowdown, 2.0);

  const auto loss = meanLossPerStep(*run);
  ASSERT_EQ(loss.size(), static_cast<size_t>(kSteps));
  EXPECT_NEAR(loss[5].value, (2.0 + 2.5 + 4.0) / 3.0, 1e-12);                 // 2.8333...
  EXPECT_NEAR(loss[3].value, (3.7 + 3.71 + 3.72) / 3.0, 1e-12);                // 3.71
  EXPECT_NEAR(loss[3].time_s, 4.0, 1e-9);                                      // ends at started + 4
}

TEST(ReportParse, ReplayedStepSupersedesFirstTry) {
  RunData run;
  parseMetricsLine(R"({"kind":"step","step":2,"rank":0,"loss":9.0})", run);
  parseMetricsLine(R"({"kind":"step","step":2,"rank":1,"loss":1.0})", run);
  parseMetricsLine(R"({"kind":"event","event":"restart","step":2})", run);
  parseMetricsLine(R"({"kind":"step","step":2,"rank":0,"loss":3.0})", run);
  const auto loss = meanLossPerStep(run);
  ASSERT_EQ(loss.size(), 1u);
  EXPECT_DOUBLE_EQ(loss[0].value, 2.0);  // (3 + 1) / 2, not (9 + 1 + 3) / 3
}

TEST(ReportStats, HandComputedNumbers) {
  TempDir tmp;
  writeRun(tmp.path() / "r", "sync", 0.0, false);  // no summary line: stats from the steps
  auto run = loadRunDir(tmp.path() / "r");
  ASSERT_TRUE(run.isOk());
  const RunStats st = computeRunStats(*run);
  EXPECT_EQ(st.steps, kSteps);
  EXPECT_NEAR(st.wall_s, 10.5, 1e-9);  // the last eval ends at started + 10.5 (last step at + 10)
  EXPECT_NEAR(st.tokens, 30000, 1e-9);  // 10 steps x 3 ranks x 1000
  EXPECT_NEAR(st.tokens_per_s, 30000 / 10.5, 1e-9);
  ASSERT_EQ(st.workers.size(), 3u);
  EXPECT_NEAR(st.workers[2].mean_compute_s, 0.8, 1e-12);
  EXPECT_NEAR(st.workers[0].tokens_per_s, 1000, 1e-9);  // 10000 tokens / 10 x 1.0 s of steps
  EXPECT_NEAR(st.workers[0].utilisation, 4.0 / 10.5, 1e-12);  // 10 x 0.4 s compute / wall
  ASSERT_EQ(st.islands.size(), 2u);
  EXPECT_EQ(st.islands[0].island, "fast");
  EXPECT_EQ(st.islands[0].workers, 2);
  EXPECT_NEAR(st.islands[0].utilisation, 4.0 / 10.5, 1e-12);
  EXPECT_NEAR(st.islands[1].utilisation, 8.0 / 10.5, 1e-12);
  EXPECT_NEAR(st.islands[0].tokens_per_s, 2000, 1e-9);
  ASSERT_TRUE(st.final_loss.has_value());
  EXPECT_NEAR(*st.final_loss, (3.1 + 3.11 + 3.12) / 3.0, 1e-12);
  ASSERT_TRUE(st.final_val_loss.has_value());
  EXPECT_NEAR(*st.final_val_loss, 2.6, 1e-12);
  ASSERT_TRUE(st.measured_step_s.has_value());
  EXPECT_NEAR(*st.measured_step_s, 1.0, 1e-12);
}

TEST(Report, SingleRunWritesHtmlSvgsAndSummary) {
  TempDir tmp;
  const fs::path dir = tmp.path() / "sync";
  writeRun(dir, "sync", 0.0, true);
  auto out = writeReport({dir});
  ASSERT_TRUE(out.isOk()) << out.status().toString();
  EXPECT_EQ(out->dir, fs::weakly_canonical(dir / "report"));
  for (const char* f : {"index.html", "summary.txt", "loss_vs_step.svg", "loss_vs_time.svg", "tokens_per_s.svg",
                        "time_breakdown.svg", "batch_share.svg", "moe_layer1.svg"}) {
    EXPECT_TRUE(fs::exists(out->dir / f)) << f;
  }

  const std::string loss_svg = readAll(out->dir / "loss_vs_step.svg");
  EXPECT_EQ(polylinePoints(loss_svg, "train loss (rank mean)"), kSteps);
  // Two validation dots, two event markers (checkpoint, failure) with escaped detail.
  size_t dots = 0;
  const size_t g = loss_svg.find("<g class=\"markers\" data-series=\"validation loss\"");
  ASSERT_NE(g, std::string::npos);
  for (size_t p = loss_svg.find("<circle", g); p != std::string::npos && p < loss_svg.find("</g>", g);
       p = loss_svg.find("<circle", p + 1)) {
    ++dots;
  }
  EXPECT_EQ(dots, 2u);
  EXPECT_NE(loss_svg.find("data-group=\"checkpoint\""), std::string::npos);
  EXPECT_NE(loss_svg.find("data-group=\"failure\""), std::string::npos);
  EXPECT_NE(loss_svg.find("ckpt &lt;step-4&gt; &amp; co"), std::string::npos);

  // Axis ticks are nice numbers that cover the data: rank-mean loss 2.833 (step 5) .. 4.01
  // (step 0), validation loss 2.6 .. 3.1, steps 0 .. 9.
  const auto yt = tickValues(loss_svg, "ytick");
  ASSERT_GE(yt.size(), 3u);
  EXPECT_LE(yt.front(), 2.6);
  EXPECT_GE(yt.back(), 4.01);
  EXPECT_TRUE(isNiceStep(yt[1] - yt[0]));
  const auto xt = tickValues(loss_svg, "xtick");
  ASSERT_GE(xt.size(), 2u);
  EXPECT_LE(xt.front(), 0);
  EXPECT_GE(xt.back(), 9);

  const std::string tps = readAll(out->dir / "tokens_per_s.svg");
  for (const char* r : {"r0 fast", "r1 fast", "r2 slow"}) EXPECT_EQ(polylinePoints(tps, r), kSteps) << r;
  const std::string moe = readAll(out->dir / "moe_layer1.svg");
  EXPECT_NE(moe.find("data-segment=\"r0\""), std::string::npos);
  EXPECT_NE(moe.find("data-segment=\"r1\""), std::string::npos);

  const std::string html = readAll(out->index_html);
  EXPECT_EQ(html.find("<script"), std::string::npos);  // self-contained, nothing to fetch
  EXPECT_EQ(html.find("http://fonts"), std::string::npos);
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_NE(html.find("href=\"../trace.json\""), std::string::npos);
  EXPECT_NE(html.find("ui.perfetto.dev"), std::string::npos);
  EXPECT_NE(html.find("EMULATED"), std::string::npos);

  const std::string summary = readAll(out->summary_txt);
  EXPECT_EQ(summary, out->summary);
  EXPECT_NE(summary.find("EMULATED"), std::string::npos);
  EXPECT_NE(summary.find("5 malformed (skipped)"), std::string::npos);
  EXPECT_NE(summary.find("1 of unknown kind (ignored)"), std::string::npos);
  EXPECT_NE(summary.find("1 checkpoint, 1 failure"), std::string::npos);
  EXPECT_NE(summary.find("predicted 900ms, measured 1s (11.1 % vs prediction)"), std::string::npos);
  EXPECT_NE(summary.find("3,000 tokens/s aggregate"), std::string::npos);  // summary: 30000 tokens / 10 s
  EXPECT_NE(summary.find("final train loss   3.1000"), std::string::npos);
}

TEST(Report, MultiRunComparison) {
  TempDir tmp;
  writeRun(tmp.path() / "sync", "sync", 0.0, true);
  writeRun(tmp.path() / "diloco", "diloco", -0.2, false);
  ReportOptions opt;
  opt.out_dir = tmp.path() / "cmp";
  auto out = writeReport({tmp.path() / "sync", tmp.path() / "diloco"}, opt);
  ASSERT_TRUE(out.isOk()) << out.status().toString();
  EXPECT_EQ(out->dir, fs::weakly_canonical(tmp.path() / "cmp"));
  EXPECT_FALSE(fs::exists(tmp.path() / "sync" / "report"));  // --out honoured
  for (const char* f : {"compare_loss_vs_step.svg", "compare_loss_vs_time.svg", "compare_val_vs_time.svg",
                        "compare_loss_vs_tokens.svg", "run0_loss_vs_step.svg", "run1_loss_vs_step.svg"}) {
    EXPECT_TRUE(fs::exists(out->dir / f)) << f;
  }
  for (const char* f : {"compare_loss_vs_step.svg", "compare_loss_vs_time.svg"}) {
    const std::string svg = readAll(out->dir / f);
    EXPECT_EQ(polylinePoints(svg, "sync train"), kSteps) << f;
    EXPECT_EQ(polylinePoints(svg, "diloco train"), kSteps) << f;
    EXPECT_NE(svg.find("data-series=\"diloco val\""), std::string::npos) << f;
  }
  const std::string html = readAll(out->index_html);
  EXPECT_NE(html.find("sync vs diloco"), std::string::npos);
  EXPECT_NE(out->summary.find("Comparison of 2 runs"), std::string::npos);
  EXPECT_NE(out->summary.find("diloco: strategy diloco"), std::string::npos);

  // Re-reporting one run into the same directory drops the comparison charts
  // but keeps files that are not ours.
  writeAll(tmp.path() / "cmp" / "notes.svg", "<svg/>");
  auto again = writeReport({tmp.path() / "diloco"}, opt);
  ASSERT_TRUE(again.isOk());
  EXPECT_FALSE(fs::exists(tmp.path() / "cmp" / "compare_loss_vs_step.svg"));
  EXPECT_FALSE(fs::exists(tmp.path() / "cmp" / "compare_val_vs_time.svg"));
  EXPECT_FALSE(fs::exists(tmp.path() / "cmp" / "compare_loss_vs_tokens.svg"));
  EXPECT_FALSE(fs::exists(tmp.path() / "cmp" / "run1_loss_vs_step.svg"));
  EXPECT_TRUE(fs::exists(tmp.path() / "cmp" / "loss_vs_step.svg"));
  EXPECT_TRUE(fs::exists(tmp.path() / "cmp" / "notes.svg"));
}

// (x, y) of the marker dots of series `name`, read back from their hover
// titles ("NAME: (x, y)"): the data a chart shows, not pixel positions.
std::vector<std::pair<double, double>> markerPoints(const std::string& svg, const std::string& name) {
  std::vector<std::pair<double, double>> out;
  const size_t g = svg.find("<g class=\"markers\" data-series=\"" + name + "\"");
  if (g == std::string::npos) return out;
  const size_t end = svg.find("</g>", g);
  const std::regex re("<title>[^<]*: \\(([-0-9.e+]+), ([-0-9.e+]+)\\)</title>");
  const std::string body = svg.substr(g, end - g);
  for (auto it = std::sregex_iterator(body.begin(), body.end(), re); it != std::sregex_iterator(); ++it) {
    out.push_back({std::stod((*it)[1].str()), std::stod((*it)[2].str())});
  }
  return out;
}

TEST(Report, StrategiesOverlayFromADirectoryOfRuns) {
  // The layout bench_strategies_torch leaves: one run per strategy under one
  // directory, each ending with a summary line that carries the strait bytes.
  TempDir tmp;
  const fs::path bench = tmp.path() / "bench";
  const std::vector<std::pair<std::string, double>> runs = {{"sync", 0.0}, {"diloco", 0.05}, {"streaming", 0.1}};
  for (const auto& [name, offset] : runs) {
    writeRun(bench / name, name, offset, false);
    std::ofstream(bench / name / "metrics.jsonl", std::ios::app)
        << R"({"kind":"summary","steps":10,"wall_s":10.0,"bytes_strait":)" << (name == "sync" ? 300e6 : 2e6) << "}\n";
  }
  fs::create_directories(bench / "not-a-run");  // ignored: no metrics.jsonl

  auto dirs = expandRunDirs({bench});
  ASSERT_TRUE(dirs.isOk()) << dirs.status().toString();
  ASSERT_EQ(dirs->size(), 3u);
  EXPECT_EQ((*dirs)[0].filename(), "diloco");  // name order
  EXPECT_EQ((*dirs)[2].filename(), "sync");

  auto out = writeReport({bench});  // no --out: next to the runs
  ASSERT_TRUE(out.isOk()) << out.status().toString();
  EXPECT_EQ(out->dir, fs::weakly_canonical(bench / "report"));

  // Validation loss vs wall-clock: every run's two evaluations (steps 4 and
  // 9, at 5.5 s and 10.5 s after `started`; val loss 3.5 - 0.1 step + offset).
  const std::string vt = readAll(out->dir / "compare_val_vs_time.svg");
  for (const auto& [name, offset] : runs) {
    SCOPED_TRACE(name);
    const auto pts = markerPoints(vt, name + " val");
    ASSERT_EQ(pts.size(), 2u);
    EXPECT_NEAR(pts[0].first, 5.5, 1e-6);
    EXPECT_NEAR(pts[0].second, 3.1 + offset, 1e-3);
    EXPECT_NEAR(pts[1].first, 10.5, 1e-6);
    EXPECT_NEAR(pts[1].second, 2.6 + offset, 1e-3);
    EXPECT_EQ(polylinePoints(vt, name + " val"), 2);
  }
  EXPECT_EQ(vt.find("train\""), std::string::npos);  // validation only

  // Loss vs tokens: 3 ranks x 1000 tokens per step, so step 4 ends at 15000
  // tokens and step 9 at 30000; the training line has a point per step.
  const std::string tk = readAll(out->dir / "compare_loss_vs_tokens.svg");
  for (const auto& [name, offset] : runs) {
    SCOPED_TRACE(name);
    const auto pts = markerPoints(tk, name + " val");
    ASSERT_EQ(pts.size(), 2u);
    EXPECT_NEAR(pts[0].first, 15000, 1e-6);
    EXPECT_NEAR(pts[1].first, 30000, 1e-6);
    EXPECT_NEAR(pts[1].second, 2.6 + offset, 1e-3);
    EXPECT_EQ(polylinePoints(tk, name + " train"), kSteps);
  }
  const auto xt = tickValues(tk, "xtick");
  ASSERT_FALSE(xt.empty());
  EXPECT_LE(xt.front(), 3000);   // first point: step 0 = 3000 tokens
  EXPECT_GE(xt.back(), 30000);

  // The page inlines both charts; the table and summary carry tokens,
  // utilisation (r0, r1: 0.4 s x 10 / 10 s; r2: 0.8 s x 10 / 10 s -> mean
  // 53.3 %) and the strait bytes of the summary lines.
  const std::string html = readAll(out->index_html);
  EXPECT_NE(html.find("Comparison: validation loss vs wall-clock"), std::string::npos);
  EXPECT_NE(html.find("Comparison: loss vs tokens"), std::string::npos);
  EXPECT_NE(out->summary.find("sync: strategy sync, 10 steps, wall 10.0 s, 30,000 tokens"), std::string::npos)
      << out->summary;
  EXPECT_NE(out->summary.find("utilisation 53.3 %, over straits 286.1MiB"), std::string::npos) << out->summary;
  EXPECT_NE(out->summary.find("utilisation 53.3 %, over straits 1.9MiB"), std::string::npos) << out->summary;
}

TEST(Report, WorkerGapBreaksItsLine) {
  // Rank 1 is down for steps 3 and 4: its throughput line has a gap there,
  // rank 0's line stays whole. No run.json: workers come from the metrics.
  TempDir tmp;
  std::ostringstream m;
  for (int s = 0; s < 8; ++s) {
    for (int r = 0; r < 2; ++r) {
      if (r == 1 && (s == 3 || s == 4)) continue;
      m << R"({"kind":"step","step":)" << s << R"(,"rank":)" << r << R"(,"loss":2.0,"samples":4,"tokens":100,)"
        << R"("step_s":0.5,"time":)" << 100 + s << "}\n";
    }
  }
  writeAll(tmp.path() / "metrics.jsonl", m.str());
  auto out = writeReport({tmp.path()});
  ASSERT_TRUE(out.isOk()) << out.status().toString();
  const std::string svg = readAll(out->dir / "tokens_per_s.svg");
  size_t lines_r1 = 0;
  for (size_t p = svg.find("data-series=\"r1\""); p != std::string::npos; p = svg.find("data-series=\"r1\"", p + 1)) {
    ++lines_r1;
  }
  EXPECT_EQ(lines_r1, 2u);                // steps 0-2 and 5-7
  EXPECT_EQ(polylinePoints(svg, "r1"), 3);  // the first piece
  EXPECT_EQ(polylinePoints(svg, "r0"), 8);
  EXPECT_NE(out->summary.find("no run.json"), std::string::npos);
}

// A pipeline-parallel run as the parallel trainer logs it (rank 0): a
// "parallel" layout line, one "pipeline" line per step, rank-summed "moe"
// lines with drops. Step 1 (warm-up) is left out of the means; step 4 is
// logged twice (replayed after a restart) and its second line counts.
// Bubbles are 1 - busy / window, as the trainer computes them.
void writePipelineRun(const fs::path& dir) {
  fs::create_directories(dir);
  std::ostringstream m;
  m << R"({"kind":"parallel","pipeline_stages":3,"stage_layers":[2,1,1],"replicas":1,"expert_parallel":1,)"
    << R"("expert_begin":[],"shares":[8],"recompute":false})" << "\n";
  struct P {
    int step;
    double busy[3];
    double window;
  };
  const P steps[] = {{1, {1.0, 1.0, 1.0}, 10.0},
                     {2, {0.30, 0.20, 0.24}, 0.40},
                     {3, {0.34, 0.22, 0.26}, 0.50},
                     {4, {9.0, 9.0, 9.0}, 90.0},  // first try of step 4: superseded
                     {4, {0.32, 0.24, 0.25}, 0.45}};
  for (const auto& p : steps) {
    m << R"({"kind":"step","step":)" << p.step << R"(,"rank":0,"loss":3.0,"tokens":512,"compute_s":)" << p.busy[0]
      << R"(,"step_s":)" << p.window + 0.05 << R"(,"time":)" << 1000 + p.step << "}\n";
    double bubble[3], mean = 0;
    for (int s = 0; s < 3; ++s) {
      bubble[s] = 1.0 - p.busy[s] / p.window;
      mean += bubble[s] / 3;
    }
    m << R"({"kind":"pipeline","step":)" << p.step << R"(,"stages":3,"micro_batches":4,"stage_layers":[2,1,1],)"
      << R"("busy_s":[)" << p.busy[0] << "," << p.busy[1] << "," << p.busy[2] << R"(],"bubble":[)" << bubble[0] << ","
      << bubble[1] << "," << bubble[2] << R"(],"bubble_mean":)" << mean << R"(,"window_s":)" << p.window
      << R"(,"bubble_1f1b_theory":0.3333333333333333})" << "\n";
  }
  m << R"({"kind":"moe","step":3,"rank":0,"layer":1,"tokens_per_expert":[30,10,20,4],"dropped_per_expert":[6,0,2,0],)"
    << R"("dropped":8,"capacity_sum":48,"expert_parallel":2,"dispatch_bytes":1000})" << "\n";
  m << R"({"kind":"moe","step":4,"rank":0,"layer":1,"tokens_per_expert":[20,20,20,4],"dropped_per_expert":[0,0,0,0],)"
    << R"("dropped":0,"capacity_sum":48,"expert_parallel":2,"dispatch_bytes":2048})" << "\n";
  m << R"({"kind":"pipeline","step":5})" << "\n";  // no busy_s / bubble arrays: malformed
  writeAll(dir / "metrics.jsonl", m.str());
}

TEST(Report, PipelineBubbleAndExpertDrops) {
  TempDir tmp;
  const fs::path dir = tmp.path() / "pp";
  writePipelineRun(dir);
  auto run = loadRunDir(dir);
  ASSERT_TRUE(run.isOk());
  EXPECT_EQ(run->malformed, 1);
  EXPECT_EQ(run->unknown_kinds, 0);
  ASSERT_TRUE(run->parallel.has_value());
  EXPECT_EQ(run->parallel->stage_layers, (std::vector<int64_t>{2, 1, 1}));
  const RunStats st = computeRunStats(*run);
  ASSERT_TRUE(st.pipeline.has_value());
  const PipelineStats& p = *st.pipeline;
  EXPECT_EQ(p.stages, 3);
  EXPECT_EQ(p.micro_batches, 4);
  EXPECT_EQ(p.steps, 3);  // steps 2, 3, 4 (step 1 warms up)
  EXPECT_EQ(p.first_step, 2);
  ASSERT_EQ(p.per_stage.size(), 3u);
  // By hand: busy means over steps 2..4, bubble = mean of 1 - busy / window.
  EXPECT_NEAR(p.per_stage[0].busy_s, (0.30 + 0.34 + 0.32) / 3, 1e-9);
  EXPECT_NEAR(p.per_stage[1].busy_s, (0.20 + 0.22 + 0.24) / 3, 1e-9);
  EXPECT_NEAR(p.per_stage[2].busy_s, (0.24 + 0.26 + 0.25) / 3, 1e-9);
  const double b0 = ((1 - 0.30 / 0.40) + (1 - 0.34 / 0.50) + (1 - 0.32 / 0.45)) / 3;  // 0.286296
  const double b1 = ((1 - 0.20 / 0.40) + (1 - 0.22 / 0.50) + (1 - 0.24 / 0.45)) / 3;  // 0.508889
  const double b2 = ((1 - 0.24 / 0.40) + (1 - 0.26 / 0.50) + (1 - 0.25 / 0.45)) / 3;  // 0.441481
  EXPECT_NEAR(p.per_stage[0].bubble, b0, 1e-6);
  EXPECT_NEAR(p.per_stage[1].bubble, b1, 1e-6);
  EXPECT_NEAR(p.per_stage[2].bubble, b2, 1e-6);
  EXPECT_NEAR(p.bubble_mean, (b0 + b1 + b2) / 3, 1e-6);  // 0.412222
  EXPECT_NEAR(p.window_s, (0.40 + 0.50 + 0.45) / 3, 1e-9);
  EXPECT_NEAR(p.bubble_theory, 2.0 / 6.0, 1e-9);  // (p-1)/(m+p-1), p 3, m 4
  EXPECT_EQ(p.per_stage[0].layers, 2);
  EXPECT_EQ(p.per_stage[2].layers, 1);
  // MoE: 64 + 64 assignments routed, 8 dropped; step 4 max 20 / mean 16.
  ASSERT_EQ(st.moe_layers.size(), 1u);
  const MoeLayerStats& ml = st.moe_layers[0];
  EXPECT_EQ(ml.lines, 2);
  EXPECT_NEAR(ml.routed, 128, 1e-9);
  EXPECT_NEAR(ml.dropped, 8, 1e-9);
  EXPECT_NEAR(ml.drop_fraction, 0.0625, 1e-12);
  EXPECT_EQ(ml.last_step, 4);
  EXPECT_NEAR(ml.last_imbalance, 1.25, 1e-12);
  EXPECT_NEAR(ml.dispatch_bytes, 2048, 1e-9);

  auto out = writeReport({dir});
  ASSERT_TRUE(out.isOk()) << out.status().toString();
  const std::string& sum = out->summary;
  EXPECT_NE(sum.find("pipeline           3 stages, 4 micro-batches per step (1F1B); mean of 3 logged step(s) from "
                     "step 2"),
            std::string::npos)
      << sum;
  EXPECT_NE(sum.find("    0      2       320ms       28.6 %\n"), std::string::npos) << sum;
  EXPECT_NE(sum.find("    1      1       220ms       50.9 %\n"), std::string::npos) << sum;
  EXPECT_NE(sum.find("    2      1       250ms       44.1 %\n"), std::string::npos) << sum;
  EXPECT_NE(sum.find("bubble 41.2 % measured (stage mean) vs 33.3 % 1F1B theory (p-1)/(m+p-1); schedule window "
                     "450ms per step"),
            std::string::npos)
      << sum;
  EXPECT_NE(sum.find("moe layer 1        128 routed, 8 dropped (6.25 %) over 2 line(s); step 4: per expert "
                     "[20,20,20,4], max/mean 1.25, dropped [0,0,0,0], dispatch 2.0KiB"),
            std::string::npos)
      << sum;

  const std::string html = readAll(out->index_html);
  EXPECT_NE(html.find("<h3>Pipeline</h3>"), std::string::npos);
  EXPECT_NE(html.find("<tr><td>0</td><td>2</td><td>320.0</td><td>128.8</td><td>28.6 %</td></tr>"), std::string::npos)
      << "idle = 0.286296 x 0.45 s";
  EXPECT_NE(html.find("<tr><td>1F1B theory</td><td></td><td></td><td></td><td>33.3 %</td></tr>"), std::string::npos);
  EXPECT_NE(html.find("<td>6.25 %</td>"), std::string::npos);
  const std::string stages_svg = readAll(out->dir / "pipeline_stages.svg");
  EXPECT_NE(stages_svg.find("data-segment=\"busy\""), std::string::npos);
  EXPECT_NE(stages_svg.find("data-segment=\"bubble (idle)\""), std::string::npos);
  const std::string bubble_svg = readAll(out->dir / "pipeline_bubble.svg");
  EXPECT_EQ(polylinePoints(bubble_svg, "measured (stage mean)"), 4);  // steps 1..4, step 4 once
  EXPECT_EQ(polylinePoints(bubble_svg, "1F1B theory (p-1)/(m+p-1)"), 4);
}

TEST(Report, MissingMetricsIsAClearError) {
  TempDir tmp;
  auto out = writeReport({tmp.path()});
  ASSERT_FALSE(out.isOk());
  EXPECT_EQ(out.status().code(), core::StatusCode::kNotFound);
  EXPECT_NE(out.status().message().find("metrics.jsonl"), std::string::npos);
  auto none = writeReport({tmp.path() / "does-not-exist"});
  ASSERT_FALSE(none.isOk());
  EXPECT_EQ(none.status().code(), core::StatusCode::kNotFound);
}

}  // namespace
}  // namespace archipelago::report
