// The metrics.jsonl writer and reader (metrics.h): two walkers over each
// record's one field list.
#include "archipelago/report/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <utility>

#include <nlohmann/json.hpp>

#include "archipelago/core/clock.h"
#include "archipelago/core/log.h"

namespace archipelago::report {
namespace {

using nlohmann::json;
// Written lines keep the declaration order ("kind" first, then the key
// fields) for people reading the file.
using ojson = nlohmann::ordered_json;

// A whole number as JSON: counts are written as integers so that readers
// asking for an integer (`get<int64_t>()`) get one.
ojson countValue(double v) { return std::isfinite(v) ? ojson(static_cast<int64_t>(std::llround(v))) : ojson(nullptr); }

// Builds the JSON object of a record (metrics.h's field rules).
class Writer {
 public:
  static constexpr bool kWriting = true;
  explicit Writer(ojson& out) : out_(out) {}

  template <class T> void key(const char* name, const T& v) { out_[name] = v; }
  void key(const char* name, double v) { out_[name] = std::isfinite(v) ? ojson(v) : ojson(nullptr); }
  void keyCount(const char* name, const std::vector<double>& v) { out_[name] = counts(v); }

  void field(const char* name, int64_t v) { out_[name] = v; }
  void field(const char* name, int v) { out_[name] = v; }
  void field(const char* name, bool v) { out_[name] = v; }
  void field(const char* name, double v) {
    if (std::isfinite(v)) out_[name] = v;
  }
  void field(const char* name, const std::string& v) {
    if (!v.empty()) out_[name] = v;
  }
  template <class T> void field(const char* name, const std::vector<T>& v) {
    if (!v.empty()) out_[name] = v;
  }
  void field(const char* name, const std::optional<double>& v) {
    if (v) field(name, *v);
  }
  template <class T> void field(const char* name, const std::optional<T>& v) {
    if (v) out_[name] = *v;
  }

  void count(const char* name, double v) {
    if (std::isfinite(v)) out_[name] = countValue(v);
  }
  void count(const char* name, const std::optional<double>& v) {
    if (v) count(name, *v);
  }
  void count(const char* name, const std::vector<double>& v) {
    if (!v.empty()) out_[name] = counts(v);
  }

 private:
  static ojson counts(const std::vector<double>& v) {
    ojson a = ojson::array();
    for (double x : v) a.push_back(countValue(x));
    return a;
  }
  ojson& out_;
};

// An integer; an integral float (12.0) is accepted, anything else is not.
std::optional<int64_t> intOf(const json& v) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::abs(d) < 9e15) return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

// Fills a record from a JSON object; `ok` turns false when a key field is
// missing or of the wrong type. Unknown fields are never looked at.
class Reader {
 public:
  static constexpr bool kWriting = false;
  explicit Reader(const json& in) : in_(in) {}
  bool ok() const { return ok_; }

  void key(const char* name, int64_t& v) { ok_ = readInt(name, v) && ok_; }
  void key(const char* name, int& v) { ok_ = readInt(name, v) && ok_; }
  // A key number must be present; null (a diverged loss) reads as NaN.
  void key(const char* name, double& v) {
    const json* p = find(name);
    if (!p || !(p->is_number() || p->is_null())) ok_ = false;
    else v = p->is_number() ? p->get<double>() : kMissing;
  }
  void key(const char* name, std::string& v) {
    field(name, v);
    if (v.empty()) ok_ = false;
  }
  void key(const char* name, std::vector<double>& v) {
    const json* p = find(name);
    if (!p || !p->is_array()) ok_ = false;
    else field(name, v);
  }
  void keyCount(const char* name, std::vector<double>& v) { key(name, v); }

  void field(const char* name, int64_t& v) { (void)readInt(name, v); }
  void field(const char* name, int& v) { (void)readInt(name, v); }
  void field(const char* name, bool& v) {
    if (const json* p = find(name); p && p->is_boolean()) v = p->get<bool>();
  }
  void field(const char* name, double& v) {
    const json* p = find(name);
    v = p && p->is_number() ? p->get<double>() : kMissing;
  }
  void field(const char* name, std::string& v) {
    if (const json* p = find(name); p && p->is_string()) v = p->get<std::string>();
  }
  // Non-numbers in an array read as NaN.
  void field(const char* name, std::vector<double>& v) {
    v.clear();
    const json* p = find(name);
    if (!p || !p->is_array()) return;
    for (const auto& x : *p) v.push_back(x.is_number() ? x.get<double>() : kMissing);
  }
  void field(const char* name, std::vector<int64_t>& v) {
    std::vector<double> d;
    field(name, d);
    v.clear();
    for (double x : d) v.push_back(std::isfinite(x) ? static_cast<int64_t>(std::llround(x)) : 0);
  }
  void field(const char* name, std::optional<int64_t>& v) {
    if (const json* p = find(name)) v = intOf(*p);
  }
  void field(const char* name, std::optional<double>& v) {
    double d = kMissing;
    field(name, d);
    if (std::isfinite(d)) v = d;
  }
  void field(const char* name, std::optional<bool>& v) {
    if (const json* p = find(name); p && p->is_boolean()) v = p->get<bool>();
  }
  template <class T> void count(const char* name, T& v) { field(name, v); }

