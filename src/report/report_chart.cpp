// SVG chart writer for run reports (see report_chart.h). Plain string
// building: the output must be self-contained and stable enough to test.
#include "archipelago/report/report_chart.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <string>

namespace archipelago::report::chart {
namespace {

// Tableau-10-like palette: distinguishable, prints well.
const std::vector<std::string>& palette() {
  static const std::vector<std::string> p = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                             "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return p;
}

std::string num(double v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  std::string s = buf;
  if (s == "-0.0") s = "0.0";
  return s;
}

std::string truncateLabel(const std::string& s, size_t max_chars) {
  if (s.size() <= max_chars) return s;
  return s.substr(0, max_chars - 3) + "...";
}

// Pixel geometry of the plot area inside the SVG.
struct Frame {
  double left, right, top, bottom;  // pixel edges of the plot area
  double x0, x1, y0, y1;            // data range mapped onto it
  double px(double x) const { return left + (x - x0) / (x1 - x0) * (right - left); }
  double py(double y) const { return bottom - (y - y0) / (y1 - y0) * (bottom - top); }
};

struct LegendEntry {
  std::string name;
  std::string color;
  enum Kind { kLine, kDashed, kDot, kBox, kVLine } kind;
};

void openSvg(std::string& out, int width, int height, const std::string& title) {
  out += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + std::to_string(width) + "\" height=\"" +
         std::to_string(height) + "\" viewBox=\"0 0 " + std::to_string(width) + " " + std::to_string(height) +
         "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  out += "<title>" + escapeXml(title) + "</title>\n";
  out += "<rect x=\"0\" y=\"0\" width=\"" + std::to_string(width) + "\" height=\"" + std::to_string(height) +
         "\" fill=\"white\"/>\n";
  out += "<text x=\"" + num(width / 2.0) + "\" y=\"20\" font-size=\"14\" font-weight=\"bold\" text-anchor=\"middle\">" +
         escapeXml(title) + "</text>\n";
}

// Grid lines, tick labels, frame and axis labels. x ticks are skipped when
// x_ticks is null (bar charts label categories instead).
void drawAxes(std::string& out, const Frame& f, const Ticks* x_ticks, const Ticks& y_ticks, const std::string& x_label,
              const std::string& y_label, int height) {
  out += "<g class=\"grid\" stroke=\"#e0e0e0\" stroke-width=\"1\">\n";
  for (double v : y_ticks.values) {
    out += "<line x1=\"" + num(f.left) + "\" x2=\"" + num(f.right) + "\" y1=\"" + num(f.py(v)) + "\" y2=\"" +
           num(f.py(v)) + "\"/>\n";
  }
  if (x_ticks) {
    for (double v : x_ticks->values) {
      out += "<line x1=\"" + num(f.px(v)) + "\" x2=\"" + num(f.px(v)) + "\" y1=\"" + num(f.top) + "\" y2=\"" +
             num(f.bottom) + "\"/>\n";
    }
  }
  out += "</g>\n";
  out += "<g class=\"yticks\" text-anchor=\"end\" fill=\"#333\">\n";
  for (double v : y_ticks.values) {
    out += "<text class=\"ytick\" x=\"" + num(f.left - 6) + "\" y=\"" + num(f.py(v) + 4) + "\">" +
           escapeXml(formatTick(v, y_ticks.step)) + "</text>\n";
  }
  out += "</g>\n";
  if (x_ticks) {
    out += "<g class=\"xticks\" text-anchor=\"middle\" fill=\"#333\">\n";
    for (double v : x_ticks->values) {
      out += "<text class=\"xtick\" x=\"" + num(f.px(v)) + "\" y=\"" + num(f.bottom + 16) + "\">" +
             escapeXml(formatTick(v, x_ticks->step)) + "</text>\n";
    }
    out += "</g>\n";
  }
  out += "<rect x=\"" + num(f.left) + "\" y=\"" + num(f.top) + "\" width=\"" + num(f.right - f.left) + "\" height=\"" +
         num(f.bottom - f.top) + "\" fill=\"none\" stroke=\"#666\"/>\n";
  if (!x_label.empty()) {
    out += "<text x=\"" + num((f.left + f.right) / 2) + "\" y=\"" + num(height - 10.0) +
           "\" text-anchor=\"middle\">" + escapeXml(x_label) + "</text>\n";
  }
  if (!y_label.empty()) {
    double cy = (f.top + f.bottom) / 2;
    out += "<text x=\"16\" y=\"" + num(cy) + "\" text-anchor=\"middle\" transform=\"rotate(-90 16 " + num(cy) +
           ")\">" + escapeXml(y_label) + "</text>\n";
  }
}

void drawLegend(std::string& out, const std::vector<LegendEntry>& entries, double x, double top) {
  if (entries.empty()) return;
  out += "<g class=\"legend\">\n";
  double y = top + 8;
  for (const auto& e : entries) {
    const std::string c = escapeXml(e.color);
    switch (e.kind) {
      case LegendEntry::kLine:
      case LegendEntry::kDashed:
        out += "<line x1=\"" + num(x) + "\" x2=\"" + num(x + 18) + "\" y1=\"" + num(y) + "\" y2=\"" + num(y) +
               "\" stroke=\"" + c + "\" stroke-width=\"2\"" +
               (e.kind == LegendEntry::kDashed ? " stroke-dasharray=\"5,3\"" : "") + "/>\n";
        break;
      case LegendEntry::kDot:
        out += "<circle cx=\"" + num(x + 9) + "\" cy=\"" + num(y) + "\" r=\"3.5\" fill=\"" + c + "\"/>\n";
        break;
      case LegendEntry::kBox:
        out += "<rect x=\"" + num(x + 3) + "\" y=\"" + num(y - 5) + "\" width=\"12\" height=\"10\" fill=\"" + c +
               "\"/>\n";
        break;
      case LegendEntry::kVLine:
        out += "<line x1=\"" + num(x + 9) + "\" x2=\"" + num(x + 9) + "\" y1=\"" + num(y - 6) + "\" y2=\"" +
               num(y + 6) + "\" stroke=\"" + c + "\" stroke-width=\"2\" stroke-dasharray=\"3,2\"/>\n";
        break;
    }
    out += "<text class=\"legend-entry\" x=\"" + num(x + 24) + "\" y=\"" + num(y + 4) + "\">" +
           escapeXml(truncateLabel(e.name, 26)) + "</text>\n";
    y += 16;
  }
  out += "</g>\n";
}

constexpr double kLegendWidth = 190;

}  // namespace

std::string escapeXml(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // XML 1.0 allows only tab, LF and CR below 0x20.
        if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') break;
        out += ch;
    }
  }
  return out;
}

