// Parsing of a checkpoint's manifest.json and state.json (see
// checkpoint_json.h). Torch-free on purpose: the fuzz targets compile this
// file alone.
#include "archipelago/runtime/checkpoint_json.h"

#include <algorithm>
#include <limits>

namespace archipelago::runtime {
namespace {

using nlohmann::json;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

core::Status bad(const std::string& origin, const std::string& field, const json& v, const std::string& expected) {
  std::string shown = v.dump();
  if (shown.size() > 64) shown = shown.substr(0, 61) + "...";
  return core::dataLoss("'" + origin + "': field '" + field + "' is " + shown + ", expected " + expected);
}

core::Result<json> parseObject(std::string_view text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return core::dataLoss("'" + origin + "' is not valid JSON: " + e.what());
  }
  if (!j.is_object()) return core::dataLoss("'" + origin + "' does not hold a JSON object");
  return j;
}

// An integer in [lo, hi]: nlohmann's get<int>() would cast a float or a
// too large value without a word.
core::Result<int64_t> integer(const json& v, const std::string& origin, const std::string& field, int64_t lo,
                              int64_t hi) {
  bool ok = false;
  if (v.is_number_unsigned()) {
    ok = v.get<uint64_t>() <= static_cast<uint64_t>(hi) && static_cast<int64_t>(v.get<uint64_t>()) >= lo;
  } else if (v.is_number_integer()) {
    ok = v.get<int64_t>() >= lo && v.get<int64_t>() <= hi;
  }
  if (!ok) return bad(origin, field, v, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v.get<int64_t>();
}

core::Result<int64_t> required(const json& j, const char* key, const std::string& origin, int64_t lo, int64_t hi) {
  auto it = j.find(key);
  if (it == j.end()) return core::dataLoss("'" + origin + "' lacks the field '" + key + "'");
  return integer(*it, origin, key, lo, hi);
}

// membership and extra: free-form, but an object (or absent). Absent or
// null comes back as an empty object: resume calls extra.value(...), which
// throws on null.
core::Result<json> objectField(const json& j, const char* key, const std::string& origin) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return json::object();
  if (!it->is_object()) return bad(origin, key, *it, "an object");
  return *it;
}

// extra.outer, the outer-sync state that resume hands to OuterSync::restore,
// which reads these fields with value() (throwing on a wrong type).
core::Status checkOuterState(const json& extra, const std::string& origin) {
  auto it = extra.find("outer");
  if (it == extra.end() || it->is_null()) return core::okStatus();
  if (!it->is_object()) return bad(origin, "extra.outer", *it, "an object");
  const json& o = *it;
  if (o.contains("kind") && !o["kind"].is_string()) return bad(origin, "extra.outer.kind", o["kind"], "a string");
  for (const char* key : {"fragments", "inner_steps", "numel", "cum_tokens", "outer_steps"}) {
    if (o.contains(key)) {
      ARCH_RETURN_IF_ERROR(integer(o[key], origin, std::string("extra.outer.") + key, 0, kInt64Max).status());
    }
  }
  for (const char* key : {"last_tokens", "rounds"}) {
    if (!o.contains(key)) continue;
    const std::string field = std::string("extra.outer.") + key;
    if (!o[key].is_array()) return bad(origin, field, o[key], "a list of integers");
    for (const auto& v : o[key]) ARCH_RETURN_IF_ERROR(integer(v, origin, field, 0, kInt64Max).status());
  }
  return core::okStatus();
}

bool isSha256Hex(const std::string& s) {
  return s.size() == 64 &&
         std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// A name the manifest may list: one file directly in the checkpoint
// directory. "../x", "/etc/x", "a/b", "." and ".." would make verification
// hash a file elsewhere (or a directory, or a device that never ends).
bool isPlainFileName(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos && s.find('\0') == std::string::npos;
}

core::Result<CheckpointFileEntry> fileEntry(const std::string& name, const json& info, const std::string& origin) {
  const std::string field = "files." + name;
  if (!isPlainFileName(name)) return core::dataLoss("'" + origin + "': field 'files' names '" + name + "', not a plain file name");
  if (!info.is_object()) return bad(origin, field, info, "an object with sha256 and bytes");
  CheckpointFileEntry e;
  e.name = name;
  auto sha = info.find("sha256");
  if (sha == info.end() || !sha->is_string() || !isSha256Hex(sha->get<std::string>())) {
    return bad(origin, field + ".sha256", sha == info.end() ? json() : *sha, "64 lowercase hex digits");
  }
  e.sha256 = sha->get<std::string>();
  auto bytes = info.find("bytes");
  if (bytes == info.end()) return core::dataLoss("'" + origin + "': field '" + field + ".bytes' is missing");
  ARCH_ASSIGN_OR_RETURN(int64_t n, integer(*bytes, origin, field + ".bytes", 0, kInt64Max));
  e.bytes = static_cast<uint64_t>(n);
  return e;
}

// extra.parts: the rank parts this checkpoint needs, read by verification
// and by resume.
core::Result<std::vector<CheckpointPartRef>> partRefs(const json& extra, const std::string& origin) {
  std::vector<CheckpointPartRef> out;
  if (!extra.is_object() || !extra.contains("parts")) return out;
  const json& parts = extra["parts"];
  if (!parts.is_array()) return bad(origin, "extra.parts", parts, "a list");
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string field = "extra.parts[" + std::to_string(i) + "]";
    const json& p = parts[i];
    if (!p.is_object() || !p.contains("rank")) return bad(origin, field, p, "an object with a rank");
    CheckpointPartRef ref;
    ARCH_ASSIGN_OR_RETURN(int64_t rank, integer(p["rank"], origin, field + ".rank", 0, std::numeric_limits<int>::max()));
    ref.rank = static_cast<int>(rank);
    if (p.contains("island") && !p["island"].is_string()) return bad(origin, field + ".island", p["island"], "a string");
    if (p.contains("island_state") && !p["island_state"].is_boolean()) {
      return bad(origin, field + ".island_state", p["island_state"], "true or false");
    }
    ref.island = p.value("island", std::string());
    ref.island_state = p.value("island_state", false);
    out.push_back(std::move(ref));
  }
  return out;
}

}  // namespace

