#include "archipelago/core/units.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <utility>
#include <vector>

namespace archipelago::core {
namespace {

// Splits "12.5 Gbit/s" into (12.5, "Gbit/s").
Result<std::pair<double, std::string>> splitNumber(std::string_view text, std::string_view what) {
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  size_t start = i;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.' ||
                             text[i] == 'e' || text[i] == 'E' || text[i] == '-' || text[i] == '+')) {
    // Stop at an 'e' that is not followed by a digit or sign (unit letter).
    if ((text[i] == 'e' || text[i] == 'E') &&
        !(i + 1 < text.size() && (std::isdigit(static_cast<unsigned char>(text[i + 1])) ||
                                  text[i + 1] == '-' || text[i + 1] == '+'))) {
      break;
    }
    ++i;
  }
  double value = 0;
  auto num = text.substr(start, i - start);
  auto [ptr, ec] = std::from_chars(num.data(), num.data() + num.size(), value);
  if (num.empty() || ec != std::errc() || ptr != num.data() + num.size()) {
    return invalidArgument("'" + std::string(text) + "' is not a " + std::string(what));
  }
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  std::string unit(text.substr(i));
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.back()))) unit.pop_back();
  return std::make_pair(value, unit);
}

template <typename T>
Result<double> lookupUnit(std::string_view text, const std::vector<std::pair<const char*, T>>& units,
                          std::string_view what, std::string_view examples) {
  ARCH_ASSIGN_OR_RETURN(auto parts, splitNumber(text, what));
  for (const auto& [name, factor] : units) {
    if (parts.second != name) continue;
    // 1e308Gbit/s overflows to infinity, which no later check expects and
    // which prints as text that does not parse back.
    const double v = parts.first * static_cast<double>(factor);
    if (!std::isfinite(v)) {
      return invalidArgument("'" + std::string(text) + "' is too large; expected a finite " + std::string(what));
    }
    return v;
  }
  return invalidArgument("'" + std::string(text) + "' has " +
                         (parts.second.empty() ? std::string("no unit") : "unknown unit '" + parts.second + "'") +
                         "; expected a " + std::string(what) + " such as " + std::string(examples));
}

}  // namespace

Result<double> parseBandwidth(std::string_view text) {
  static const std::vector<std::pair<const char*, double>> kUnits = {
      {"bit/s", 1.0 / 8},  {"Kbit/s", 1e3 / 8}, {"Mbit/s", 1e6 / 8}, {"Gbit/s", 1e9 / 8},
      {"Tbit/s", 1e12 / 8}, {"bps", 1.0 / 8},   {"Kbps", 1e3 / 8},   {"Mbps", 1e6 / 8},
      {"Gbps", 1e9 / 8},   {"Tbps", 1e12 / 8},  {"B/s", 1.0},        {"KB/s", 1e3},
      {"MB/s", 1e6},       {"GB/s", 1e9},       {"TB/s", 1e12},      {"KiB/s", 1024.0},
      {"MiB/s", 1048576.0}, {"GiB/s", 1073741824.0}};
  return lookupUnit(text, kUnits, "bandwidth", "'100Mbit/s', '1Gbit/s' or '25GB/s'");
}

Result<double> parseDuration(std::string_view text) {
  static const std::vector<std::pair<const char*, double>> kUnits = {
      {"ns", 1e-9}, {"us", 1e-6}, {"ms", 1e-3}, {"s", 1.0}, {"min", 60.0}, {"h", 3600.0}};
  return lookupUnit(text, kUnits, "duration", "'20ms', '1.5s' or '250us'");
}

Result<uint64_t> parseByteSize(std::string_view text) {
  static const std::vector<std::pair<const char*, double>> kUnits = {
      {"B", 1.0},     {"KB", 1e3},          {"MB", 1e6},             {"GB", 1e9},
      {"TB", 1e12},   {"KiB", 1024.0},      {"MiB", 1048576.0},      {"GiB", 1073741824.0},
      {"TiB", 1099511627776.0}};
  ARCH_ASSIGN_OR_RETURN(double v, lookupUnit(text, kUnits, "size", "'4KiB', '64MB' or '1GiB'"));
  if (v < 0) return invalidArgument("'" + std::string(text) + "' is negative; expected a size >= 0");
  // llround of 2^63 or more is unspecified (x86 gives INT64_MIN, i.e. a
  // silent 8 EiB); sizes stay below 2^63 so they also print as an integer
  // that reads back.
  if (!(v < 9223372036854775808.0)) {
    return invalidArgument("'" + std::string(text) + "' is too large; expected a size below 8EiB (2^63 bytes)");
  }
  return static_cast<uint64_t>(std::llround(v));
}

std::string formatBandwidth(double bps) {
  double bits = bps * 8;
  char buf[64];
  if (bits >= 1e12) std::snprintf(buf, sizeof buf, "%.4gTbit/s", bits / 1e12);
  else if (bits >= 1e9) std::snprintf(buf, sizeof buf, "%.4gGbit/s", bits / 1e9);
  else if (bits >= 1e6) std::snprintf(buf, sizeof buf, "%.4gMbit/s", bits / 1e6);
  else if (bits >= 1e3) std::snprintf(buf, sizeof buf, "%.4gKbit/s", bits / 1e3);
  else std::snprintf(buf, sizeof buf, "%.4gbit/s", bits);
  return buf;
}

std::string formatDuration(double s) {
  char buf[64];
  if (s >= 1.0 || s == 0.0) std::snprintf(buf, sizeof buf, "%.4gs", s);
  else if (s >= 1e-3) std::snprintf(buf, sizeof buf, "%.4gms", s * 1e3);
  else if (s >= 1e-6) std::snprintf(buf, sizeof buf, "%.4gus", s * 1e6);
  else std::snprintf(buf, sizeof buf, "%.4gns", s * 1e9);
  return buf;
}

std::string formatBytes(double b) {
  char buf[64];
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (b >= 1024.0 && u < 5) {
    b /= 1024.0;
    ++u;
  }
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f%s" : "%.1f%s", b, units[u]);
  return buf;
}

std::string formatDoubleExact(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

std::string formatBandwidthExact(double v) {
  if (v == 0) return "0bit/s";
  std::string s = formatBandwidth(v);
  auto back = parseBandwidth(s);
  return back.isOk() && *back == v ? s : formatDoubleExact(v) + "B/s";
}

std::string formatDurationExact(double v) {
  std::string s = formatDuration(v);
  auto back = parseDuration(s);
  return back.isOk() && *back == v ? s : formatDoubleExact(v) + "s";
}

}  // namespace archipelago::core
