// Hugging Face directories in and out (docs/runtime.md "Hugging Face").
//
// exportHf: a run's newest valid checkpoint (or a given one) as a directory
// `transformers` loads with LlamaForCausalLM / MixtralForCausalLM as it is:
// model.safetensors (format "pt", the checkpoint's HF tensor names),
// config.json (resolved sizes, the tokenizer's special ids),
// generation_config.json and the dataset's tokenizer (data/hf_tokenizer.h).
// What HF's architectures cannot express is refused, naming the field: a
// shared expert, MoE only every k-th layer, a non-zero routing bias, top-1
// routing (Mixtral renormalises over the chosen experts).
//
// importHf: an HF LLaMA / Mixtral directory (one model.safetensors or the
// shards a model.safetensors.index.json lists; fp32, bf16 or fp16) as the
// step-0 checkpoint of a job's run directory, with fresh optimizer state,
// so `archipelago train JOB --resume` continues training it. The job's
// model section must describe the same model; every difference is named.
#pragma once

#include <string>
#include <vector>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime {

struct HfExportOptions {
  std::string source;   // a run directory or one checkpoint directory
  std::string out;
  std::string data_dir;  // the dataset whose tokenizer to write; empty: the job's data.dir
  bool force = false;    // replace `out` if it is an earlier export (holds config.json)
};

struct HfExportReport {
  std::string checkpoint;  // the directory exported
  int64_t step = 0;
  int64_t tensors = 0;
  std::string architecture;  // LlamaForCausalLM | MixtralForCausalLM
  std::string tokenizer;     // byte | spm | "" (not written)
  std::vector<std::string> notes;
};

core::Result<HfExportReport> exportHf(const HfExportOptions& options);

struct HfImportReport {
  std::string checkpoint;  // the step-0 checkpoint written
  int64_t tensors = 0;
  int64_t parameters = 0;
  std::vector<std::string> notes;
};

// `job` as loaded (model.vocab_size may be 0: taken from the HF config).
core::Result<HfImportReport> importHf(const std::string& hf_dir, const core::JobConfig& job);

}  // namespace archipelago::runtime
