// Field checks of the coordinator's JSON messages (see coordinator_messages.h).
#include "comm/coordinator_messages.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace archipelago::comm {

using nlohmann::json;

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

core::Status badField(const std::string& what, const char* key, const json& v, const std::string& expected) {
  std::string shown = v.dump();
  if (shown.size() > 64) shown = shown.substr(0, 61) + "...";
  return core::invalidArgument(what + ": field '" + key + "' is " + shown + ", expected " + expected);
}

bool integerIn(const json& v, int64_t lo, int64_t hi) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    return hi >= 0 && u <= static_cast<uint64_t>(hi) && static_cast<int64_t>(u) >= lo;
  }
  if (!v.is_number_integer()) return false;
  const int64_t x = v.get<int64_t>();
  return x >= lo && x <= hi;
}

// Checks j[key], when present, with `ok`.
template <typename Check>
core::Status optionalField(const json& j, const char* key, const std::string& what, const std::string& expected,
                           Check ok) {
  auto it = j.find(key);
  if (it == j.end() || ok(*it)) return core::okStatus();
  return badField(what, key, *it, expected);
}

core::Status integerField(const json& j, const char* key, const std::string& what, int64_t lo, int64_t hi) {
  return optionalField(j, key, what, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]",
                       [&](const json& v) { return integerIn(v, lo, hi); });
}

core::Status stringField(const json& j, const char* key, const std::string& what) {
  return optionalField(j, key, what, "a string", [](const json& v) { return v.is_string(); });
}

// A list of integers in [lo, hi], or an error naming `key`.
core::Result<std::vector<int64_t>> integerList(const json& j, const char* key, int64_t lo, int64_t hi) {
  std::vector<int64_t> out;
  auto it = j.find(key);
  if (it == j.end()) return out;
  if (!it->is_array()) return badField("coordinator reply", key, *it, "a list");
  for (const auto& v : *it) {
    if (!integerIn(v, lo, hi)) {
      return badField("coordinator reply", key, v,
                      "a list of integers in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    out.push_back(v.get<int64_t>());
  }
  return out;
}

// alive / failed: ascending ranks of the table, each once.
core::Status checkRankList(const std::vector<int64_t>& ranks, const char* key, size_t world) {
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (ranks[i] < 0 || static_cast<size_t>(ranks[i]) >= world || (i > 0 && ranks[i] <= ranks[i - 1])) {
      return core::invalidArgument("coordinator reply: field '" + std::string(key) + "' is not an ascending list of " +
                                   "ranks below " + std::to_string(world) + " (entry " + std::to_string(i) + " is " +
                                   std::to_string(ranks[i]) + ")");
    }
  }
  return core::okStatus();
}

}  // namespace

core::Status checkCoordinatorRequest(const json& r) {
  const std::string what = "coordinator request";
  if (!r.is_object()) return core::invalidArgument(what + " is not a JSON object");
  if (!r.contains("op") || !r["op"].is_string()) {
    return core::invalidArgument(what + ": field 'op' is missing or not a string");
  }
  for (const char* key : {"rank", "failed", "island"}) ARCH_RETURN_IF_ERROR(integerField(r, key, what, -1, kIntMax));
  ARCH_RETURN_IF_ERROR(integerField(r, "world", what, 0, kIntMax));
  for (const char* key : {"epoch", "seen"}) {
    ARCH_RETURN_IF_ERROR(integerField(r, key, what, 0, std::numeric_limits<uint32_t>::max()));
  }
  // A reattach's view is a membership table like a reply's (checked in full by membershipFromJson).
  ARCH_RETURN_IF_ERROR(optionalField(r, "view", what, "a membership object", [](const json& v) { return v.is_object(); }));
  ARCH_RETURN_IF_ERROR(
      integerField(r, "pid", what, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()));
  for (const char* key : {"timeout", "failure_timeout"}) {
    ARCH_RETURN_IF_ERROR(optionalField(r, key, what, "a number >= 0", [](const json& v) {
      return v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() >= 0;
    }));
  }
  for (const char* key : {"address", "why", "key", "value"}) ARCH_RETURN_IF_ERROR(stringField(r, key, what));
  return core::okStatus();
}

