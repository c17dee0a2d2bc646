#include "archipelago/core/config.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <yaml-cpp/yaml.h>

#include "archipelago/core/strings.h"
#include "archipelago/core/units.h"
#include "core/config_fields.h"
#include "core/yaml_file.h"

namespace archipelago::core {

using detail::FieldKind;
using detail::FieldRef;

// ---- ClusterSpec helpers --------------------------------------------------------

int64_t ClusterSpec::worldSize() const {
  // Saturates: counts come from files, and a sum that wrapped around would
  // pass for a small world in validation.
  int64_t n = 0;
  for (const auto& i : islands) {
    if (__builtin_add_overflow(n, i.count, &n)) return std::numeric_limits<int64_t>::max();
  }
  return n;
}

int ClusterSpec::islandIndex(const std::string& n) const {
  for (size_t i = 0; i < islands.size(); ++i) {
    if (islands[i].name == n) return static_cast<int>(i);
  }
  return -1;
}

const StraitSpec* ClusterSpec::strait(const std::string& x, const std::string& y) const {
  for (const auto& s : straits) {
    if ((s.a == x && s.b == y) || (s.a == y && s.b == x)) return &s;
  }
  return nullptr;
}

bool ClusterSpec::oneHost() const {
  auto canonical = [](const std::string& h) {
    return (h.empty() || h == "localhost" || h == "::1" || h.rfind("127.", 0) == 0) ? std::string("loopback") : h;
  };
  std::set<std::string> hosts;
  for (const auto& i : islands) hosts.insert(canonical(i.host));
  return hosts.size() <= 1;
}

bool ClusterSpec::emulated(const StraitSpec& s) const {
  return s.emulate == "true" || (s.emulate == "auto" && oneHost());
}

namespace {

std::string kindExpectation(const FieldRef& f) {
  switch (f.kind) {
    case FieldKind::kInt: return "an integer";
    case FieldKind::kUInt: return "a non-negative integer";
    case FieldKind::kDouble: return "a number";
    case FieldKind::kBool: return "true or false";
    case FieldKind::kString: return "a string";
    case FieldKind::kChoice: {
      std::string s = "one of ";
      for (size_t i = 0; i < f.choices.size(); ++i) s += (i ? "|" : "") + f.choices[i];
      return s;
    }
    case FieldKind::kBandwidth: return "a bandwidth such as '100Mbit/s' or '1Gbit/s'";
    case FieldKind::kDuration: return "a duration such as '20ms' or '1.5s'";
    case FieldKind::kBytes: return "a size such as '4MiB' or a byte count";
    case FieldKind::kIntList: return "a list of integers";
    case FieldKind::kDoubleList: return "a list of numbers";
    case FieldKind::kStringList: return "a list of strings";
  }
  return "a value";
}

Result<int64_t> parseInt(const std::string& t) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (t.empty() || ec != std::errc() || p != t.data() + t.size()) return invalidArgument("not an integer");
  return v;
}

Result<double> parseDouble(const std::string& t) {
  if (t.empty()) return invalidArgument("not a number");
  char* end = nullptr;
  double v = std::strtod(t.c_str(), &end);
  if (end != t.c_str() + t.size() || !std::isfinite(v)) return invalidArgument("not a finite number");
  return v;
}

// Parses one scalar (or a list given as items) into the field.
Status assignScalar(const FieldRef& f, const std::string& text) {
  switch (f.kind) {
    case FieldKind::kInt: {
      ARCH_ASSIGN_OR_RETURN(*static_cast<int64_t*>(f.ptr), parseInt(text));
      return okStatus();
    }
    case FieldKind::kUInt:
    case FieldKind::kBytes: {
      auto as_int = parseInt(text);
      if (as_int.isOk()) {
        if (*as_int < 0) return invalidArgument("negative");
        *static_cast<uint64_t*>(f.ptr) = static_cast<uint64_t>(*as_int);
        return okStatus();
      }
      if (f.kind == FieldKind::kUInt) return as_int.status();
      ARCH_ASSIGN_OR_RETURN(*static_cast<uint64_t*>(f.ptr), parseByteSize(text));
      return okStatus();
    }
    case FieldKind::kDouble: {
      ARCH_ASSIGN_OR_RETURN(*static_cast<double*>(f.ptr), parseDouble(text));
      return okStatus();
    }
    case FieldKind::kBool: {
      std::string t = text;
      std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
      if (t == "true" || t == "yes" || t == "on" || t == "1") *static_cast<bool*>(f.ptr) = true;
      else if (t == "false" || t == "no" || t == "off" || t == "0") *static_cast<bool*>(f.ptr) = false;
      else return invalidArgument("not a boolean");
      return okStatus();
    }
    case FieldKind::kString:
      *static_cast<std::string*>(f.ptr) = text;
      return okStatus();
    case FieldKind::kChoice:
      if (std::find(f.choices.begin(), f.choices.end(), text) == f.choices.end()) {
        return invalidArgument("not a known choice");
      }
      *static_cast<std::string*>(f.ptr) = text;
      return okStatus();
    case FieldKind::kBandwidth: {
      ARCH_ASSIGN_OR_RETURN(*static_cast<double*>(f.ptr), parseBandwidth(text));
      return okStatus();
    }
    case FieldKind::kDuration: {
      ARCH_ASSIGN_OR_RETURN(*static_cast<double*>(f.ptr), parseDuration(text));
      return okStatus();
    }
    case FieldKind::kIntList: {
      std::vector<int64_t> out;
      for (const auto& item : splitList(text)) {
        ARCH_ASSIGN_OR_RETURN(int64_t v, parseInt(item));
        out.push_back(v);
      }
      *static_cast<std::vector<int64_t>*>(f.ptr) = std::move(out);
      return okStatus();
    }
    case FieldKind::kDoubleList: {
      std::vector<double> out;
      for (const auto& item : splitList(text)) {
        ARCH_ASSIGN_OR_RETURN(double v, parseDouble(item));
        out.push_back(v);
      }
      *static_cast<std::vector<double>*>(f.ptr) = std::move(out);
      return okStatus();
    }
    case FieldKind::kStringList:
      *static_cast<std::vector<std::string>*>(f.ptr) = splitList(text);
      return okStatus();
  }
  return internalError("unhandled field kind");
}

bool isListKind(FieldKind k) {
  return k == FieldKind::kIntList || k == FieldKind::kDoubleList || k == FieldKind::kStringList;
}

// Values are written as text that reads back to exactly the same value
// (units.h *Exact): the stream default of 6 digits turned beta2 = 0.9999999
// into 1, so a resolved job in a run directory or checkpoint did not load.
std::string item(int64_t v) { return std::to_string(v); }
std::string item(double v) { return formatDoubleExact(v); }
std::string item(const std::string& v) { return v; }

template <typename T>
std::string bracketList(const std::vector<T>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + item(v[i]);
  return s + "]";
}

std::string formatValue(const FieldRef& f) {
  switch (f.kind) {
    case FieldKind::kInt: return std::to_string(*static_cast<int64_t*>(f.ptr));
    case FieldKind::kUInt:
    case FieldKind::kBytes: return std::to_string(*static_cast<uint64_t*>(f.ptr));
    case FieldKind::kDouble: return formatDoubleExact(*static_cast<double*>(f.ptr));
    case FieldKind::kBool: return *static_cast<bool*>(f.ptr) ? "true" : "false";
    case FieldKind::kString:
    case FieldKind::kChoice: return *static_cast<std::string*>(f.ptr);
    case FieldKind::kBandwidth: return formatBandwidthExact(*static_cast<double*>(f.ptr));
    case FieldKind::kDuration: return formatDurationExact(*static_cast<double*>(f.ptr));
    case FieldKind::kIntList: return bracketList(*static_cast<std::vector<int64_t>*>(f.ptr));
    case FieldKind::kDoubleList: return bracketList(*static_cast<std::vector<double>*>(f.ptr));
    case FieldKind::kStringList: return bracketList(*static_cast<std::vector<std::string>*>(f.ptr));
  }
  return "";
}

std::string joinPath(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// ---- YAML loading -------------------------------------------------------------

struct LoadState {
  std::vector<std::string> errors;
  std::map<std::string, ValueSource> sources;
};

std::string where(const std::string& file, const YAML::Node& n) {
  return file + ":" + std::to_string(n.Mark().line + 1);
}

std::string describeNode(const YAML::Node& n) {
  if (n.IsScalar()) return "'" + n.Scalar() + "'";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "null";
}


class YamlLoader {
 public:
  YamlLoader(YAML::Node node, std::string path, std::string file, LoadState* st)
      : node_(std::move(node)), path_(std::move(path)), file_(std::move(file)), st_(st) {}

  void field(const char* name, const FieldRef& f) {
    used_.insert(name);
    YAML::Node n = node_[name];
    if (!n.IsDefined() || n.IsNull()) return;
    std::string p = joinPath(path_, name);
    Status s;
    if (isListKind(f.kind)) {
      if (!n.IsSequence()) {
        error(p, n, describeNode(n), kindExpectation(f));
        return;
      }
      std::string joined;
      for (size_t i = 0; i < n.size(); ++i) {
        if (!n[i].IsScalar()) {
          error(p + "[" + std::to_string(i) + "]", n[i], describeNode(n[i]), "a scalar");
          return;
        }
        joined += (i ? "," : "") + n[i].Scalar();
      }
      s = assignScalar(f, joined);
    } else {
      if (!n.IsScalar()) {
        error(p, n, describeNode(n), kindExpectation(f));
        return;
      }
      s = assignScalar(f, n.Scalar());
    }
    if (!s.isOk()) {
      error(p, n, describeNode(n), kindExpectation(f));
      return;
    }
    st_->sources[p] = {"file", where(file_, n)};
  }

  template <typename S>
  void section(const char* name, S& s) {
    used_.insert(name);
    YAML::Node n = node_[name];
    if (!n.IsDefined() || n.IsNull()) return;
    std::string p = joinPath(path_, name);
    if constexpr (std::is_same_v<S, ClusterSpec>) {
      if (n.IsScalar()) {  // `cluster: clusters/x.yaml`, relative to this file
        loadClusterFile(n, p, s);
        return;
      }
    }
    if (!n.IsMap()) {
      error(p, n, describeNode(n), "a mapping");
      return;
    }
    YamlLoader child(n, p, file_, st_);
    detail::visitFields(child, s);
    child.checkUnknown();
  }

  template <typename S>
  void list(const char* name, std::vector<S>& v) {
    used_.insert(name);
    YAML::Node n = node_[name];
    if (!n.IsDefined() || n.IsNull()) return;
    std::string p = joinPath(path_, name);
    if (!n.IsSequence()) {
      error(p, n, describeNode(n), "a list of mappings");
      return;
    }
    v.assign(n.size(), S{});
    for (size_t i = 0; i < n.size(); ++i) {
      std::string pi = p + "[" + std::to_string(i) + "]";
      if (!n[i].IsMap()) {
        error(pi, n[i], describeNode(n[i]), "a mapping");
        continue;
      }
      YamlLoader child(n[i], pi, file_, st_);
      detail::visitFields(child, v[i]);
      child.checkUnknown();
    }
  }

  void checkUnknown() {
    for (auto it = node_.begin(); it != node_.end(); ++it) {
      // YAML allows a list or a mapping as a key (`? [a, b]: 1`), where
      // as<std::string>() throws; no field is named like that.
      if (!it->first.IsScalar()) {
        st_->errors.push_back(joinPath(path_, "?") + ": a key that is " + describeNode(it->first) + " (" +
                              where(file_, it->first) + "); keys are field names");
        continue;
      }
      std::string key = it->first.Scalar();
      if (used_.count(key)) continue;
      std::string expected;
      for (const auto& u : used_) expected += (expected.empty() ? "" : ", ") + u;
      st_->errors.push_back(joinPath(path_, key) + ": unknown key (" + where(file_, it->first) +
                            "); expected one of: " + expected);
    }
  }

 private:
  void loadClusterFile(const YAML::Node& n, const std::string& p, ClusterSpec& cluster) {
    std::filesystem::path file = n.Scalar();
    if (file.is_relative()) file = std::filesystem::path(file_).parent_path() / file;
    auto cnode = loadYamlFile(file.string());
    if (!cnode.isOk()) {
      st_->errors.push_back(p + ": " + cnode.status().message() + " (" + where(file_, n) + ")");
      return;
    }
    if (!cnode->IsMap()) {
      error(p, n, "a file that does not hold a mapping", "a cluster spec file with islands and straits");
      return;
    }
    YamlLoader child(*cnode, p, file.string(), st_);
    detail::visitFields(child, cluster);
    child.checkUnknown();
  }

  void error(const std::string& p, const YAML::Node& n, const std::string& got, const std::string& expected) {
    st_->errors.push_back(p + ": got " + got + " (" + where(file_, n) + "); expected " + expected);
  }

  YAML::Node node_;
  std::string path_;
  std::string file_;
  LoadState* st_;
  std::set<std::string> used_;
};

// Walks the declaration keeping the dotted path of the current field
// ("cluster.islands[1].count"); Derived supplies field(name, ref).
template <typename Derived>
class PathWalker {
 public:
  template <typename S>
  void section(const char* name, S& s) {
    std::string saved = path_;
    path_ = joinPath(path_, name);
    detail::visitFields(static_cast<Derived&>(*this), s);
    path_ = saved;
  }
  template <typename S>
  void list(const char* name, std::vector<S>& v) {
    std::string saved = path_;
    bool saved_in = in_list_;
    in_list_ = true;
    for (size_t i = 0; i < v.size(); ++i) {
      path_ = joinPath(saved, name) + "[" + std::to_string(i) + "]";
      detail::visitFields(static_cast<Derived&>(*this), v[i]);
    }
    path_ = saved;
    in_list_ = saved_in;
  }

 protected:
  std::string path_;
  bool in_list_ = false;  // inside a list of mappings (no env override there)
};

// ---- overrides (env, --set) ---------------------------------------------------------

class OverrideApplier : public PathWalker<OverrideApplier> {
 public:
  OverrideApplier(std::map<std::string, std::string> sets, const LoadOptions& opts, LoadState* st)
      : sets_(std::move(sets)), opts_(opts), st_(st) {}

  void field(const char* name, const FieldRef& f) {
    std::string p = joinPath(path_, name);
    if (!in_list_) {
      std::string var = envVarForPath(p);
      std::optional<std::string> val;
      if (auto it = opts_.env.find(var); it != opts_.env.end()) val = it->second;
      else if (opts_.use_process_env) {
        if (const char* e = std::getenv(var.c_str())) val = std::string(e);
      }
      if (val) apply(p, f, *val, {"env", var});
    }
    if (auto it = sets_.find(p); it != sets_.end()) {
      apply(p, f, it->second, {"flag", "--set " + p + "=" + it->second});
      sets_.erase(it);
    }
  }

  const std::map<std::string, std::string>& unusedSets() const { return sets_; }

 private:
  void apply(const std::string& p, const FieldRef& f, const std::string& text, ValueSource src) {
    Status s = assignScalar(f, text);
    if (!s.isOk()) {
      st_->errors.push_back(p + ": got '" + text + "' (" + src.kind + " " + src.detail + "); expected " +
                            kindExpectation(f));
      return;
    }
    st_->sources[p] = std::move(src);
  }

  std::map<std::string, std::string> sets_;
  const LoadOptions& opts_;
  LoadState* st_;
};

// ---- dumping -------------------------------------------------------------------------

class ValueCollector : public PathWalker<ValueCollector> {
 public:
  ValueCollector(const std::map<std::string, ValueSource>& sources, LoadedJob* out)
      : sources_(sources), out_(out) {}

  void field(const char* name, const FieldRef& f) {
    std::string p = joinPath(path_, name);
    ValueSource src{"default", ""};
    if (auto it = sources_.find(p); it != sources_.end()) src = it->second;
    out_->values.push_back({p, {formatValue(f), src}});
  }
 private:
  const std::map<std::string, ValueSource>& sources_;
  LoadedJob* out_;
};

class YamlWriter {
 public:
  explicit YamlWriter(YAML::Emitter& e) : e_(e) {}
  void field(const char* name, const FieldRef& f) {
    e_ << YAML::Key << name << YAML::Value;
    if (isListKind(f.kind)) {
      e_ << YAML::Flow << YAML::BeginSeq;
      for (const auto& item : splitList(formatValue(f))) e_ << item;
      e_ << YAML::EndSeq;
    } else if (f.kind == FieldKind::kString || f.kind == FieldKind::kChoice) {
      e_ << YAML::DoubleQuoted << formatValue(f);
    } else {
      e_ << formatValue(f);
    }
  }
  template <typename S>
  void section(const char* name, S& s) {
    e_ << YAML::Key << name << YAML::Value << YAML::BeginMap;
    detail::visitFields(*this, s);
    e_ << YAML::EndMap;
  }
  template <typename S>
  void list(const char* name, std::vector<S>& v) {
    e_ << YAML::Key << name << YAML::Value << YAML::BeginSeq;
    for (auto& item : v) {
      e_ << YAML::BeginMap;
      detail::visitFields(*this, item);
      e_ << YAML::EndMap;
    }
    e_ << YAML::EndSeq;
  }

 private:
  YAML::Emitter& e_;
};


}  // namespace

std::string envVarForPath(const std::string& path) {
  std::string v = "ARCHIPELAGO_";
  for (char c : path) v.push_back(c == '.' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  return v;
}

Result<ClusterSpec> loadClusterSpec(const std::string& path) {
  ARCH_ASSIGN_OR_RETURN(YAML::Node root, loadYamlFile(path));
  LoadState st;
  ClusterSpec c;
  if (!root.IsMap()) return invalidArgument("cluster spec '" + path + "' must hold a mapping");
  // A job file may stand in for a cluster spec: use its cluster section.
  if (!root["islands"].IsDefined() && root["cluster"].IsDefined()) {
    YamlLoader loader(root, "", path, &st);
    loader.section("cluster", c);
  } else {
    YamlLoader loader(root, "cluster", path, &st);
    detail::visitFields(loader, c);
    loader.checkUnknown();
  }
  ARCH_RETURN_IF_ERROR(errorsToStatus(st.errors, path));
  ARCH_RETURN_IF_ERROR(validateCluster(c));
  return c;
}

Result<LoadedJob> loadJob(const std::string& path, const LoadOptions& options) {
  ARCH_ASSIGN_OR_RETURN(YAML::Node root, loadYamlFile(path));
  if (!root.IsMap()) return invalidArgument("job file '" + path + "' must hold a mapping of sections");
  LoadedJob out;
  out.path = path;
  LoadState st;
  YamlLoader loader(root, "", path, &st);
  detail::visitFields(loader, out.job);
  loader.checkUnknown();

  std::map<std::string, std::string> sets;
  for (const auto& s : options.sets) {
    auto eq = s.find('=');
    if (eq == std::string::npos || eq == 0) {
      st.errors.push_back("--set '" + s + "': expected PATH=VALUE, e.g. train.lr=0.001");
      continue;
    }
    sets[trim(s.substr(0, eq))] = trim(s.substr(eq + 1));
  }
  OverrideApplier ov(sets, options, &st);
  detail::visitFields(ov, out.job);
  for (const auto& [p, v] : ov.unusedSets()) {
    st.errors.push_back("--set " + p + "=" + v + ": no such field (see `archipelago config dump` for the paths)");
  }
  ARCH_RETURN_IF_ERROR(errorsToStatus(st.errors, path));
  ARCH_RETURN_IF_ERROR(validateJob(out.job).withContext("invalid job '" + path + "'"));

  ValueCollector vc(st.sources, &out);
  detail::visitFields(vc, out.job);
  return out;
}

std::string dumpJobYaml(const JobConfig& job) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  YamlWriter w(e);
  detail::visitFields(w, const_cast<JobConfig&>(job));
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

// ---- validation ----------------------------------------------------------------------

namespace {

// Sums of counts read from a file saturate instead of wrapping around (a
// wrapped sum could match the expected total).
int64_t saturatingAdd(int64_t a, int64_t b) {
  int64_t r = 0;
  if (!__builtin_add_overflow(a, b, &r)) return r;
  return b > 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
}

struct Problems {
  std::vector<std::string> list;
  template <typename T>
  void add(const std::string& path, const T& got, const std::string& expected) {
    std::ostringstream o;
    o << path << ": got " << got << "; expected " << expected;
    list.push_back(o.str());
  }
  Status status() const {
    if (list.empty()) return okStatus();
    std::string msg = std::to_string(list.size()) + " invalid value" + (list.size() > 1 ? "s" : "") + ":";
    for (const auto& l : list) msg += "\n  " + l;
    return invalidArgument(msg);
  }
};

void checkCluster(const ClusterSpec& c, const std::string& pre, Problems& p) {
  if (c.islands.empty()) p.add(pre + ".islands", "an empty list", "at least one island");
  std::set<std::string> names;
  for (size_t i = 0; i < c.islands.size(); ++i) {
    const auto& is = c.islands[i];
    std::string ip = pre + ".islands[" + std::to_string(i) + "]";
    if (is.name.empty()) p.add(ip + ".name", "''", "a non-empty island name");
    else if (!names.insert(is.name).second) p.add(ip + ".name", "'" + is.name + "'", "a name not used by another island");
    if (is.count < 1) p.add(ip + ".count", is.count, "an integer >= 1");
    if (!(is.slowdown > 0)) p.add(ip + ".slowdown", is.slowdown, "a factor > 0 (1 = full speed)");
    if (!is.slowdowns.empty() && static_cast<int64_t>(is.slowdowns.size()) != is.count) {
      p.add(ip + ".slowdowns", std::to_string(is.slowdowns.size()) + " values",
            std::to_string(is.count) + " values (one per device) or none");
    }
    for (size_t k = 0; k < is.slowdowns.size(); ++k) {
      if (!(is.slowdowns[k] > 0)) p.add(ip + ".slowdowns[" + std::to_string(k) + "]", is.slowdowns[k], "a factor > 0");
    }
    if (is.torch_device.empty()) p.add(ip + ".torch_device", "''", "auto or a torch device (cpu, cuda, cuda:1, ...)");
    if (is.threads < 0) p.add(ip + ".threads", is.threads, "0 (train.threads_per_worker) or an integer >= 1");
    if (!(is.cpu_quota >= 0) || is.cpu_quota > 1024) p.add(ip + ".cpu_quota", is.cpu_quota, "0 (no cap) or a share of one core > 0, e.g. 0.5");
    if (is.devices_per_node < 1) p.add(ip + ".devices_per_node", is.devices_per_node, "an integer >= 1");
    if (is.node_bandwidth < 0) p.add(ip + ".node_bandwidth", formatBandwidth(is.node_bandwidth), "a bandwidth >= 0");
    if (is.fabric_bandwidth < 0) p.add(ip + ".fabric_bandwidth", formatBandwidth(is.fabric_bandwidth), "a bandwidth >= 0");
  }
  std::set<std::pair<std::string, std::string>> pairs;
  for (size_t i = 0; i < c.straits.size(); ++i) {
    const auto& s = c.straits[i];
    std::string sp = pre + ".straits[" + std::to_string(i) + "]";
    for (const auto& [field, name] : {std::pair{".a", s.a}, std::pair{".b", s.b}}) {
      if (c.islandIndex(name) < 0) {
        std::string known;
        for (const auto& is : c.islands) known += (known.empty() ? "" : ", ") + is.name;
        p.add(sp + field, "'" + name + "'", "the name of an island in the cluster (" + known + ")");
      }
    }
    if (s.a == s.b && !s.a.empty()) p.add(sp + ".b", "'" + s.b + "'", "an island other than a ('" + s.a + "')");
    if (!pairs.insert(std::minmax(s.a, s.b)).second) p.add(sp, s.a + "<->" + s.b, "one strait per island pair");
    if (!(s.bandwidth > 0)) p.add(sp + ".bandwidth", s.bandwidth < 0 ? "a negative bandwidth" : "0", "a bandwidth > 0 such as '1Gbit/s'");
    if (s.latency < 0) p.add(sp + ".latency", formatDuration(s.latency), "a duration >= 0");
    if (s.jitter < 0) p.add(sp + ".jitter", formatDuration(s.jitter), "a duration >= 0");
    if (s.loss < 0 || s.loss >= 1) p.add(sp + ".loss", s.loss, "a probability in [0, 1)");
  }
  if (c.default_strait_bandwidth < 0) p.add(pre + ".default_strait_bandwidth", "a negative bandwidth", "a bandwidth >= 0");
  if (c.default_strait_latency < 0) p.add(pre + ".default_strait_latency", formatDuration(c.default_strait_latency), "a duration >= 0");
}

}  // namespace

Status validateCluster(const ClusterSpec& cluster, const std::string& prefix) {
  Problems p;
  checkCluster(cluster, prefix, p);
  return p.status();
}

Status validateJob(const JobConfig& j) {
  Problems p;
  checkCluster(j.cluster, "cluster", p);
  const int64_t world = j.cluster.worldSize();

  const auto& m = j.model;
  if (m.vocab_size < 0) p.add("model.vocab_size", m.vocab_size, "0 (from data) or a positive size");
  if (m.dim < 1) p.add("model.dim", m.dim, "an integer >= 1");
  if (m.n_layers < 1) p.add("model.n_layers", m.n_layers, "an integer >= 1");
  if (m.n_heads < 1) p.add("model.n_heads", m.n_heads, "an integer >= 1");
  else if (m.dim % m.n_heads != 0) p.add("model.n_heads", m.n_heads, "a divisor of model.dim (" + std::to_string(m.dim) + ")");
  else if ((m.dim / m.n_heads) % 2 != 0) p.add("model.n_heads", m.n_heads, "a value giving an even head size (rotary embeddings)");
  if (m.n_kv_heads < 0 || (m.n_kv_heads > 0 && m.n_heads > 0 && m.n_heads % m.n_kv_heads != 0)) {
    p.add("model.n_kv_heads", m.n_kv_heads, "0 or a divisor of model.n_heads (" + std::to_string(m.n_heads) + ")");
  }
  if (m.ffn_hidden < 0) p.add("model.ffn_hidden", m.ffn_hidden, "0 (default) or a positive size");
  if (m.max_seq_len < j.data.seq_len) {
    p.add("model.max_seq_len", m.max_seq_len, "at least data.seq_len (" + std::to_string(j.data.seq_len) + ")");
  }
  if (!(m.rope_theta > 0)) p.add("model.rope_theta", m.rope_theta, "a number > 0");
  if (!(m.norm_eps > 0)) p.add("model.norm_eps", m.norm_eps, "a number > 0");
  if (!(m.init_std > 0)) p.add("model.init_std", m.init_std, "a number > 0");
  const auto& moe = m.moe;
  if (moe.num_experts < 0) p.add("model.moe.num_experts", moe.num_experts, "0 (dense) or a positive count");
  if (moe.num_experts > 0) {
    if (moe.top_k < 1 || moe.top_k > moe.num_experts) {
      p.add("model.moe.top_k", moe.top_k, "between 1 and model.moe.num_experts (" + std::to_string(moe.num_experts) + ")");
    }
    if (moe.every < 1) p.add("model.moe.every", moe.every, "an integer >= 1");
    if (moe.expert_hidden < 0) p.add("model.moe.expert_hidden", moe.expert_hidden, "0 or a positive size");
    if (moe.capacity_factor < 0) p.add("model.moe.capacity_factor", moe.capacity_factor, "0 (unlimited) or > 0");
    if (moe.aux_loss_coef < 0) p.add("model.moe.aux_loss_coef", moe.aux_loss_coef, "a number >= 0");
  }

  const auto& d = j.data;
  if (d.dir.empty()) p.add("data.dir", "''", "a directory path");
  if (d.seq_len < 1) p.add("data.seq_len", d.seq_len, "an integer >= 1");
  if (d.val_fraction < 0 || d.val_fraction >= 1) p.add("data.val_fraction", d.val_fraction, "a fraction in [0, 1)");
  if (d.tokenizer == "spm" && d.vocab < 2) p.add("data.vocab", d.vocab, "a SentencePiece vocabulary size such as 4000");

  const auto& t = j.train;
  if (t.steps < 1) p.add("train.steps", t.steps, "an integer >= 1");
  if (t.global_batch < 1) p.add("train.global_batch", t.global_batch, "an integer >= 1");
  else if (const int64_t replicas = j.strategy.pipeline_stages > 1 ? world / j.strategy.pipeline_stages : world;
           world > 0 && t.global_batch < replicas) {
    p.add("train.global_batch", t.global_batch,
          "at least " + std::to_string(replicas) + " so that every one of the " + std::to_string(replicas) +
              (replicas == world ? " workers" : " pipelines") + " gets >= 1 sample per step");
  }
  if (t.micro_batch < 0) p.add("train.micro_batch", t.micro_batch, "0 (whole share) or a positive size");
  if (!(t.lr > 0)) p.add("train.lr", t.lr, "a learning rate > 0");
  if (t.min_lr < 0 || t.min_lr > t.lr) p.add("train.min_lr", t.min_lr, "a value in [0, train.lr]");
  if (t.warmup_steps < 0) p.add("train.warmup_steps", t.warmup_steps, "an integer >= 0");
  if (t.weight_decay < 0) p.add("train.weight_decay", t.weight_decay, "a number >= 0");
  if (t.beta1 < 0 || t.beta1 >= 1) p.add("train.beta1", t.beta1, "a number in [0, 1)");
  if (t.beta2 < 0 || t.beta2 >= 1) p.add("train.beta2", t.beta2, "a number in [0, 1)");
  if (!(t.adam_eps > 0)) p.add("train.adam_eps", t.adam_eps, "a number > 0");
  if (t.grad_clip < 0) p.add("train.grad_clip", t.grad_clip, "0 (off) or a norm > 0");
  if (t.eval_every < 0) p.add("train.eval_every", t.eval_every, "0 (never) or a step count");
  if (t.eval_batches < 1) p.add("train.eval_batches", t.eval_batches, "an integer >= 1");
  if (t.log_every < 1) p.add("train.log_every", t.log_every, "an integer >= 1");
  if (t.threads_per_worker < 1) p.add("train.threads_per_worker", t.threads_per_worker, "an integer >= 1");
  if (!(t.loss_scale_init >= 1) || !std::isfinite(t.loss_scale_init)) {
    p.add("train.loss_scale_init", t.loss_scale_init, "a finite scale >= 1, e.g. 65536");
  }
  if (t.loss_scale_window < 1) p.add("train.loss_scale_window", t.loss_scale_window, "an integer >= 1");
  if (t.fp8_amax_history < 1) p.add("train.fp8_amax_history", t.fp8_amax_history, "an integer >= 1");
  if (!t.shares.empty()) {
    if (static_cast<int64_t>(t.shares.size()) != world) {
      p.add("train.shares", std::to_string(t.shares.size()) + " values", std::to_string(world) + " values (one per worker) or none");
    }
    for (size_t i = 0; i < t.shares.size(); ++i) {
      if (!(t.shares[i] > 0)) p.add("train.shares[" + std::to_string(i) + "]", t.shares[i], "a weight > 0");
    }
  }

  const auto& s = j.strategy;
  if (s.inner_steps < 1) p.add("strategy.inner_steps", s.inner_steps, "an integer >= 1");
  if (!(s.outer_lr > 0)) p.add("strategy.outer_lr", s.outer_lr, "a number > 0");
  if (s.outer_momentum < 0 || s.outer_momentum >= 1) p.add("strategy.outer_momentum", s.outer_momentum, "a number in [0, 1)");
  if (s.fragments < 1) p.add("strategy.fragments", s.fragments, "an integer >= 1");
  if (s.overlap_steps < 0) p.add("strategy.overlap_steps", s.overlap_steps, "an integer >= 0");
  if (s.streams < 1 || s.streams > 64) p.add("strategy.streams", s.streams, "an integer in [1, 64]");
  if (s.bucket_bytes < 1024) p.add("strategy.bucket_bytes", s.bucket_bytes, "at least 1KiB");
  if (s.pipeline_stages < 1 || (m.n_layers >= 1 && s.pipeline_stages > m.n_layers)) {
    p.add("strategy.pipeline_stages", s.pipeline_stages, "between 1 and model.n_layers (" + std::to_string(m.n_layers) + ")");
  }
  if (s.expert_parallel < 1) p.add("strategy.expert_parallel", s.expert_parallel, "an integer >= 1");
  if (!s.stage_layers.empty()) {
    int64_t sum = 0;
    bool positive = true;
    for (auto l : s.stage_layers) {
      sum = saturatingAdd(sum, l);
      positive = positive && l >= 1;
    }
    if (static_cast<int64_t>(s.stage_layers.size()) != s.pipeline_stages || sum != m.n_layers || !positive) {
      p.add("strategy.stage_layers", std::to_string(s.stage_layers.size()) + " stages summing to " + std::to_string(sum),
            std::to_string(s.pipeline_stages) + " positive values (one per stage) summing to model.n_layers (" +
                std::to_string(m.n_layers) + ")");
    }
  }
  // Pipeline / expert parallelism (runtime/parallel_trainer.cpp).
  if (s.pipeline_stages > 1) {
    if (world > 0 && world % s.pipeline_stages != 0) {
      p.add("strategy.pipeline_stages", s.pipeline_stages,
            "a divisor of the number of workers (" + std::to_string(world) + "): every pipeline has that many stages");
    }
    if (m.tie_embeddings) {
      p.add("model.tie_embeddings", "true", "false with strategy.pipeline_stages > 1 (embedding and LM head sit on different stages)");
    }
  }
  if (s.expert_parallel > 1) {
    if (moe.num_experts < s.expert_parallel) {
      p.add("strategy.expert_parallel", s.expert_parallel,
            "at most model.moe.num_experts (" + std::to_string(moe.num_experts) + "): every member holds >= 1 expert");
    }
    // Overflow-checked: 2^32 x 2^32 wrapped to 0 and the modulo raised SIGFPE.
    int64_t members = 0;
    const bool too_many = __builtin_mul_overflow(s.expert_parallel, s.pipeline_stages, &members);
    if (world > 0 && s.pipeline_stages >= 1 && (too_many || world % members != 0)) {
      p.add("strategy.expert_parallel", s.expert_parallel,
            s.pipeline_stages > 1 ? "a divisor of the number of pipelines (workers / strategy.pipeline_stages = " +
                                        std::to_string(world / s.pipeline_stages) + ")"
                                  : "a divisor of the number of workers (" + std::to_string(world) + ")");
    }
  }
  if (!s.expert_counts.empty()) {
    int64_t sum = 0;
    bool positive = true;
    for (auto c : s.expert_counts) {
      sum = saturatingAdd(sum, c);
      positive = positive && c >= 1;
    }
    if (static_cast<int64_t>(s.expert_counts.size()) != s.expert_parallel || sum != moe.num_experts || !positive) {
      p.add("strategy.expert_counts", std::to_string(s.expert_counts.size()) + " members summing to " + std::to_string(sum),
            std::to_string(s.expert_parallel) + " positive values (one per strategy.expert_parallel member) summing to "
            "model.moe.num_experts (" + std::to_string(moe.num_experts) + ")");
    }
  }
  if (t.zero < 0 || t.zero > 3) p.add("train.zero", t.zero, "0 (none), 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)");
  if (s.tensor_parallel < 1) p.add("strategy.tensor_parallel", s.tensor_parallel, "an integer >= 1");
  // Not executed by the runtime yet (issue 20 in progress): refused rather than ignored.
  if (t.zero >= 3) p.add("train.zero", t.zero, "0, 1 or 2 (ZeRO-3 is not built yet)");
  // ZeRO-2 reduce-scatters gradients over the flat ring, uncompressed: a
  // strait codec would silently not apply.
  if (t.zero == 2 && s.kind == "sync" && s.codec != "none") {
    p.add("train.zero", t.zero, "0 or 1 with strategy.codec " + s.codec +
                                    " (ZeRO-2's gradient reduce-scatter is uncompressed), or strategy.codec: none");
  }
  if (s.tensor_parallel > 1) p.add("strategy.tensor_parallel", s.tensor_parallel, "1 (tensor parallelism is not built yet)");
  if (s.sequence_parallel) p.add("strategy.sequence_parallel", "true", "false (sequence parallelism is not built yet)");
  if ((s.pipeline_stages > 1 || s.expert_parallel > 1) && zeroStage(t) >= 1) {
    p.add("train.zero", zeroStage(t), "0 with strategy.pipeline_stages or strategy.expert_parallel > 1");
  }
  if (!(s.failure_timeout > 0)) p.add("strategy.failure_timeout", formatDuration(s.failure_timeout), "a duration > 0");
  if (s.min_workers < 1 || (world > 0 && s.min_workers > world)) {
    p.add("strategy.min_workers", s.min_workers, "between 1 and the number of workers (" + std::to_string(world) + ")");
  }

  const auto& c = j.checkpoint;
  if (c.every < 0) p.add("checkpoint.every", c.every, "0 (only at exit) or a step count");
  if (c.keep_last < 1) p.add("checkpoint.keep_last", c.keep_last, "an integer >= 1");
  if (j.run_dir.empty()) p.add("run_dir", "''", "a directory path");
  return p.status();
}

}  // namespace archipelago::core