Ticks niceTicks(double lo, double hi, int target) {
  if (!std::isfinite(lo) || !std::isfinite(hi)) {
    lo = 0;
    hi = 1;
  }
  if (lo > hi) std::swap(lo, hi);
  if (lo == hi) {
    if (lo == 0) {
      hi = 1;  // all-zero data: a [0, 1] axis
    } else {
      const double pad = std::abs(lo) * 0.1;
      lo -= pad;
      hi += pad;
    }
  }
  target = std::max(target, 2);
  const double raw = (hi - lo) / (target - 1);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag;
  double nice = 10;
  for (double c : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    if (norm <= c * (1 + 1e-9)) {
      nice = c;
      break;
    }
  }
  Ticks t;
  t.step = nice * mag;
  // Integer multiples of step: exact "nice" values, no accumulated drift.
  const double k0 = std::floor(lo / t.step + 1e-9);
  const double k1 = std::ceil(hi / t.step - 1e-9);
  for (double k = k0; k <= k1 && t.values.size() < 1000; k += 1) {
    double v = k * t.step;
    if (v == 0) v = 0;  // no "-0"
    t.values.push_back(v);
  }
  return t;
}

std::string formatTick(double value, double step) {
  char buf[64];
  const double a = std::abs(value);
  if (a != 0 && (a >= 1e7 || std::abs(step) < 1e-5)) {
    std::snprintf(buf, sizeof buf, "%.3g", value);
    return buf;
  }
  int decimals = 0;
  const double s = std::abs(step);
  while (decimals < 8) {
    const double scaled = s * std::pow(10.0, decimals);
    if (std::abs(scaled - std::round(scaled)) < 1e-6 * std::max(1.0, scaled)) break;
    ++decimals;
  }
  std::snprintf(buf, sizeof buf, "%.*f", decimals, value);
  std::string out = buf;
  if (out.find_first_not_of("-0.") == std::string::npos && out[0] == '-') out.erase(0, 1);
  return out;
}

const std::string& paletteColor(size_t i) { return palette()[i % palette().size()]; }

