// `archipelago import hf`: a Hugging Face LLaMA / Mixtral directory as the
// step-0 checkpoint of a job (runtime/hf_checkpoint.h).
#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "archipelago/core/files.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/hf_checkpoint.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Every field that makes another model, named as the job names it.
core::Status compareModels(const core::ModelConfig& job, const core::ModelConfig& hf) {
  std::vector<std::string> diffs;
  auto same = [&](const std::string& field, auto a, auto b, const char* hf_key) {
    if (a != b) diffs.push_back(fmt::format("model.{}: the job has {}, config.json has {} ({})", field, a, b, hf_key));
  };
  same("vocab_size", job.vocab_size, hf.vocab_size, "vocab_size");
  same("dim", job.dim, hf.dim, "hidden_size");
  same("n_layers", job.n_layers, hf.n_layers, "num_hidden_layers");
  same("n_heads", job.n_heads, hf.n_heads, "num_attention_heads");
  same("n_kv_heads", job.n_kv_heads, hf.n_kv_heads, "num_key_value_heads");
  same("tie_embeddings", job.tie_embeddings, hf.tie_embeddings, "tie_word_embeddings");
  same("moe.num_experts", job.moe.num_experts, hf.moe.num_experts, "num_local_experts");
  if (hf.moe.num_experts > 0) {
    same("moe.top_k", job.moe.top_k, hf.moe.top_k, "num_experts_per_tok");
    same("moe.expert_hidden", job.moe.expert_hidden, hf.moe.expert_hidden, "intermediate_size");
  } else {
    same("ffn_hidden", job.ffn_hidden, hf.ffn_hidden, "intermediate_size");
  }
  if (std::abs(job.norm_eps - hf.norm_eps) > 1e-12 * std::max(1.0, hf.norm_eps)) {
    diffs.push_back(fmt::format("model.norm_eps: the job has {}, config.json has {} (rms_norm_eps)", job.norm_eps, hf.norm_eps));
  }
  if (std::abs(job.rope_theta - hf.rope_theta) > 1e-9 * hf.rope_theta) {
    diffs.push_back(fmt::format("model.rope_theta: the job has {}, config.json has {} (rope_theta)", job.rope_theta, hf.rope_theta));
  }
  if (diffs.empty()) return core::okStatus();
  std::string msg = "the job's model is not the Hugging Face model (set these fields in the job, or with --set):";
  for (const auto& d : diffs) msg += "\n  " + d;
  return core::invalidArgument(msg);
}

// Every tensor of the directory as fp32: one model.safetensors, or the
// shards model.safetensors.index.json lists.
core::Result<std::map<std::string, torch::Tensor>> readWeights(const fs::path& dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  if (fs::exists(dir / "model.safetensors.index.json", ec)) {
    ARCH_ASSIGN_OR_RETURN(std::string text, core::readFile(dir / "model.safetensors.index.json"));
    const json idx = json::parse(text, nullptr, false);
    if (!idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object()) {
      return core::dataLoss((dir / "model.safetensors.index.json").string() + ": no weight_map object");
    }
    std::set<std::string> names;
    for (const auto& [tensor, file] : idx["weight_map"].items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos) {
        return core::dataLoss((dir / "model.safetensors.index.json").string() + ": tensor '" + tensor + "' names a bad file");
      }
      names.insert(file.get<std::string>());
    }
    for (const auto& n : names) files.push_back(dir / n);
  } else {
    files.push_back(dir / "model.safetensors");
  }
  std::map<std::string, torch::Tensor> out;
  for (const auto& f : files) {
    ARCH_ASSIGN_OR_RETURN(auto file, model::readSafetensors(f));
    for (auto& [name, t] : file.tensors) {
      if (!torch::isFloatingType(t.scalar_type())) return core::dataLoss(f.string() + ": tensor '" + name + "' is not floating point");
      out[name] = t.to(torch::kFloat).contiguous();
    }
  }
  return out;
}

// The parameters in the single-process order, then the model's buffers
// (routing biases, zero: HF has none). Extra tensors HF keeps for itself
// (rotary inverse frequencies, a tied lm_head) are left out and noted.
core::Result<NamedTensors> checkpointWeights(const core::ModelConfig& c, std::map<std::string, torch::Tensor> hf,
                                             std::vector<std::string>& notes) {
  NamedTensors out;
  for (const auto& [name, shape] : model::parameterLayout(c)) {
    auto it = hf.find(name);
    if (it == hf.end()) return core::dataLoss("the Hugging Face weights lack tensor '" + name + "'");
    if (it->second.sizes().vec() != shape) return core::dataLoss("tensor '" + name + "' has another shape than config.json says");
    out.push_back({name, it->second});
    hf.erase(it);
  }
  for (const auto& [name, shape] : model::bufferLayout(c)) out.push_back({name, torch::zeros(shape)});
  for (const auto& [name, t] : hf) {
    const bool hf_own = name.find("rotary_emb.inv_freq") != std::string::npos || (c.tie_embeddings && name == "lm_head.weight");
    if (!hf_own) return core::dataLoss("the Hugging Face weights hold tensor '" + name + "' that this model does not have");
    notes.push_back("left out '" + name + "' (" + (c.tie_embeddings ? "tied to the embedding" : "recomputed") + ")");
  }
  return out;
}

}  // namespace

core::Result<HfImportReport> importHf(const std::string& hf_dir, const core::JobConfig& job) {
  HfImportReport rep;
  const fs::path dir(hf_dir);
  ARCH_ASSIGN_OR_RETURN(std::string text, core::readFile(dir / "config.json"));
  auto hf = model::parseHfConfig(text);
  if (!hf.isOk()) return hf.status().withContext((dir / "config.json").string());
  core::ModelConfig want = job.model;
  if (want.vocab_size == 0) want.vocab_size = hf->vocab_size;
  ARCH_ASSIGN_OR_RETURN(want, model::resolveModelConfig(want));
  ARCH_RETURN_IF_ERROR(compareModels(want, *hf));
  if (!listCheckpoints(job.run_dir).empty()) {
    return core::Status(core::StatusCode::kAlreadyExists, "run_dir '" + job.run_dir +
                                                              "' already holds checkpoints: import into a job with a "
                                                              "new run_dir");
  }
  ARCH_ASSIGN_OR_RETURN(auto tensors, readWeights(dir));
  CheckpointState s;
  ARCH_ASSIGN_OR_RETURN(s.weights, checkpointWeights(want, std::move(tensors), rep.notes));
  for (const auto& [name, shape] : model::parameterLayout(want)) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    rep.parameters += n;
  }
  s.optimizer = {{"exp_avg", torch::zeros({rep.parameters})}, {"exp_avg_sq", torch::zeros({rep.parameters})}};
  core::JobConfig written = job;
  written.model.vocab_size = want.vocab_size;
  s.job_yaml = core::dumpJobYaml(written);
  s.model = want;
  s.membership = {{"world", 0}, {"epoch", 0}, {"ranks", json::array()}};
  // Read by resume: no outer-sync state to restore, a DiLoCo run starts its own.
  s.extra = {{"imported_from", fs::absolute(dir).string()}};
  ARCH_RETURN_IF_ERROR(writeCheckpoint(job.run_dir, s, job.checkpoint.keep_last));
  rep.checkpoint = (fs::path(job.run_dir) / "checkpoints" / checkpointDirName(0)).string();
  rep.tensors = static_cast<int64_t>(s.weights.size());
  return rep;
}

}  // namespace archipelago::runtime