core::Result<json> parseCoordinatorReply(std::string_view text) {
  const std::string what = "coordinator reply";
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return core::dataLoss("coordinator sent a malformed reply");
  if (!j.is_object()) return core::dataLoss("coordinator sent a reply that is not a JSON object");
  ARCH_RETURN_IF_ERROR(optionalField(j, "ok", what, "true or false", [](const json& v) { return v.is_boolean(); }));
  for (const char* key : {"error", "code", "value"}) ARCH_RETURN_IF_ERROR(stringField(j, key, what));
  ARCH_RETURN_IF_ERROR(integerField(j, "epoch", what, 0, std::numeric_limits<uint32_t>::max()));
  ARCH_RETURN_IF_ERROR(integerField(j, "rank", what, -1, kIntMax));
  if (!j.value("ok", false)) {
    const std::string err = j.value("error", "unknown error");
    if (j.value("code", "") == "deadline") return core::deadlineExceeded("coordinator: " + err);
    if (j.value("code", "") == "recovering") return core::unavailable("coordinator: " + err);
    return core::invalidArgument("coordinator: " + err);
  }
  return j;
}

json membershipToJson(const Membership& m) {
  return json{{"epoch", m.epoch}, {"addresses", m.addresses}, {"islands", m.islands}, {"pids", m.pids},
              {"alive", m.alive}, {"failed", m.failed}};
}

core::Result<Membership> membershipFromJson(const json& j) {
  Membership m;
  if (!j.is_object()) return core::invalidArgument("coordinator reply is not a JSON object");
  ARCH_RETURN_IF_ERROR(integerField(j, "epoch", "coordinator reply", 0, std::numeric_limits<uint32_t>::max()));
  m.epoch = j.value("epoch", 0u);
  if (auto it = j.find("addresses"); it != j.end()) {
    if (!it->is_array()) return badField("coordinator reply", "addresses", *it, "a list of strings");
    for (const auto& a : *it) {
      if (!a.is_string()) return badField("coordinator reply", "addresses", a, "a list of strings");
      m.addresses.push_back(a.get<std::string>());
    }
  }
  ARCH_ASSIGN_OR_RETURN(auto islands, integerList(j, "islands", -1, kIntMax));
  ARCH_ASSIGN_OR_RETURN(m.pids, integerList(j, "pids", std::numeric_limits<int64_t>::min(),
                                            std::numeric_limits<int64_t>::max()));
  ARCH_ASSIGN_OR_RETURN(auto alive, integerList(j, "alive", 0, kIntMax));
  ARCH_ASSIGN_OR_RETURN(auto failed, integerList(j, "failed", 0, kIntMax));
  const size_t world = m.addresses.size();
  if (islands.size() != world || m.pids.size() != world) {
    return core::invalidArgument("coordinator reply: " + std::to_string(world) + " addresses but " +
                                 std::to_string(islands.size()) + " islands and " + std::to_string(m.pids.size()) +
                                 " pids (one of each per rank)");
  }
  ARCH_RETURN_IF_ERROR(checkRankList(alive, "alive", world));
  ARCH_RETURN_IF_ERROR(checkRankList(failed, "failed", world));
  for (int64_t r : failed) {
    if (std::binary_search(alive.begin(), alive.end(), r)) {
      return core::invalidArgument("coordinator reply: rank " + std::to_string(r) + " is both alive and failed");
    }
  }
  m.islands.assign(islands.begin(), islands.end());
  m.alive.assign(alive.begin(), alive.end());
  m.failed.assign(failed.begin(), failed.end());
  return m;
}

}  // namespace archipelago::comm