std::string renderLineChart(const LineChart& chart) {
  // Data range over every finite point and every marker.
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin;
  double ymin = xmin, ymax = -xmin;
  for (const auto& s : chart.series) {
    const size_t n = std::min(s.x.size(), s.y.size());
    for (size_t i = 0; i < n; ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      xmin = std::min(xmin, s.x[i]);
      xmax = std::max(xmax, s.x[i]);
      ymin = std::min(ymin, s.y[i]);
      ymax = std::max(ymax, s.y[i]);
    }
  }
  for (const auto& m : chart.markers) {
    if (!std::isfinite(m.x)) continue;
    xmin = std::min(xmin, m.x);
    xmax = std::max(xmax, m.x);
  }
  if (!std::isfinite(xmin)) {
    xmin = 0;
    xmax = 1;
  }
  if (!std::isfinite(ymin)) {
    ymin = 0;
    ymax = 1;
  }
  if (chart.y_from_zero) {
    ymin = std::min(ymin, 0.0);
    ymax = std::max(ymax, 0.0);
  }
  const Ticks xt = niceTicks(xmin, xmax, 8);
  const Ticks yt = niceTicks(ymin, ymax, 6);

  std::vector<LegendEntry> legend;
  for (size_t i = 0; i < chart.series.size(); ++i) {
    const auto& s = chart.series[i];
    if (s.name.empty()) continue;
    const std::string color = s.color.empty() ? paletteColor(i) : s.color;
    legend.push_back({s.name, color,
                      s.line ? (s.dashed ? LegendEntry::kDashed : LegendEntry::kLine) : LegendEntry::kDot});
  }
  std::map<std::string, std::string> group_color;
  for (const auto& m : chart.markers) {
    if (group_color.count(m.group)) continue;
    // Marker colours start at the end of the palette to differ from series.
    std::string c = m.color.empty() ? paletteColor(palette().size() - 1 - group_color.size()) : m.color;
    group_color[m.group] = c;
    legend.push_back({m.group, c, LegendEntry::kVLine});
  }

  const double right_pad = legend.empty() ? 24 : kLegendWidth;
  Frame f{72, chart.width - right_pad, 36, chart.height - 48.0, xt.values.front(), xt.values.back(),
          yt.values.front(), yt.values.back()};

  std::string out;
  openSvg(out, chart.width, chart.height, chart.title);
  drawAxes(out, f, &xt, yt, chart.x_label, chart.y_label, chart.height);

  for (size_t i = 0; i < chart.series.size(); ++i) {
    const auto& s = chart.series[i];
    const std::string color = escapeXml(s.color.empty() ? paletteColor(i) : s.color);
    const size_t n = std::min(s.x.size(), s.y.size());
    // A point with a finite x and a non-finite y breaks the line (a worker
    // that was gone); each unbroken run becomes one polyline.
    std::string pts;
    size_t count = 0, run_points = 0;
    auto flush = [&] {
      if (s.line && run_points > 0) {
        out += "<polyline class=\"series\" data-series=\"" + escapeXml(s.name) + "\" fill=\"none\" stroke=\"" +
               color + "\" stroke-width=\"1.8\" stroke-linejoin=\"round\"" +
               (s.dashed ? " stroke-dasharray=\"5,3\"" : "") + " points=\"" + pts + "\"/>\n";
      }
      pts.clear();
      run_points = 0;
    };
    for (size_t k = 0; k < n; ++k) {
      if (!std::isfinite(s.x[k])) continue;
      if (!std::isfinite(s.y[k])) {
        flush();
        continue;
      }
      if (run_points++) pts += ' ';
      pts += num(f.px(s.x[k])) + "," + num(f.py(s.y[k]));
      ++count;
    }
    flush();
    if (s.markers && count > 0) {
      out += "<g class=\"markers\" data-series=\"" + escapeXml(s.name) + "\" fill=\"" + color + "\">\n";
      const bool tooltips = count <= 300;
      for (size_t k = 0; k < n; ++k) {
        if (!std::isfinite(s.x[k]) || !std::isfinite(s.y[k])) continue;
        out += "<circle cx=\"" + num(f.px(s.x[k])) + "\" cy=\"" + num(f.py(s.y[k])) + "\" r=\"3\"";
        if (tooltips) {
          out += "><title>" + escapeXml(s.name) + ": (" + formatTick(s.x[k], xt.step / 100) + ", " +
                 formatTick(s.y[k], yt.step / 1000) + ")</title></circle>\n";
        } else {
          out += "/>\n";
        }
      }
      out += "</g>\n";
    }
  }

  if (!chart.markers.empty()) {
    out += "<g class=\"vmarkers\" stroke-width=\"1.2\" stroke-dasharray=\"3,2\">\n";
    for (const auto& m : chart.markers) {
      if (!std::isfinite(m.x)) continue;
      const std::string c = escapeXml(group_color[m.group]);
      const double x = f.px(m.x);
      out += "<line class=\"event\" data-group=\"" + escapeXml(m.group) + "\" x1=\"" + num(x) + "\" x2=\"" + num(x) +
             "\" y1=\"" + num(f.top) + "\" y2=\"" + num(f.bottom) + "\" stroke=\"" + c + "\"><title>" +
             escapeXml(m.label.empty() ? m.group : m.label) + "</title></line>\n";
      out += "<path d=\"M" + num(x - 4) + "," + num(f.top) + " L" + num(x + 4) + "," + num(f.top) + " L" + num(x) +
             "," + num(f.top + 7) + " Z\" fill=\"" + c + "\" stroke=\"none\"/>\n";
    }
    out += "</g>\n";
  }

  drawLegend(out, legend, f.right + 14, f.top);
  out += "</svg>\n";
  return out;
}

