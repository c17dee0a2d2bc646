// Reading a job or cluster YAML file: the file is named in every error,
// and the problems of one file are reported together.
#pragma once

#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "archipelago/core/status.h"

namespace archipelago::core {

// The parsed file. kNotFound if it does not exist; kInvalidArgument for a
// directory, bad YAML, or a key repeated in one mapping (naming both lines).
Result<YAML::Node> loadYamlFile(const std::string& path);

// "N problem(s) in 'FILE':" and one line per problem; ok when there are none.
Status errorsToStatus(const std::vector<std::string>& errors, const std::string& file);

}  // namespace archipelago::core
