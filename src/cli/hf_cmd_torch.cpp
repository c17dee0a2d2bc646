// `archipelago export hf` and `archipelago import hf`: checkpoints to and
// from Hugging Face directories (runtime/hf_checkpoint.h, docs/runtime.md).
#include <cstdio>

#include "archipelago/core/config.h"
#include "archipelago/runtime/hf_checkpoint.h"
#include "cli/commands.h"

namespace archipelago::cli {

void addHfCommands(CLI::App& app) {
  static runtime::HfExportOptions ex;
  auto* exp = app.add_subcommand("export", "write a checkpoint in another ecosystem's format");
  exp->require_subcommand(1);
  auto* ehf = exp->add_subcommand("hf", "a Hugging Face LLaMA / Mixtral directory transformers loads as written");
  ehf->add_option("source", ex.source, "run directory (its newest valid checkpoint) or checkpoint directory")->required();
  ehf->add_option("out", ex.out, "output directory")->required();
  ehf->add_option("--data", ex.data_dir, "prepared dataset whose tokenizer to write (default: the job's data.dir)");
  ehf->add_flag("--force", ex.force, "replace OUT if it is an earlier export");
  setAction(ehf, []() -> core::Status {
    ARCH_ASSIGN_OR_RETURN(auto rep, runtime::exportHf(ex));
    std::printf("exported %s (step %lld) as %s: %lld tensors, %s tokenizer -> %s\n", rep.checkpoint.c_str(),
                static_cast<long long>(rep.step), rep.architecture.c_str(), static_cast<long long>(rep.tensors),
                rep.tokenizer.c_str(), ex.out.c_str());
    for (const auto& n : rep.notes) std::printf("  note: %s\n", n.c_str());
    return core::okStatus();
  });

  static std::string hf_dir, job_path;
  static core::LoadOptions load;
  auto* imp = app.add_subcommand("import", "start a run from another ecosystem's model");
  imp->require_subcommand(1);
  auto* ihf = imp->add_subcommand("hf", "a Hugging Face LLaMA / Mixtral directory as step 0 of a job's run_dir");
  ihf->add_option("dir", hf_dir, "directory with config.json and model.safetensors (or its index and shards)")->required();
  ihf->add_option("job", job_path, "job file whose model section describes the same model")->required();
  ihf->add_option("--set", load.sets, "override a job field: PATH=VALUE; repeatable");
  setAction(ihf, []() -> core::Status {
    ARCH_ASSIGN_OR_RETURN(auto job, core::loadJob(job_path, load));
    ARCH_ASSIGN_OR_RETURN(auto rep, runtime::importHf(hf_dir, job.job));
    std::printf("imported %s: %lld tensors, %lld parameters -> %s\n", hf_dir.c_str(), static_cast<long long>(rep.tensors),
                static_cast<long long>(rep.parameters), rep.checkpoint.c_str());
    for (const auto& n : rep.notes) std::printf("  note: %s\n", n.c_str());
    std::printf("continue training it with: archipelago train %s --resume\n", job_path.c_str());
    return core::okStatus();
  });
}

}  // namespace archipelago::cli