std::string renderStackedBarChart(const StackedBarChart& chart) {
  const size_t n = chart.categories.size();
  double ymax = 0;
  for (size_t i = 0; i < n; ++i) {
    double total = 0;
    for (const auto& seg : chart.segments) {
      if (i < seg.values.size() && std::isfinite(seg.values[i]) && seg.values[i] > 0) total += seg.values[i];
    }
    ymax = std::max(ymax, total);
  }
  const Ticks yt = niceTicks(0, ymax > 0 ? ymax : 1, 6);

  std::vector<LegendEntry> legend;
  for (size_t s = 0; s < chart.segments.size(); ++s) {
    const auto& seg = chart.segments[s];
    legend.push_back({seg.name, seg.color.empty() ? paletteColor(s) : seg.color, LegendEntry::kBox});
  }
  const bool rotate = n > 10;
  const double bottom_pad = rotate ? 90 : 48;
  Frame f{72, chart.width - (legend.empty() ? 24 : kLegendWidth), 36, chart.height - bottom_pad, 0, 1,
          yt.values.front(), yt.values.back()};

  std::string out;
  openSvg(out, chart.width, chart.height, chart.title);
  drawAxes(out, f, nullptr, yt, chart.x_label, chart.y_label, chart.height);

  const double slot = n ? (f.right - f.left) / static_cast<double>(n) : 0;
  const double bar_w = std::max(1.0, slot * 0.6);
  for (size_t i = 0; i < n; ++i) {
    const double cx = f.left + slot * (i + 0.5);
    double base = 0;
    for (size_t s = 0; s < chart.segments.size(); ++s) {
      const auto& seg = chart.segments[s];
      const double v = i < seg.values.size() && std::isfinite(seg.values[i]) && seg.values[i] > 0 ? seg.values[i] : 0;
      const double y_top = f.py(base + v), y_bot = f.py(base);
      out += "<rect class=\"bar\" data-segment=\"" + escapeXml(seg.name) + "\" x=\"" + num(cx - bar_w / 2) +
             "\" y=\"" + num(y_top) + "\" width=\"" + num(bar_w) + "\" height=\"" + num(y_bot - y_top) +
             "\" fill=\"" + escapeXml(seg.color.empty() ? paletteColor(s) : seg.color) + "\"><title>" +
             escapeXml(chart.categories[i] + " " + seg.name + ": " + formatTick(v, yt.step / 1000)) +
             "</title></rect>\n";
      base += v;
    }
    const std::string label = escapeXml(truncateLabel(chart.categories[i], 24));
    if (rotate) {
      const double ly = f.bottom + 12;
      out += "<text class=\"category\" x=\"" + num(cx) + "\" y=\"" + num(ly) + "\" text-anchor=\"end\" transform=\"rotate(-45 " +
             num(cx) + " " + num(ly) + ")\">" + label + "</text>\n";
    } else {
      out += "<text class=\"category\" x=\"" + num(cx) + "\" y=\"" + num(f.bottom + 16) +
             "\" text-anchor=\"middle\">" + label + "</text>\n";
    }
  }
  drawLegend(out, legend, f.right + 14, f.top);
  out += "</svg>\n";
  return out;
}

void downsample(std::vector<double>& x, std::vector<double>& y, size_t max_points) {
  const size_t n = std::min(x.size(), y.size());
  if (max_points == 0 || n <= max_points) return;
  std::vector<double> ox, oy;
  ox.reserve(max_points);
  oy.reserve(max_points);
  for (size_t b = 0; b < max_points; ++b) {
    const size_t lo = b * n / max_points, hi = (b + 1) * n / max_points;
    double sx = 0, sy = 0;
    size_t c = 0;
    for (size_t i = lo; i < hi; ++i) {
      if (!std::isfinite(x[i]) || !std::isfinite(y[i])) continue;
      sx += x[i];
      sy += y[i];
      ++c;
    }
    if (c == 0) {
      // A bucket of gaps stays a gap.
      if (hi > lo && !oy.empty() && std::isfinite(oy.back())) {
        ox.push_back(x[lo]);
        oy.push_back(std::numeric_limits<double>::quiet_NaN());
      }
      continue;
    }
    ox.push_back(sx / c);
    oy.push_back(sy / c);
  }
  x = std::move(ox);
  y = std::move(oy);
}

}  // namespace archipelago::report::chart
