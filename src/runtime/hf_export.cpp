// `archipelago export hf`: a checkpoint as a Hugging Face directory
// (runtime/hf_checkpoint.h).
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "archipelago/core/files.h"
#include "archipelago/data/hf_tokenizer.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/hf_checkpoint.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

int64_t rowsOf(const NamedTensors& weights, const std::string& name) {
  for (const auto& [n, t] : weights) {
    if (n == name) return t.size(0);
  }
  return 0;
}

// The model the checkpoint's config.json describes. Checkpoints written
// before config.json held resolved sizes left some at 0; the weights'
// shapes say what they were.
core::Result<core::ModelConfig> modelOf(const std::string& dir, const NamedTensors& weights) {
  ARCH_ASSIGN_OR_RETURN(std::string text, core::readFile(fs::path(dir) / "config.json"));
  json j = json::parse(text, nullptr, false);
  if (!j.is_object()) return core::dataLoss(dir + "/config.json is not a JSON object");
  auto fill = [&](const char* key, int64_t value) {
    if (j.value(key, int64_t{0}) == 0 && value > 0) j[key] = value;
  };
  fill("vocab_size", rowsOf(weights, "model.embed_tokens.weight"));
  const bool moe = j.value("model_type", "") == "mixtral";
  fill("intermediate_size", rowsOf(weights, moe ? "model.layers.0.block_sparse_moe.experts.0.w1.weight"
                                                : "model.layers.0.mlp.gate_proj.weight"));
  const int64_t heads = j.value("num_attention_heads", int64_t{0}), hidden = j.value("hidden_size", int64_t{0});
  if (heads > 0 && hidden % heads == 0) {
    fill("num_key_value_heads", rowsOf(weights, "model.layers.0.self_attn.k_proj.weight") / (hidden / heads));
    fill("head_dim", hidden / heads);
  }
  if (!moe && j.contains("archipelago") && j["archipelago"].is_object() &&
      j["archipelago"].value("ffn_hidden", int64_t{0}) == 0) {
    // An older checkpoint's 0 ("the default"): the size the weights have.
    j["archipelago"]["ffn_hidden"] = j.value("intermediate_size", int64_t{0});
  }
  auto c = model::parseHfConfig(j.dump());
  if (!c.isOk()) return c.status().withContext(dir + "/config.json");
  return c;
}

// What LlamaForCausalLM / MixtralForCausalLM cannot express.
core::Status checkExpressible(const core::ModelConfig& c, const NamedTensors& weights) {
  if (c.moe.num_experts <= 0) return core::okStatus();
  if (c.moe.shared_expert) {
    return core::failedPrecondition("model.moe.shared_expert: MixtralForCausalLM has no shared expert");
  }
  if (c.moe.every != 1) {
    return core::failedPrecondition("model.moe.every = " + std::to_string(c.moe.every) +
                                    ": MixtralForCausalLM has experts in every layer");
  }
  if (c.moe.top_k < 2) {
    return core::failedPrecondition("model.moe.top_k = 1: MixtralForCausalLM renormalises the chosen experts' "
                                    "weights, which with one expert gives another model");
  }
  for (const auto& [name, t] : weights) {
    if (name.find("e_score_correction_bias") != std::string::npos && t.abs().max().item<double>() != 0) {
      return core::failedPrecondition("'" + name + "' (model.moe.balance: router_bias) is not zero: MixtralForCausalLM "
                                      "routes without a bias, so the export would be another model");
    }
  }
  return core::okStatus();
}

// The model's tensors exactly as the architecture defines them.
core::Result<NamedTensors> hfWeights(const core::ModelConfig& c, const NamedTensors& weights) {
  std::map<std::string, torch::Tensor> by(weights.begin(), weights.end());
  NamedTensors out;
  for (const auto& [name, shape] : model::parameterLayout(c)) {
    auto it = by.find(name);
    if (it == by.end()) return core::dataLoss("the checkpoint lacks tensor '" + name + "'");
    if (it->second.sizes().vec() != shape) return core::dataLoss("tensor '" + name + "' has another shape than config.json says");
    out.push_back({name, it->second.to(torch::kFloat).contiguous()});
  }
  return out;
}