 private:
  const json* find(const char* name) const {
    auto it = in_.find(name);
    return it == in_.end() ? nullptr : &*it;
  }
  template <class I> bool readInt(const char* name, I& v) {
    const json* p = find(name);
    if (!p) return false;
    auto i = intOf(*p);
    if (!i) return false;
    v = static_cast<I>(*i);
    return true;
  }
  const json& in_;
  bool ok_ = true;
};

// Tolerance kept from the reader before the shared schema: what older runs
// wrote under another name or shape.
void normalise(MoeRecord& r, const json& j) {
  for (double& t : r.tokens_per_expert) {
    if (!std::isfinite(t)) t = 0;
  }
  if (std::isnan(r.capacity)) {  // pipeline/expert runs before the shared schema
    if (auto it = j.find("capacity_sum"); it != j.end() && it->is_number()) r.capacity = it->get<double>();
  }
}
void normalise(PipelineRecord& r, const json&) {
  if (r.stages <= 0) r.stages = static_cast<int>(r.busy_s.size());
}
template <class R> void normalise(R&, const json&) {}

template <class R> std::optional<MetricsRecord> readAs(const json& j) {
  R r;
  Reader reader(j);
  r.fields(reader);
  if (!reader.ok()) return std::nullopt;
  normalise(r, j);
  return MetricsRecord(std::move(r));
}

// Parses `j` as the alternative of MetricsRecord whose kKind is `kind`.
template <size_t... I>
ParsedMetricsLine readKind(const std::string& kind, const json& j, std::index_sequence<I...>) {
  ParsedMetricsLine out;
  out.status = ParsedMetricsLine::Status::kUnknownKind;
  out.kind = kind;
  auto tryOne = [&](auto tag) {
    using R = typename decltype(tag)::type;
    if (out.status != ParsedMetricsLine::Status::kUnknownKind || kind != R::kKind) return;
    out.record = readAs<R>(j);
    out.status = out.record ? ParsedMetricsLine::Status::kRecord : ParsedMetricsLine::Status::kMalformed;
  };
  (tryOne(std::type_identity<std::variant_alternative_t<I, MetricsRecord>>{}), ...);
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

}  // namespace

std::vector<std::string> metricsKinds() {
  std::vector<std::string> out;
  [&]<size_t... I>(std::index_sequence<I...>) {
    (out.push_back(std::variant_alternative_t<I, MetricsRecord>::kKind), ...);
  }(std::make_index_sequence<std::variant_size_v<MetricsRecord>>{});
  return out;
}

std::string formatMetricsLine(const MetricsRecord& record) {
  ojson j;
  std::visit(
      [&](const auto& r) {
        j["kind"] = std::decay_t<decltype(r)>::kKind;
        Writer w(j);
        // fields() is shared with the reader, hence non-const; the writer only reads.
        const_cast<std::decay_t<decltype(r)>&>(r).fields(w);
      },
      record);
  return j.dump();
}

ParsedMetricsLine parseMetricsRecord(std::string_view raw) {
  ParsedMetricsLine out;
  const std::string_view line = trim(raw);
  if (line.empty()) return out;
  out.status = ParsedMetricsLine::Status::kMalformed;
  const json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return out;
  const auto kind = j.find("kind");
  if (kind == j.end() || !kind->is_string()) return out;
  return readKind(kind->get<std::string>(), j, std::make_index_sequence<std::variant_size_v<MetricsRecord>>{});
}

MetricsSink::~MetricsSink() {
  if (fd_ >= 0) ::close(fd_);
}

core::Status MetricsSink::open(const std::string& path) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) return core::unavailable("cannot open metrics file '" + path + "': " + std::strerror(errno));
  return core::okStatus();
}

void MetricsSink::write(MetricsRecord record) {
  if (fd_ < 0) return;
  std::visit(
      [](auto& r) {
        if (std::isnan(r.time)) r.time = static_cast<double>(core::wallMicros()) / 1e6;
      },
      record);
  const std::string s = formatMetricsLine(record) + "\n";
  const ssize_t n = ::write(fd_, s.data(), s.size());
  if (n != static_cast<ssize_t>(s.size())) {
    ARCH_LOG_WARN("metrics line not fully written ({} of {} bytes): {}", n, s.size(), std::strerror(errno));
  }
}

}  // namespace archipelago::report