core::Result<CheckpointManifest> parseCheckpointManifest(std::string_view text, const std::string& origin) {
  ARCH_ASSIGN_OR_RETURN(json j, parseObject(text, origin));
  auto version = j.find("format_version");
  if (version == j.end() || !version->is_number_integer() || *version != kCheckpointFormatVersion) {
    return core::dataLoss("'" + origin + "' has format_version " + (version == j.end() ? "(none)" : version->dump()) +
                          ", expected " + std::to_string(kCheckpointFormatVersion));
  }
  CheckpointManifest m;
  ARCH_ASSIGN_OR_RETURN(m.step, required(j, "step", origin, 0, kInt64Max));
  auto files = j.find("files");
  if (files == j.end() || !files->is_object() || files->empty()) {
    return core::dataLoss("checkpoint manifest '" + origin + "' lists no files");
  }
  for (auto it = files->begin(); it != files->end(); ++it) {
    ARCH_ASSIGN_OR_RETURN(auto e, fileEntry(it.key(), it.value(), origin));
    m.files.push_back(std::move(e));
  }
  return m;
}

core::Result<CheckpointStateFields> parseCheckpointState(std::string_view text, const std::string& origin) {
  ARCH_ASSIGN_OR_RETURN(json j, parseObject(text, origin));
  CheckpointStateFields s;
  ARCH_ASSIGN_OR_RETURN(s.step, required(j, "step", origin, 0, kInt64Max));
  ARCH_ASSIGN_OR_RETURN(s.data_position, required(j, "data_position", origin, 0, kInt64Max));
  ARCH_ASSIGN_OR_RETURN(s.optimizer_step, required(j, "optimizer_step", origin, 0, kInt64Max));
  auto shares = j.find("shares");
  if (shares == j.end()) return core::dataLoss("'" + origin + "' lacks the field 'shares'");
  if (!shares->is_array()) return bad(origin, "shares", *shares, "a list of integers");
  for (size_t i = 0; i < shares->size(); ++i) {
    ARCH_ASSIGN_OR_RETURN(int64_t v, integer((*shares)[i], origin, "shares[" + std::to_string(i) + "]",
                                             std::numeric_limits<int64_t>::min(), kInt64Max));
    s.shares.push_back(v);
  }
  ARCH_ASSIGN_OR_RETURN(s.membership, objectField(j, "membership", origin));
  ARCH_ASSIGN_OR_RETURN(s.extra, objectField(j, "extra", origin));
  ARCH_ASSIGN_OR_RETURN(s.parts, partRefs(s.extra, origin));
  ARCH_RETURN_IF_ERROR(checkOuterState(s.extra, origin));
  if (auto it = j.find("job_yaml"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) return bad(origin, "job_yaml", *it, "a string");
    s.job_yaml = it->get<std::string>();
  }
  return s;
}

core::Result<CheckpointPartFields> parseCheckpointPartState(std::string_view text, const std::string& origin) {
  ARCH_ASSIGN_OR_RETURN(json j, parseObject(text, origin));
  CheckpointPartFields s;
  ARCH_ASSIGN_OR_RETURN(s.step, required(j, "step", origin, 0, kInt64Max));
  ARCH_ASSIGN_OR_RETURN(int64_t rank, required(j, "rank", origin, 0, std::numeric_limits<int>::max()));
  s.rank = static_cast<int>(rank);
  ARCH_ASSIGN_OR_RETURN(s.optimizer_step, required(j, "optimizer_step", origin, 0, kInt64Max));
  ARCH_ASSIGN_OR_RETURN(s.extra, objectField(j, "extra", origin));
  ARCH_RETURN_IF_ERROR(checkOuterState(s.extra, origin));
  return s;
}

}  // namespace archipelago::runtime