// The dataset whose tokenizer goes along: --data, or the job's data.dir.
core::Result<data::Manifest> datasetOf(const HfExportOptions& o, const CheckpointState& ck) {
  std::string dir = o.data_dir;
  if (dir.empty()) {
    auto job = checkpointJob(ck);
    if (!job.isOk()) return job.status().withContext("pass --data DIR");
    dir = job->data.dir;
  }
  auto m = data::loadManifest(dir);
  if (!m.isOk()) {
    return m.status().withContext("the tokenizer goes with the export, from dataset '" + dir +
                                  "' (the job's data.dir); pass --data DIR where it is now");
  }
  return m;
}

core::Status checkOut(const fs::path& out, bool force) {
  std::error_code ec;
  if (!fs::exists(out, ec)) return core::okStatus();
  if (!force) {
    return core::Status(core::StatusCode::kAlreadyExists,
                        "'" + out.string() + "' exists; pass --force to replace an earlier export");
  }
  if (!fs::exists(out / "config.json", ec) || !fs::exists(out / "model.safetensors", ec)) {
    return core::failedPrecondition("'" + out.string() + "' exists and is not an earlier export (no config.json and "
                                    "model.safetensors): --force only replaces an export; choose another directory");
  }
  return core::okStatus();
}

core::Status writeConfigs(const fs::path& dir, const core::ModelConfig& c, const data::Manifest& m) {
  json cfg = json::parse(model::hfConfigJson(c));
  const auto& t = m.tokenizer;
  cfg["bos_token_id"] = t.bos_id;
  cfg["eos_token_id"] = t.eos_id;
  if (t.pad_id >= 0) cfg["pad_token_id"] = t.pad_id;
  ARCH_RETURN_IF_ERROR(core::writeFile(dir / "config.json", cfg.dump(2) + "\n"));
  json gen = {{"_from_model_config", true}, {"bos_token_id", t.bos_id}, {"eos_token_id", t.eos_id}};
  if (t.pad_id >= 0) gen["pad_token_id"] = t.pad_id;
  ARCH_RETURN_IF_ERROR(core::writeFile(dir / "generation_config.json", gen.dump(2) + "\n"));
  return data::writeHfTokenizer(m, dir, c.max_seq_len);
}

}  // namespace

core::Result<HfExportReport> exportHf(const HfExportOptions& o) {
  HfExportReport rep;
  const fs::path out(o.out);
  ARCH_RETURN_IF_ERROR(checkOut(out, o.force));
  ARCH_ASSIGN_OR_RETURN(rep.checkpoint, resolveCheckpointPath(o.source));
  ARCH_RETURN_IF_ERROR(verifyCheckpoint(rep.checkpoint));
  ARCH_ASSIGN_OR_RETURN(CheckpointState ck, loadCheckpoint(rep.checkpoint));
  rep.step = ck.step;
  ARCH_ASSIGN_OR_RETURN(core::ModelConfig c, modelOf(rep.checkpoint, ck.weights));
  ARCH_RETURN_IF_ERROR(checkExpressible(c, ck.weights).withContext("cannot export " + rep.checkpoint));
  ARCH_ASSIGN_OR_RETURN(NamedTensors weights, hfWeights(c, ck.weights));
  if (weights.size() < ck.weights.size()) rep.notes.push_back("left out the all-zero routing bias (HF has none)");
  rep.architecture = c.moe.num_experts > 0 ? "MixtralForCausalLM" : "LlamaForCausalLM";

  ARCH_ASSIGN_OR_RETURN(fs::path tmp, core::makeSiblingTempDir(out, ".export-"));
  auto written = [&]() -> core::Status {
    ARCH_ASSIGN_OR_RETURN(data::Manifest m, datasetOf(o, ck));
    if (m.vocab_size > c.vocab_size) {
      return core::dataLoss("dataset '" + m.dir.string() + "' has " + std::to_string(m.vocab_size) +
                            " token ids but the model only " + std::to_string(c.vocab_size) + ": another dataset?");
    }
    rep.tokenizer = m.tokenizer.kind;
    // transformers refuses safetensors files whose metadata lacks format=pt.
    ARCH_RETURN_IF_ERROR(model::writeSafetensors(tmp / "model.safetensors", weights, {{"format", "pt"}}));
    return writeConfigs(tmp, c, m);
  }();
  if (!written.isOk()) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    return written.withContext("exporting " + rep.checkpoint);
  }
  ARCH_RETURN_IF_ERROR(core::replaceDirectoryAtomic(tmp, out));
  rep.tensors = static_cast<int64_t>(weights.size());
  return rep;
}

}  // namespace archipelago::runtime
