// Charts and the HTML page of `archipelago report` (report.h): turns the
// loaded runs into SVG charts (report_chart.h), inlines them into one
// self-contained index.html and writes summary.txt and one .svg per chart.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <set>

#include "archipelago/core/files.h"
#include "archipelago/core/log.h"
#include "archipelago/core/units.h"
#include "archipelago/report/report.h"
#include "archipelago/report/report_chart.h"
#include "report/report_internal.h"

namespace archipelago::report {
namespace {

namespace fs = std::filesystem;
using detail::dedupedSteps;
using detail::fmtCount;
using detail::fmtFixed;
using detail::fmtWall;
using chart::escapeXml;

// One chart of the report: written as <file> and inlined into the page.
struct Chart {
  std::string file;
  std::string title;
  std::string svg;
  std::string note;  // one sentence under the chart: how to read it
};

std::string rankLabel(int rank, const std::string& island) {
  return "r" + std::to_string(rank) + (island.empty() ? "" : " " + island);
}

// Event colours: failures stand out, routine events are muted.
std::string eventColor(const std::string& event) {
  static const std::map<std::string, std::string> colors = {
      {"failure", "#d62728"}, {"restart", "#ff7f0e"}, {"join", "#2ca02c"},     {"resync", "#9467bd"},
      {"epoch", "#17becf"},   {"rebalance", "#8c564b"}, {"checkpoint", "#7f7f7f"}};
  auto it = colors.find(event);
  return it == colors.end() ? "#bcbd22" : it->second;
}

// Per-rank (x = step, y = f(record)) series from the deduplicated step lines.
template <typename F>
std::vector<chart::Series> perRankSeries(const RunData& run, F value, size_t max_points) {
  // Steps some worker reported, in order: a rank missing from one of them
  // (failed, not yet joined) gets a gap there instead of a straight line.
  const std::vector<size_t> idx = dedupedSteps(run);
  std::vector<int64_t> all_steps;
  for (size_t i : idx) {
    if (all_steps.empty() || all_steps.back() != run.steps[i].step) all_steps.push_back(run.steps[i].step);
  }
  std::map<int, chart::Series> by_rank;
  std::map<int, size_t> next_pos;  // rank -> position in all_steps after its last point
  for (size_t i : idx) {
    const auto& s = run.steps[i];
    const double v = value(s);
    if (!std::isfinite(v)) continue;
    chart::Series& ser = by_rank[s.rank];
    if (ser.name.empty()) ser.name = rankLabel(s.rank, s.island);
    const size_t pos = static_cast<size_t>(
        std::lower_bound(all_steps.begin(), all_steps.end(), s.step) - all_steps.begin());
    auto np = next_pos.find(s.rank);
    if (np != next_pos.end() && pos > np->second) {
      ser.x.push_back(static_cast<double>(all_steps[np->second]));
      ser.y.push_back(kMissing);
    }
    next_pos[s.rank] = pos + 1;
    ser.x.push_back(static_cast<double>(s.step));
    ser.y.push_back(v);
  }
  std::vector<chart::Series> out;
  for (auto& [rank, ser] : by_rank) {
    chart::downsample(ser.x, ser.y, max_points);
    out.push_back(std::move(ser));
  }
  return out;
}

std::vector<chart::VMarker> eventMarkers(const RunData& run) {
  std::vector<chart::VMarker> out;
  for (const auto& e : run.events) {
    if (e.step < 0) continue;
    std::string label = e.event + " at step " + std::to_string(e.step);
    if (!e.detail.empty()) label += ": " + e.detail;
    out.push_back({static_cast<double>(e.step), e.event, label, eventColor(e.event)});
  }
  return out;
}

chart::Series trainLossSeries(const std::vector<StepPoint>& loss, bool vs_time, size_t max_points) {
  chart::Series s;
  s.name = "train loss (rank mean)";
  for (const auto& p : loss) {
    s.x.push_back(vs_time ? p.time_s : static_cast<double>(p.step));
    s.y.push_back(p.value);
  }
  chart::downsample(s.x, s.y, max_points);
  return s;
}

chart::Series valLossSeries(const RunData& run, bool vs_time) {
  chart::Series s;
  s.name = "validation loss";
  s.line = vs_time;
  s.markers = true;
  const double t0 = runStartTime(run);
  std::vector<EvalRecord> evals = run.evals;
  std::stable_sort(evals.begin(), evals.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  for (const auto& e : evals) {
    s.x.push_back(vs_time ? e.time - t0 : static_cast<double>(e.step));
    s.y.push_back(e.val_loss);
  }
  return s;
}

std::vector<Chart> runCharts(const RunData& run, const RunStats& st, size_t max_points) {
  std::vector<Chart> charts;
  const auto loss = meanLossPerStep(run);

  {
    chart::LineChart c;
    c.title = "Training loss vs step — " + run.name;
    c.x_label = "step";
    c.y_label = "loss";
    c.series.push_back(trainLossSeries(loss, false, max_points));
    if (!run.evals.empty()) c.series.push_back(valLossSeries(run, false));
    c.markers = eventMarkers(run);
    charts.push_back({"loss_vs_step.svg", c.title, chart::renderLineChart(c),
                      "Mean training loss over ranks per step; dots: validation loss; dashed vertical lines: events "
                      "(hover for details)."});
  }
  if (!run.evals.empty() || !loss.empty()) {
    chart::LineChart c;
    c.title = "Loss vs wall-clock — " + run.name;
    c.x_label = "seconds since start";
    c.y_label = "loss";
    chart::Series train = trainLossSeries(loss, true, max_points);
    train.dashed = true;
    train.color = "#aaaaaa";
    c.series.push_back(std::move(train));
    if (!run.evals.empty()) c.series.push_back(valLossSeries(run, true));
    charts.push_back({"loss_vs_time.svg", c.title, chart::renderLineChart(c),
                      "Validation loss (and, dashed, mean training loss) against wall-clock time: the axis on which "
                      "strategies are compared."});
  }
  if (!run.steps.empty()) {
    chart::LineChart c;
    c.title = "Throughput per worker — " + run.name;
    c.x_label = "step";
    c.y_label = "tokens/s";
    c.y_from_zero = true;
    c.series = perRankSeries(
        run,
        [](const StepRecord& s) {
          if (std::isfinite(s.tokens_per_s)) return s.tokens_per_s;
          return s.step_s > 0 ? s.tokens / s.step_s : kMissing;
        },
        max_points);
    charts.push_back({"tokens_per_s.svg", c.title, chart::renderLineChart(c), "Tokens per second of each worker."});
  }
  if (!st.workers.empty()) {
    chart::StackedBarChart c;
    c.title = "Where step time goes (mean per step) — " + run.name;
    c.x_label = "worker";
    c.y_label = "seconds";
    chart::BarSegment compute{"compute", {}, "#1f77b4"}, comm{"communication", {}, "#ff7f0e"},
        wait{"wait", {}, "#bbbbbb"};
    for (const auto& w : st.workers) {
      c.categories.push_back(rankLabel(w.rank, w.island) + (w.device.empty() ? "" : " (" + w.device + ")"));
      compute.values.push_back(w.mean_compute_s);
      // wait_s is the part of comm_s spent blocked on peers (docs/report.md):
      // stacked apart so that the bar still sums to compute + comm.
      comm.values.push_back(std::max(0.0, w.mean_comm_s - w.mean_wait_s));
      wait.values.push_back(w.mean_wait_s);
    }
    c.segments = {compute, comm, wait};
    charts.push_back({"time_breakdown.svg", c.title, chart::renderStackedBarChart(c),
                      "Mean compute time, communication time and, of the communication, the time spent waiting "
                      "for peers, per step of each worker."});
  }
  if (!run.steps.empty()) {
    chart::LineChart c;
    c.title = "Batch share per worker — " + run.name;
    c.x_label = "step";
    c.y_label = "samples per step";
    c.y_from_zero = true;
    c.series = perRankSeries(run, [](const StepRecord& s) { return s.samples; }, max_points);
    charts.push_back({"batch_share.svg", c.title, chart::renderLineChart(c),
                      "Samples each worker processed per step: the rebalancer moves work towards faster workers."});
  }
  if (st.pipeline) {
    const PipelineStats& p = *st.pipeline;
    chart::StackedBarChart c;
    c.title = "Pipeline: busy and idle time per stage (mean per step) — " + run.name;
    c.x_label = "stage";
    c.y_label = "seconds";
    chart::BarSegment busy{"busy", {}, "#1f77b4"}, idle{"bubble (idle)", {}, "#bbbbbb"};
    for (const auto& s : p.per_stage) {
      c.categories.push_back("stage " + std::to_string(s.stage) +
                             (s.layers > 0 ? " (" + std::to_string(s.layers) + " layers)" : ""));
      const double b = std::isfinite(s.busy_s) ? s.busy_s : 0.0;
      busy.values.push_back(b);
      // idle = bubble x window (the window is shared by the pipeline's stages)
      idle.values.push_back(std::isfinite(p.window_s) && std::isfinite(s.bubble) ? s.bubble * p.window_s : 0.0);
    }
    c.segments = {busy, idle};
    charts.push_back({"pipeline_stages.svg", c.title, chart::renderStackedBarChart(c),
                      "Per stage: forward/backward compute (emulated slowdown included) and idle time inside the "
                      "pipeline's schedule window, mean per logged step after the first."});

    chart::LineChart l;
    l.title = "Pipeline bubble vs step — " + run.name;
    l.x_label = "step";
    l.y_label = "bubble (% of the schedule window)";
    l.y_from_zero = true;
    chart::Series measured, theory;
    measured.name = "measured (stage mean)";
    theory.name = "1F1B theory (p-1)/(m+p-1)";
    theory.dashed = true;
    std::map<int64_t, const PipelineRecord*> by_step;
    for (const auto& r : run.pipeline) by_step[r.step] = &r;
    for (const auto& [step, r] : by_step) {
      measured.x.push_back(static_cast<double>(step));
      measured.y.push_back(100.0 * r->bubble_mean);
      theory.x.push_back(static_cast<double>(step));
      theory.y.push_back(100.0 * r->bubble_theory);
    }
    chart::downsample(measured.x, measured.y, max_points);
    chart::downsample(theory.x, theory.y, max_points);
    l.series = {measured, theory};
    charts.push_back({"pipeline_bubble.svg", l.title, chart::renderLineChart(l),
                      "Idle fraction of the schedule window, mean over stages, per logged step, against the 1F1B "
                      "bubble for the step's stages and micro-batches (dashed)."});
  }
  // MoE: expert load at the last step that reported each layer, stacked by rank.
  std::map<int, int64_t> last_step_of_layer;
  for (const auto& m : run.moe) {
    auto [it, inserted] = last_step_of_layer.emplace(m.layer, m.step);
    if (!inserted) it->second = std::max(it->second, m.step);
  }
  for (const auto& [layer, step] : last_step_of_layer) {
    std::map<int, std::vector<double>> by_rank;  // last line per rank wins
    size_t experts = 0;
    for (const auto& m : run.moe) {
      if (m.layer != layer || m.step != step) continue;
      by_rank[m.rank] = m.tokens_per_expert;
      experts = std::max(experts, m.tokens_per_expert.size());
    }
    chart::StackedBarChart c;
    c.title = "MoE tokens per expert, layer " + std::to_string(layer) + ", step " + std::to_string(step) + " — " +
              run.name;
    c.x_label = "expert";
    c.y_label = "tokens";
    for (size_t e = 0; e < experts; ++e) c.categories.push_back("e" + std::to_string(e));
    for (auto& [rank, v] : by_rank) {
      v.resize(experts, 0.0);
      c.segments.push_back({"r" + std::to_string(rank), v, ""});
    }
    charts.push_back({"moe_layer" + std::to_string(layer) + ".svg", c.title, chart::renderStackedBarChart(c),
                      "Tokens routed to each expert (stacked by rank) at the last logged step: balanced routing "
                      "gives even bars."});
  }
  return charts;
}

// Validation loss of a run against the tokens all ranks had trained when it
// was measured (eval at step s: cumulative tokens through step s).
chart::Series valLossVsTokens(const RunData& run, const std::vector<StepPoint>& loss) {
  chart::Series s;
  s.markers = true;
  std::map<int64_t, double> tokens_at;
  for (const auto& p : loss) tokens_at[p.step] = p.tokens;
  std::vector<EvalRecord> evals = run.evals;
  std::stable_sort(evals.begin(), evals.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  for (const auto& e : evals) {
    auto it = tokens_at.upper_bound(e.step);  // the last step <= e.step
    if (it == tokens_at.begin()) continue;
    s.x.push_back(std::prev(it)->second);
    s.y.push_back(e.val_loss);
  }
  return s;
}

std::vector<Chart> comparisonCharts(const std::vector<RunData>& runs, size_t max_points) {
  std::vector<Chart> charts;
  {
    // The chart of issue 6: what each strategy's model is worth after a given wall-clock time.
    chart::LineChart c;
    c.title = "Comparison: validation loss vs wall-clock";
    c.x_label = "seconds since start";
    c.y_label = "validation loss";
    for (size_t i = 0; i < runs.size(); ++i) {
      if (runs[i].evals.empty()) continue;
      chart::Series val = valLossSeries(runs[i], true);
      val.name = runs[i].name + " val";
      val.color = chart::paletteColor(i);
      c.series.push_back(std::move(val));
    }
    if (!c.series.empty()) {
      charts.push_back({"compare_val_vs_time.svg", c.title, chart::renderLineChart(c),
                        "Validation loss of every run against seconds since the run started (one colour per run; "
                        "hover a dot for its value)."});
    }
  }
  {
    chart::LineChart c;
    c.title = "Comparison: loss vs tokens";
    c.x_label = "tokens trained (all workers)";
    c.y_label = "loss";
    for (size_t i = 0; i < runs.size(); ++i) {
      const std::string color = chart::paletteColor(i);
      const auto loss = meanLossPerStep(runs[i]);
      chart::Series train;
      train.name = runs[i].name + " train";
      train.color = color;
      for (const auto& p : loss) {
        train.x.push_back(p.tokens);
        train.y.push_back(p.value);
      }
      chart::downsample(train.x, train.y, max_points);
      c.series.push_back(std::move(train));
      if (!runs[i].evals.empty()) {
        chart::Series val = valLossVsTokens(runs[i], loss);
        val.name = runs[i].name + " val";
        val.color = color;
        val.dashed = true;
        c.series.push_back(std::move(val));
      }
    }
    charts.push_back({"compare_loss_vs_tokens.svg", c.title, chart::renderLineChart(c),
                      "Training (solid) and validation (dashed, dots) loss of every run against the tokens trained "
                      "so far: runs at equal tokens compare at the same x."});
  }
  for (bool vs_time : {false, true}) {
    chart::LineChart c;
    c.title = vs_time ? "Comparison: loss vs wall-clock" : "Comparison: loss vs step";
    c.x_label = vs_time ? "seconds since start" : "step";
    c.y_label = "loss";
    for (size_t i = 0; i < runs.size(); ++i) {
      const std::string color = chart::paletteColor(i);
      chart::Series train = trainLossSeries(meanLossPerStep(runs[i]), vs_time, max_points);
      train.name = runs[i].name + " train";
      train.color = color;
      c.series.push_back(std::move(train));
      if (!runs[i].evals.empty()) {
        chart::Series val = valLossSeries(runs[i], vs_time);
        val.name = runs[i].name + " val";
        val.color = color;
        val.dashed = true;
        c.series.push_back(std::move(val));
      }
    }
    charts.push_back({vs_time ? "compare_loss_vs_time.svg" : "compare_loss_vs_step.svg", c.title,
                      chart::renderLineChart(c),
                      vs_time ? "Training (solid) and validation (dashed, dots) loss of every run against wall-clock "
                                "time."
                              : "Training (solid) and validation (dots) loss of every run against the step."});
  }
  return charts;
}

// A path to `target` as seen from `from_dir` (relative when possible).
std::string linkTo(const fs::path& target, const fs::path& from_dir) {
  std::error_code ec;
  fs::path rel = fs::relative(target, from_dir, ec);
  return ec || rel.empty() ? target.string() : rel.generic_string();
}

const char* kStyle = R"(body{font-family:sans-serif;margin:24px auto;max-width:1000px;color:#222;padding:0 12px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
pre{background:#f6f6f6;padding:10px;overflow-x:auto;font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
figure{margin:18px 0}figcaption{font-size:12px;color:#555}svg{max-width:100%;height:auto}
.emulated{background:#fff4d6;border:1px solid #e0b84c;padding:6px 10px;margin:8px 0}
.warn{color:#a33})";

std::string htmlTable(const std::vector<std::string>& head, const std::vector<std::vector<std::string>>& rows) {
  std::string o = "<table><tr>";
  for (const auto& h : head) o += "<th>" + escapeXml(h) + "</th>";
  o += "</tr>\n";
  for (const auto& r : rows) {
    o += "<tr>";
    for (const auto& c : r) o += "<td>" + escapeXml(c) + "</td>";
    o += "</tr>\n";
  }
  return o + "</table>\n";
}

std::string optLoss(const std::optional<double>& v) { return v ? fmtFixed(*v, 4) : "n/a"; }

void appendFigures(std::string& html, const std::vector<Chart>& charts, const std::vector<std::string>& files) {
  for (size_t i = 0; i < charts.size(); ++i) {
    html += "<figure>\n" + charts[i].svg + "<figcaption>" + escapeXml(charts[i].note) + " <a href=\"" +
            escapeXml(files[i]) + "\">" + escapeXml(files[i]) + "</a></figcaption></figure>\n";
  }
}

// A report written earlier into the same directory (another number of runs,
// a MoE layer that no longer exists) must not leave charts behind that the
// new page does not show. Only files named like our charts are removed.
void removeStaleCharts(const fs::path& dir) {
  static const std::regex ours(
      R"(^(run[0-9]+_)?(compare_loss_vs_(step|time|tokens)|compare_val_vs_time|loss_vs_(step|time)|tokens_per_s|)"
      R"(time_breakdown|batch_share|pipeline_stages|pipeline_bubble|)"
      R"(moe_layer-?[0-9]+)\.svg$)");
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.is_regular_file(ec)) continue;
    if (std::regex_match(entry.path().filename().string(), ours)) fs::remove(entry.path(), ec);
  }
}

}  // namespace

core::Result<std::vector<fs::path>> expandRunDirs(const std::vector<fs::path>& paths) {
  std::vector<fs::path> out;
  for (const auto& p : paths) {
    std::error_code ec;
    if (!fs::is_directory(p, ec) || fs::exists(p / "metrics.jsonl", ec)) {
      out.push_back(p);  // a run (loadRunDir says what is wrong with it, if anything)
      continue;
    }
    std::vector<fs::path> runs;
    for (const auto& entry : fs::directory_iterator(p, ec)) {
      if (entry.is_directory(ec) && fs::exists(entry.path() / "metrics.jsonl", ec)) runs.push_back(entry.path());
    }
    if (runs.empty()) {
      return core::notFound("'" + p.string() + "' has no metrics.jsonl and no sub-directory with one; pass the " +
                            "run_dir of a training run or a directory of runs (e.g. bench_strategies_torch --out)");
    }
    std::sort(runs.begin(), runs.end());
    out.insert(out.end(), runs.begin(), runs.end());
  }
  return out;
}

core::Result<ReportOutput> writeReport(const std::vector<fs::path>& paths, const ReportOptions& options) {
  if (paths.empty()) return core::invalidArgument("report: give at least one run directory");
  ARCH_ASSIGN_OR_RETURN(const std::vector<fs::path> run_dirs, expandRunDirs(paths));
  // A directory of runs gets the report next to them, not inside the first.
  fs::path default_out;
  if (std::error_code ec; fs::is_directory(paths.front(), ec) && !fs::exists(paths.front() / "metrics.jsonl", ec)) {
    default_out = paths.front() / "report";
  }
  std::vector<RunData> runs;
  for (const auto& d : run_dirs) {
    auto r = loadRunDir(d);
    if (!r.isOk()) return r.status();
    runs.push_back(std::move(r).value());
  }
  // Legends need distinct names ("a/run" and "b/run" both end in "run").
  std::map<std::string, int> seen;
  for (auto& r : runs) {
    if (int n = ++seen[r.name]; n > 1) r.name += " #" + std::to_string(n);
  }
  std::vector<RunStats> stats;
  for (const auto& r : runs) stats.push_back(computeRunStats(r));

  ReportOutput out;
  out.dir = !options.out_dir.empty() ? options.out_dir : !default_out.empty() ? default_out : runs.front().dir / "report";
  std::error_code ec;
  fs::create_directories(out.dir, ec);
  if (ec) return core::unavailable(out.dir.string() + ": cannot create the report directory: " + ec.message());
  out.dir = fs::weakly_canonical(out.dir, ec);
  removeStaleCharts(out.dir);
  const bool multi = runs.size() > 1;

  std::string title = "Archipelago report: ";
  for (size_t i = 0; i < runs.size(); ++i) title += (i ? " vs " : "") + runs[i].name;
  std::string html = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + escapeXml(title) +
                     "</title>\n<style>" + kStyle + "</style></head><body>\n<h1>" + escapeXml(title) + "</h1>\n";

  auto emit = [&](const Chart& c, const std::string& prefix, std::vector<std::string>& files) -> core::Status {
    const std::string file = prefix + c.file;
    ARCH_RETURN_IF_ERROR(core::writeFile(out.dir / file, c.svg));
    out.charts.push_back(out.dir / file);
    files.push_back(file);
    return core::okStatus();
  };

  if (multi) {
    std::vector<std::vector<std::string>> rows;
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto& s = stats[i];
      rows.push_back({runs[i].name, runs[i].strategy.empty() ? "-" : runs[i].strategy, std::to_string(s.steps),
                      fmtWall(s.wall_s), fmtCount(s.tokens), fmtCount(s.tokens_per_s), optLoss(s.final_loss),
                      optLoss(s.final_val_loss), s.measured_step_s ? fmtFixed(*s.measured_step_s, 3) : "n/a",
                      fmtFixed(100 * s.utilisation, 1) + " %",
                      s.bytes_strait > 0 ? core::formatBytes(s.bytes_strait) : "n/a"});
    }
    const std::vector<std::string> head = {"run",      "strategy",         "steps",          "wall",
                                           "tokens",   "tokens/s",         "final train loss", "final val loss",
                                           "step s",   "utilisation (compute/wall)", "over straits"};
    html += "<h2>Comparison</h2>\n" + htmlTable(head, rows);
    out.summary += "Comparison of " + std::to_string(runs.size()) + " runs:\n";
    for (const auto& r : rows) {
      out.summary += "  " + r[0] + ": strategy " + r[1] + ", " + r[2] + " steps, wall " + r[3] + ", " + r[4] +
                     " tokens, " + r[5] + " tokens/s, final train loss " + r[6] + ", final val loss " + r[7] +
                     ", utilisation " + r[9] + ", over straits " + r[10] + "\n";
    }
    out.summary += "\n";
    std::vector<std::string> files;
    const auto charts = comparisonCharts(runs, options.max_points);
    for (const auto& c : charts) ARCH_RETURN_IF_ERROR(emit(c, "", files));
    appendFigures(html, charts, files);
  }

  for (size_t i = 0; i < runs.size(); ++i) {
    const RunData& run = runs[i];
    const RunStats& st = stats[i];
    const std::string text = formatSummary(run, st);
    out.summary += text + (i + 1 < runs.size() ? "\n" : "");

    html += "<h2 id=\"run" + std::to_string(i) + "\">Run " + escapeXml(run.name) + "</h2>\n";
    if (run.emulated) {
      html += "<div class=\"emulated\"><b>EMULATED:</b> device slowdowns and strait bandwidth/latency in this run are "
              "emulated on one machine; throughput numbers are not those of real hardware.</div>\n";
    }
    if (run.malformed > 0) {
      html += "<p class=\"warn\">" + std::to_string(run.malformed) + " malformed line(s) of metrics.jsonl skipped.</p>\n";
    }
    html += "<pre>" + escapeXml(text) + "</pre>\n";
    if (run.has_trace) {
      html += "<p>Trace of compute and communication per worker: <a href=\"" +
              escapeXml(linkTo(run.dir / "trace.json", out.dir)) +
              "\">trace.json</a>. Open it at <a href=\"https://ui.perfetto.dev\">ui.perfetto.dev</a> (\"Open trace "
              "file\") or in Chrome at chrome://tracing (\"Load\").</p>\n";
    }
    if (run.steps.empty()) html += "<p class=\"warn\">No step lines in metrics.jsonl yet.</p>\n";
    std::vector<std::string> files;
    const auto charts = runCharts(run, st, options.max_points);
    const std::string prefix = multi ? "run" + std::to_string(i) + "_" : "";
    for (const auto& c : charts) ARCH_RETURN_IF_ERROR(emit(c, prefix, files));
    appendFigures(html, charts, files);

    if (st.pipeline) {
      const PipelineStats& p = *st.pipeline;
      std::vector<std::vector<std::string>> rows;
      for (const auto& s : p.per_stage) {
        rows.push_back({std::to_string(s.stage), s.layers > 0 ? std::to_string(s.layers) : "-",
                        fmtFixed(1e3 * s.busy_s, 1), fmtFixed(1e3 * s.bubble * p.window_s, 1),
                        fmtFixed(100.0 * s.bubble, 1) + " %"});
      }
      rows.push_back({"mean", "", "", "", fmtFixed(100.0 * p.bubble_mean, 1) + " %"});
      rows.push_back({"1F1B theory", "", "", "", fmtFixed(100.0 * p.bubble_theory, 1) + " %"});
      html += "<h3>Pipeline</h3>\n<p>" + std::to_string(p.stages) + " stages, " + std::to_string(p.micro_batches) +
              " micro-batches per step, 1F1B; schedule window " + fmtFixed(1e3 * p.window_s, 1) +
              " ms per step; mean of " + std::to_string(p.steps) + " logged step(s) from step " +
              std::to_string(p.first_step) + ". Theory: (p&minus;1)/(m+p&minus;1).</p>\n" +
              htmlTable({"stage", "layers", "busy ms/step", "idle ms/step", "bubble"}, rows);
    }
    if (!st.moe_layers.empty()) {
      std::vector<std::vector<std::string>> rows;
      for (const auto& l : st.moe_layers) {
        rows.push_back({std::to_string(l.layer), std::to_string(l.lines), fmtCount(l.routed), fmtCount(l.dropped),
                        fmtFixed(100.0 * l.drop_fraction, 2) + " %", fmtFixed(l.last_imbalance, 2),
                        std::isfinite(l.dispatch_bytes) ? core::formatBytes(l.dispatch_bytes) : "-"});
      }
      html += "<h3>Mixture of experts</h3>\n" +
              htmlTable({"layer", "lines", "routed (assignments)", "dropped", "drop rate", "max/mean load (last step)",
                         "dispatch bytes"},
                        rows);
    }
    if (!run.events.empty()) {
      std::vector<std::vector<std::string>> rows;
      const double t0 = runStartTime(run);
      constexpr size_t kMaxRows = 200;
      for (size_t k = 0; k < run.events.size() && k < kMaxRows; ++k) {
        const auto& e = run.events[k];
        rows.push_back({e.event, e.step >= 0 ? std::to_string(e.step) : "-",
                        std::isfinite(e.time) ? fmtFixed(e.time - t0, 1) : "-", e.detail});
      }
      html += "<h3>Events</h3>\n" + htmlTable({"event", "step", "seconds", "detail"}, rows);
      if (run.events.size() > kMaxRows) {
        html += "<p>(" + std::to_string(run.events.size() - kMaxRows) + " more in metrics.jsonl)</p>\n";
      }
    }
  }
  html += "</body></html>\n";

  out.index_html = out.dir / "index.html";
  out.summary_txt = out.dir / "summary.txt";
  ARCH_RETURN_IF_ERROR(core::writeFile(out.index_html, html));
  ARCH_RETURN_IF_ERROR(core::writeFile(out.summary_txt, out.summary));
  return out;
}

}  // namespace archipelago::report
