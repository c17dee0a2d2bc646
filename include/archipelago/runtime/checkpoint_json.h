// The JSON files of a checkpoint directory (see checkpoint.h), parsed and
// checked without torch or file I/O, so they can be fuzzed
// (tests/fuzz/fuzz_checkpoint_state.cpp, fuzz_checkpoint_manifest.cpp) and
// every later reader can trust the types:
//
//   manifest.json  {"format_version": 1, "step": N,
//                   "files": {"<plain name>": {"sha256": "<64 hex>", "bytes": N}, ...}}
//   state.json     writer: {"step", "data_position", "shares", "optimizer_step",
//                           "membership", "extra", "job_yaml"}
//                  rank part: {"step", "rank", "optimizer_step", "extra"}
//
// A checkpoint directory is data from disk, possibly from another machine
// or a damaged copy: a wrong type is kDataLoss naming the file and field,
// never an exception, and a manifest can only name files inside its own
// directory.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "archipelago/core/status.h"

namespace archipelago::runtime {

inline constexpr int kCheckpointFormatVersion = 1;

struct CheckpointFileEntry {
  std::string name;    // a plain file name in the checkpoint directory
  std::string sha256;  // lowercase hex
  uint64_t bytes = 0;
};

struct CheckpointManifest {
  int64_t step = 0;
  std::vector<CheckpointFileEntry> files;  // sorted by name
};

// One entry of the writer's extra.parts: a rank part written next to it.
struct CheckpointPartRef {
  int rank = 0;
  std::string island;         // "" when absent
  bool island_state = false;  // the part holds its island's weights and moments
};

// The fields of a writer's state.json (CheckpointState holds the same plus tensors).
struct CheckpointStateFields {
  int64_t step = 0;
  int64_t data_position = 0;
  std::vector<int64_t> shares;
  int64_t optimizer_step = 0;
  nlohmann::json membership;  // an object (empty when the file has none)
  nlohmann::json extra;       // an object (empty when none); parts and outer checked
  std::string job_yaml;
  std::vector<CheckpointPartRef> parts;  // extra.parts
};

// The fields of a rank part's state.json.
struct CheckpointPartFields {
  int64_t step = 0;
  int rank = 0;
  int64_t optimizer_step = 0;
  nlohmann::json extra;  // an object (empty when none); outer checked
};

// `origin` names the file in errors.
core::Result<CheckpointManifest> parseCheckpointManifest(std::string_view text, const std::string& origin);
core::Result<CheckpointStateFields> parseCheckpointState(std::string_view text, const std::string& origin);
core::Result<CheckpointPartFields> parseCheckpointPartState(std::string_view text, const std::string& origin);

}  // namespace archipelago::runtime
