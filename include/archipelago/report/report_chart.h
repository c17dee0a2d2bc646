// A small SVG chart writer for run reports: line/marker series, vertical
// event markers and stacked bars, with "nice" axis ticks and a legend. It
// produces self-contained SVG text (no scripts, no external fonts) so that a
// report can be inlined into one HTML file and opened anywhere. Torch-free.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace archipelago::report::chart {

// Escapes &, <, >, " and ' for use in XML text and attribute values; drops
// control characters that XML 1.0 forbids.
std::string escapeXml(std::string_view text);

// Axis ticks: evenly spaced values step = {1, 2, 2.5, 5} x 10^k, the first
// <= lo and the last >= hi, about `target` of them. lo == hi and non-finite
// inputs give a small sensible range instead of failing.
struct Ticks {
  std::vector<double> values;
  double step = 1.0;
};
Ticks niceTicks(double lo, double hi, int target = 6);

// Formats a tick value with just enough decimals for `step` ("0.25", "1200",
// "1.5e+06" for very large or small magnitudes).
std::string formatTick(double value, double step);

// The i-th colour of the palette (cycles).
const std::string& paletteColor(size_t i);

// One series of (x, y) points. A point with a non-finite x is skipped; a
// finite x with a non-finite y breaks the line there (a gap, e.g. a worker
// that was down), which is drawn as several polylines of the same series.
struct Series {
  std::string name;
  std::vector<double> x;
  std::vector<double> y;
  bool line = true;      // draw a polyline
  bool markers = false;  // draw a circle at every point
  bool dashed = false;
  std::string color;     // empty: palette colour by series index
};

// A vertical marker across the plot at x (e.g. an event at a step). Markers
// of the same group share a colour and one legend entry; `label` becomes a
// hover tooltip.
struct VMarker {
  double x = 0;
  std::string group;
  std::string label;
  std::string color;  // empty: palette colour by group (the group's first marker decides)
};

struct LineChart {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<Series> series;
  std::vector<VMarker> markers;
  bool y_from_zero = false;  // include 0 in the y range
  int width = 760;
  int height = 380;
};

// Renders the chart as a standalone <svg> element. Every series' polyline
// carries data-series="<name>" so tools (and tests) can find it.
std::string renderLineChart(const LineChart& chart);

// Vertical stacked bars: one bar per category, one coloured segment per
// BarSegment (segment.values[i] belongs to categories[i]).
struct BarSegment {
  std::string name;
  std::vector<double> values;
  std::string color;  // empty: palette colour by segment index
};

struct StackedBarChart {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<std::string> categories;
  std::vector<BarSegment> segments;
  int width = 760;
  int height = 380;
};

std::string renderStackedBarChart(const StackedBarChart& chart);

// Reduces (x, y) to at most max_points points by averaging consecutive
// buckets (keeps long runs' SVGs small); returns the input when it is small
// enough or max_points == 0.
void downsample(std::vector<double>& x, std::vector<double>& y, size_t max_points);

}  // namespace archipelago::report::chart
