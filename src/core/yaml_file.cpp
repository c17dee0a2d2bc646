#include "core/yaml_file.h"

#include <filesystem>
#include <map>
#include <set>

namespace archipelago::core {

namespace {

// yaml-cpp keeps both pairs of a repeated key and lookups return the
// first, so a second `train:` section or a repeated `steps:` would be
// silently ignored. Every mapping is walked and a repeat is an error
// naming both lines.
//
// An alias makes one node reachable many times (`&a [*a]` even reaches
// itself; nine lines of `&b [*a, *a, ...]` reach it 10^9 times), so a
// mapping or list is walked once, known by the position where it starts.
void findDuplicateKeys(const YAML::Node& n, const std::string& path, std::vector<std::string>& errors,
                       std::set<int>& walked) {
  if (!n.IsSequence() && !n.IsMap()) return;
  if (!walked.insert(n.Mark().pos).second) return;
  if (n.IsSequence()) {
    for (const auto& item : n) findDuplicateKeys(item, path, errors, walked);
    return;
  }
  std::map<std::string, int> first_line;
  for (const auto& kv : n) {
    if (kv.first.IsScalar()) {
      const int line = kv.first.Mark().line + 1;
      auto [it, fresh] = first_line.emplace(kv.first.Scalar(), line);
      if (!fresh) {
        errors.push_back(path + ":" + std::to_string(line) + ": key '" + kv.first.Scalar() + "' repeats the one on line " +
                         std::to_string(it->second) + "; keep one of them");
      }
    }
    findDuplicateKeys(kv.second, path, errors, walked);
  }
}

}  // namespace

Result<YAML::Node> loadYamlFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return notFound("job file '" + path + "' does not exist");
  }
  if (std::filesystem::is_directory(path, ec)) {
    return invalidArgument("job file '" + path + "' is a directory; pass a YAML file (e.g. " + path + "/job.yaml)");
  }
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    return invalidArgument("'" + path + "' is not valid YAML: line " + std::to_string(e.mark.line + 1) +
                           ": " + e.msg);
  }
  std::vector<std::string> dups;
  std::set<int> walked;
  findDuplicateKeys(root, path, dups, walked);
  ARCH_RETURN_IF_ERROR(errorsToStatus(dups, path));
  return root;
}

Status errorsToStatus(const std::vector<std::string>& errors, const std::string& file) {
  if (errors.empty()) return okStatus();
  std::string msg = std::to_string(errors.size()) + " problem" + (errors.size() > 1 ? "s" : "") + " in '" +
                    file + "':";
  for (const auto& e : errors) msg += "\n  " + e;
  return invalidArgument(msg);
}

}  // namespace archipelago::core
