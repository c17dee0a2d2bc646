#include "archipelago/plan/layout_spec.h"

#include <map>
#include <set>

#include <fmt/format.h>

#include "archipelago/core/strings.h"

namespace archipelago::plan {

namespace {

constexpr const char* kKeys = "islands, tp, pp, dp, ep, mb, vpp, schedule, recompute, zero, stages";

// "a+b+c" -> {"a", "b", "c"} (trimmed; empty items kept, so they are refused by name).
std::vector<std::string> plusList(const std::string& v) {
  std::vector<std::string> out;
  size_t b = 0;
  for (size_t e; (e = v.find('+', b)) != std::string::npos; b = e + 1) out.push_back(core::trim(v.substr(b, e - b)));
  out.push_back(core::trim(v.substr(b)));
  return out;
}

core::Result<int64_t> positive(const std::string& where, const std::string& v) {
  int64_t x = 0;
  size_t used = 0;
  try {
    x = std::stoll(v, &used);
  } catch (...) {
    used = 0;
  }
  if (used != v.size() || v.empty() || x < 1) return core::invalidArgument(where + ": '" + v + "' is not an integer >= 1");
  return x;
}

// "8" or "8+4" -> per island of the group (one value repeats).
core::Result<std::vector<int64_t>> perIsland(const std::string& where, const std::string& v, size_t islands) {
  std::vector<int64_t> out;
  for (const auto& part : plusList(v)) {
    ARCH_ASSIGN_OR_RETURN(int64_t x, positive(where, part));
    out.push_back(x);
  }
  if (out.size() == 1) out.assign(islands, out.front());
  if (out.size() != islands) {
    return core::invalidArgument(where + ": " + std::to_string(out.size()) + " values for " + std::to_string(islands) +
                                 " islands; give one value, or one per island joined by '+'");
  }
  return out;
}

core::Result<int> islandOf(const std::string& where, const std::string& name, const core::ClusterSpec& c) {
  const int i = c.islandIndex(name);
  if (i >= 0) return i;
  if (!name.empty() && name.size() < 6 && name.find_first_not_of("0123456789") == std::string::npos &&
      std::stoul(name) < c.islands.size()) {
    return static_cast<int>(std::stoul(name));  // an index
  }
  std::string known;
  for (const auto& is : c.islands) known += (known.empty() ? "" : ", ") + is.name;
  return core::invalidArgument(where + ": no island '" + name + "' (the cluster has " + known + ")");
}

// key=value pairs; a repeated or unknown key is an error.
core::Result<std::map<std::string, std::string>> pairsOf(const std::string& where, const std::string& spec) {
  static const std::set<std::string> keys = {"islands", "tp", "pp", "dp", "ep", "mb", "vpp",
                                             "schedule", "recompute", "zero", "stages"};
  std::map<std::string, std::string> out;
  for (const auto& kv : core::splitList(spec)) {
    const auto eq = kv.find('=');
    const std::string k = core::trim(kv.substr(0, eq));
    if (eq == std::string::npos || k.empty()) {
      return core::invalidArgument(where + ": '" + kv + "' is not key=value (keys: " + kKeys + ")");
    }
    if (!keys.count(k)) return core::invalidArgument(where + ": unknown key '" + k + "' (keys: " + kKeys + ")");
    if (!out.emplace(k, core::trim(kv.substr(eq + 1))).second) {
      return core::invalidArgument(where + ": key '" + k + "' is given twice");
    }
  }
  return out;
}

core::Status fill(const std::string& where, std::map<std::string, std::string>& kv, const core::ClusterSpec& c,
                  FixedLayout& L) {
  const size_t n = L.islands.size();
  const auto key = [&](const std::string& k) { return where + " " + k; };
  L.tp.assign(n, 1);
  L.pp.assign(n, 1);
  if (kv.count("tp")) {
    ARCH_ASSIGN_OR_RETURN(L.tp, perIsland(key("tp"), kv["tp"], n));
  }
  if (kv.count("pp")) {
    ARCH_ASSIGN_OR_RETURN(L.pp, perIsland(key("pp"), kv["pp"], n));
  }
  int64_t fits = INT64_MAX;
  for (size_t i = 0; i < n; ++i) {
    const auto& is = c.islands[static_cast<size_t>(L.islands[i])];
    fits = std::min(fits, is.count / (L.tp[i] * L.pp[i]));
    if (fits < 1) {
      return core::invalidArgument(fmt::format("{}: island '{}' has {} devices, fewer than tp x pp = {} x {}", where,
                                               is.name, is.count, L.tp[i], L.pp[i]));
    }
  }
  L.dp = fits;
  if (kv.count("dp")) {
    ARCH_ASSIGN_OR_RETURN(L.dp, positive(key("dp"), kv["dp"]));
  }
  if (L.dp > fits) {
    return core::invalidArgument(fmt::format("{} dp: {} replicas do not fit; at most {} with this tp and pp", where,
                                             L.dp, fits));
  }
  if (kv.count("ep")) {
    ARCH_ASSIGN_OR_RETURN(L.ep, positive(key("ep"), kv["ep"]));
  }
  if (kv.count("mb")) {
    ARCH_ASSIGN_OR_RETURN(L.micro_batch, positive(key("mb"), kv["mb"]));
  }
  if (kv.count("vpp")) {
    ARCH_ASSIGN_OR_RETURN(L.virtual_stages, positive(key("vpp"), kv["vpp"]));
  }
  if (kv.count("schedule")) {
    auto s = parseSchedule(kv["schedule"]);
    if (!s.isOk()) return s.status().withContext(key("schedule"));
    L.schedule = *s;
  } else if (L.virtual_stages > 1) {
    L.schedule = Schedule::kInterleaved;
  }
  if (kv.count("recompute")) {
    auto r = parseRecompute(kv["recompute"]);
    if (!r.isOk()) return r.status().withContext(key("recompute"));
    L.recompute = *r;
  }
  if (kv.count("zero")) {
    ARCH_ASSIGN_OR_RETURN(int64_t z, positive(key("zero"), kv["zero"]));
    if (z > 3) return core::invalidArgument(key("zero") + ": " + kv["zero"] + "; expected 1, 2 or 3");
    L.zero = static_cast<int>(z);
  }
  if (kv.count("stages")) {
    for (const auto& part : plusList(kv["stages"])) {
      ARCH_ASSIGN_OR_RETURN(int64_t x, positive(key("stages"), part));
      L.stage_items.push_back(x);
    }
  }
  return core::okStatus();
}

}  // namespace

core::Result<std::vector<FixedLayout>> parseLayouts(const std::vector<std::string>& specs,
                                                    const core::ClusterSpec& cluster) {
  if (specs.empty()) return core::invalidArgument("--layout: none given");
  std::vector<FixedLayout> out;
  std::set<int> used;
  for (size_t s = 0; s < specs.size(); ++s) {
    const std::string where = "--layout '" + specs[s] + "'";
    ARCH_ASSIGN_OR_RETURN(auto kv, pairsOf(where, specs[s]));
    std::vector<std::vector<int>> groups;
    if (kv.count("islands")) {
      std::vector<int> g;
      for (const auto& name : plusList(kv["islands"])) {
        ARCH_ASSIGN_OR_RETURN(int i, islandOf(where + " islands", name, cluster));
        if (!used.insert(i).second) {
          return core::invalidArgument(where + ": island '" + cluster.islands[static_cast<size_t>(i)].name +
                                       "' is already in another group");
        }
        g.push_back(i);
      }
      groups.push_back(g);
    } else if (specs.size() > 1) {
      return core::invalidArgument(where + ": with several --layout, name each group's islands (islands=A+B)");
    } else {
      for (size_t i = 0; i < cluster.islands.size(); ++i) groups.push_back({static_cast<int>(i)});
    }
    for (auto& g : groups) {
      FixedLayout L;
      L.islands = g;
      ARCH_RETURN_IF_ERROR(fill(where, kv, cluster, L));
      out.push_back(std::move(L));
    }
  }
  return out;
}

std::string formatLayout(const FixedLayout& L, const core::ClusterSpec& c) {
  std::vector<std::string> names;
  for (int i : L.islands) names.push_back(c.islands[static_cast<size_t>(i)].name);
  std::string s = fmt::format("islands={},tp={},pp={},dp={},ep={},mb={},vpp={},schedule={},recompute={},zero={}",
                              fmt::join(names, "+"), fmt::join(L.tp, "+"), fmt::join(L.pp, "+"), L.dp, L.ep,
                              L.micro_batch, L.virtual_stages, scheduleName(L.schedule), recomputeName(L.recompute),
                              L.zero);
  if (!L.stage_items.empty()) s += fmt::format(",stages={}", fmt::join(L.stage_items, "+"));
  return s;
}

}  // namespace archipelago::plan
