// Weights on disk: safetensors files and a Hugging Face style config.json,
// so checkpoints load in the ecosystem (transformers, vLLM, llama.cpp
// converters) and ours load theirs.
//
// safetensors layout: u64 little-endian N | N bytes of JSON header | data.
// The header maps each tensor name to {"dtype","shape","data_offsets":[b,e]}
// (offsets relative to the data start) plus an optional "__metadata__"
// string->string map. We write keys sorted, data in the same sorted order
// with no gaps and the header padded with spaces to a multiple of 8, so the
// same tensors always give the same bytes. Reading checks every offset,
// size, dtype and that the data region is covered exactly once.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"
#include "archipelago/model/transformer.h"

namespace archipelago::model {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct SafetensorsFile {
  NamedTensors tensors;  // sorted by name, CPU, contiguous, owning their memory
  std::map<std::string, std::string> metadata;

  // nullptr when absent.
  const torch::Tensor* find(const std::string& name) const;
};

// Largest header we accept (the format's reference reader uses 100 MB).
inline constexpr uint64_t kMaxSafetensorsHeader = 100ull << 20;

// "F32", "BF16", "F16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL".
core::Result<std::string> safetensorsDtypeName(torch::ScalarType t);
core::Result<torch::ScalarType> safetensorsDtype(const std::string& name);

// The file's bytes. `cast_floating` (if set) converts every floating tensor
// (e.g. save fp32 weights as BF16). Duplicate names are an error.
core::Result<std::string> serializeSafetensors(const NamedTensors& tensors,
                                               const std::map<std::string, std::string>& metadata = {},
                                               std::optional<torch::ScalarType> cast_floating = {});
core::Result<SafetensorsFile> parseSafetensors(std::string_view bytes);

// Writes through a temporary file in the same directory and renames it, so
// a crash never leaves a half-written file under `path`.
core::Status writeSafetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata = {},
                              std::optional<torch::ScalarType> cast_floating = {});
core::Result<SafetensorsFile> readSafetensors(const std::filesystem::path& path);

// Copies a file's tensors into the model's namedTensors() (casting dtype,
// keeping the model's device). Every model tensor must be present with the
// same shape; with strict, unknown names in the file are errors too.
// Nothing is modified unless every check passes.
core::Status loadIntoModel(Transformer& model, const SafetensorsFile& file, bool strict = true);

// HF config.json for the architecture (model_type "llama", or "mixtral" when
// MoE), plus an "archipelago" object holding what HF has no field for, so
// parseHfConfig(hfConfigJson(c)) == c for every resolved config.
std::string hfConfigJson(const core::ModelConfig& config);
// Reads ours and plain HF llama/mistral/mixtral configs.
core::Result<core::ModelConfig> parseHfConfig(std::string_view json);

// A model directory: config.json + model.safetensors (HF layout).
core::Status saveModelDir(const std::filesystem::path& dir, Transformer& model,
                          std::optional<torch::ScalarType> cast_floating = {});
// Builds the model from dir/config.json and loads dir/model.safetensors.
core::Result<Transformer> loadModelDir(const std::filesystem::path& dir);

}  // namespace archipelago::model
