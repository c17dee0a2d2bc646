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

}  // namespace archipelago::core
