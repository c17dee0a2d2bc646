// archipelago train | worker | coordinator | sample | ckpt  (need libtorch)
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "archipelago/core/files.h"
#include "archipelago/core/log.h"
#include "archipelago/plan/plan_to_job.h"
#include "archipelago/data/dataset.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/model/training.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/launcher.h"
#include "cli/commands.h"

namespace archipelago::cli {
namespace {

std::string selfExe() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("archipelago") : p.string();
}

// The plan's layout as --set overrides ahead of the user's own (which win).
core::Status applyPlan(const std::string& path, runtime::LaunchOptions& launch) {
  ARCH_ASSIGN_OR_RETURN(std::string text, core::readFile(path));
  auto plan = plan::Plan::fromJson(text);
  if (!plan.isOk()) return plan.status().withContext(path);
  ARCH_ASSIGN_OR_RETURN(core::LoadedJob loaded, core::loadJob(launch.job_path, launch.load));
  auto ov = plan::jobOverrides(*plan, loaded.job);
  if (!ov.isOk()) return ov.status().withContext("--plan " + path);
  std::printf("running the layout of %s (%s): --set %s\n", path.c_str(), plan->summary.c_str(),
              fmt::format("{}", fmt::join(ov->sets, " --set ")).c_str());
  for (const auto& n : ov->notes) std::printf("  plan: %s\n", n.c_str());
  std::fflush(stdout);
  std::vector<std::string> sets = ov->sets;
  sets.insert(sets.end(), launch.load.sets.begin(), launch.load.sets.end());
  launch.load.sets = std::move(sets);
  return core::okStatus();
}
}  // namespace

void addTrainCommands(CLI::App& app) {
  // ---- train ----
  static runtime::LaunchOptions launch;
  static std::string resume_dir;
  auto* train = app.add_subcommand("train", "run a training job on this machine (coordinator + one worker per device)");
  train->add_option("job", launch.job_path, "job file (YAML)")->required();
  train->add_option("--set", launch.load.sets, "override a field: PATH=VALUE; repeatable");
  train->add_flag("--resume", launch.resume, "continue the job's run_dir from its newest valid checkpoint");
  train->add_option("--max-restarts", launch.max_restarts,
                    "restart the job from its newest valid checkpoint when it cannot go on (default 0)");
  train->add_option("--max-replacements", launch.max_replacements,
                    "start a replacement (worker --join) for a worker that dies, at most this many times (0 = never)")
      ->capture_default_str();
  train->add_option("--exit-after-step", launch.exit_after_step, "testing: every worker exits abruptly after this step");
  static std::string plan_path;
  train->add_option("--plan", plan_path,
                    "run the layout of this plan (written by `archipelago plan --out`); --set still overrides");
  setAction(train, []() -> core::Status {
    launch.self_exe = selfExe();
    if (!plan_path.empty()) ARCH_RETURN_IF_ERROR(applyPlan(plan_path, launch));
    return runtime::launchTraining(launch);
  });

  // ---- worker ----
  static runtime::WorkerOptions worker;
  auto* w = app.add_subcommand("worker", "one worker process (started by `train`, Slurm, Kubernetes or mpirun)");
  w->add_option("--job", worker.job_path, "resolved job file")->required();
  w->add_option("--run-dir", worker.run_dir, "run directory (default: the job's run_dir)");
  w->add_option("--rank", worker.rank, "rank (default: the first set of RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID)");
  w->add_option("--world", worker.world, "world size (default: WORLD_SIZE, OMPI_COMM_WORLD_SIZE, PMI_SIZE, SLURM_NTASKS, else the job's devices)");
  w->add_option("--coordinator", worker.coordinator,
                "HOST:PORT or [IPV6]:PORT, or a comma-separated list (standbys, tried in turn when one is lost; "
                "default: MASTER_ADDR:MASTER_PORT)");
  w->add_option("--wait-coordinator", worker.wait_coordinator_s,
                "seconds to keep dialling a coordinator that does not answer yet (default: max(10, 5 x "
                "strategy.failure_timeout))")
      ->check(CLI::NonNegativeNumber);
  w->add_option("--listen", worker.listen, "where to listen: auto, an interface (eth0) or an address (default: the island's listen)");
  w->add_option("--advertise", worker.advertise, "the address peers connect to (default: the island's advertise, else the listening one)");
  w->add_flag("--resume", worker.resume, "start from the newest valid checkpoint");
  w->add_flag("--join", worker.join,
              "enter a running job in a failed slot (--rank, or any) with the live state from a peer");
  w->add_option("--max-rejoins", worker.max_rejoins,
                 "when evicted (cut off past the failure timeout), rejoin the job in the same slot at most this "
                 "many times (0 = exit with 75 for a launcher)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  w->add_option("--exit-after-step", worker.exit_after_step, "testing: exit abruptly after this step");
  setAction(w, [] { return runtime::runWorker(worker); });

  // ---- coordinator ----
  static runtime::CoordinatorOptions coord;
  auto* c = app.add_subcommand("coordinator", "the membership service alone (for multi-host launches)");
  c->add_option("--host", coord.host, "interface to listen on");
  c->add_option("--port", coord.port, "port (0 = any; printed at start)")->check(CLI::Range(0, 65535));
  c->add_option("--failure-timeout", coord.failure_timeout,
                "seconds of heartbeat silence before a worker is declared failed (default: the job's "
                "strategy.failure_timeout, which the workers announce when they register)")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--port-file", coord.port_file, "write the port here once listening (for scripts, with --port 0)");
  c->add_flag("--supervise", coord.supervise,
              "run the coordinator as a child and start it again on the same port when it dies; the workers "
              "reattach and it rebuilds the membership from them");
  c->add_option("--credentials", coord.credentials,
                "TLS credentials directory (`archipelago secrets init`): every worker must use TLS with a "
                "certificate of its CA (the job's security.tls); its `secret` serves when ARCHIPELAGO_SECRET is unset");
  setAction(c, [] { return runtime::runCoordinator(coord); });

  // ---- sample ----
  static std::string ckpt_path, prompt = "The state of the Union", data_dir;
  static model::GenerateOptions gen;
  auto* s = app.add_subcommand("sample", "generate text from a checkpoint");
  s->add_option("checkpoint", ckpt_path, "checkpoint directory or run directory")->required();
  s->add_option("--prompt", prompt, "text to continue");
  s->add_option("--tokens", gen.max_new_tokens, "tokens to generate")->check(CLI::Range(1, 1 << 20));
  s->add_option("--temperature", gen.temperature, "0 = greedy")->check(CLI::NonNegativeNumber);
  s->add_option("--top-k", gen.top_k, "sample from the k most likely tokens (0 = all)")->check(CLI::NonNegativeNumber);
  s->add_option("--seed", gen.seed, "sampling seed");
  s->add_option("--data", data_dir, "prepared data dir holding the tokenizer (default: the job's data.dir)");
  setAction(s, []() -> core::Status {
    ARCH_ASSIGN_OR_RETURN(std::string dir, runtime::resolveCheckpointPath(ckpt_path));
    ARCH_ASSIGN_OR_RETURN(auto ck, runtime::loadCheckpoint(dir));
    std::string ddir = data_dir;
    ARCH_ASSIGN_OR_RETURN(core::JobConfig job, runtime::checkpointJob(ck));
    if (ddir.empty()) ddir = job.data.dir;
    ARCH_ASSIGN_OR_RETURN(auto ds, data::PreparedDataset::open(ddir, /*verify_checksums=*/false));
    ARCH_ASSIGN_OR_RETURN(auto net, model::buildModel(job.model, 0));
    model::SafetensorsFile f;
    f.tensors = ck.weights;
    ARCH_RETURN_IF_ERROR(model::loadIntoModel(net, f));
    net->eval();
    torch::NoGradGuard ng;
    auto ids32 = ds->tokenizer().encode(prompt);
    std::vector<int64_t> ids(ids32.begin(), ids32.end());
    if (static_cast<int64_t>(ids.size()) + gen.max_new_tokens > net->config().max_seq_len) {
      return core::invalidArgument("--prompt is " + std::to_string(ids.size()) + " tokens and --tokens " +
                                   std::to_string(gen.max_new_tokens) + " more, past the model's max_seq_len " +
                                   std::to_string(net->config().max_seq_len) + ": shorten the prompt or --tokens");
    }
    auto out = model::generate(net, ids, gen);
    std::vector<int32_t> out32(out.begin(), out.end());
    std::printf("%s%s\n", prompt.c_str(), ds->tokenizer().decode(out32).c_str());
    return core::okStatus();
  });

  // ---- ckpt inspect | verify ----
  static std::string ck_arg;
  auto* ck = app.add_subcommand("ckpt", "inspect or verify checkpoints");
  ck->require_subcommand(1);
  auto* inspect = ck->add_subcommand("inspect", "print a checkpoint's manifest, state and tensors");
  inspect->add_option("checkpoint", ck_arg, "checkpoint directory or run directory")->required();
  setAction(inspect, []() -> core::Status {
    ARCH_ASSIGN_OR_RETURN(std::string dir, runtime::resolveCheckpointPath(ck_arg));
    ARCH_ASSIGN_OR_RETURN(auto st, runtime::loadCheckpoint(dir));
    std::printf("checkpoint %s\n  step %lld, data position %lld, optimizer step %lld\n  shares [", dir.c_str(),
                static_cast<long long>(st.step), static_cast<long long>(st.data_position),
                static_cast<long long>(st.optimizer_step));
    for (size_t i = 0; i < st.shares.size(); ++i) std::printf("%s%lld", i ? "," : "", static_cast<long long>(st.shares[i]));
    std::printf("]\n  membership %s\n  tensors (%zu):\n", st.membership.dump().c_str(), st.weights.size());
    int64_t total = 0;
    for (const auto& [name, t] : st.weights) {
      total += t.numel();
      std::string shape;
      for (auto d : t.sizes()) shape += (shape.empty() ? "" : "x") + std::to_string(d);
      std::printf("    %-55s %s\n", name.c_str(), shape.c_str());
    }
    std::printf("  %lld parameters\n", static_cast<long long>(total));
    return core::okStatus();
  });
  auto* verify = ck->add_subcommand("verify", "check every checkpoint file against its sha256");
  verify->add_option("checkpoint", ck_arg, "checkpoint directory, or a run directory (verifies all)")->required();
  setAction(verify, []() -> core::Status {
    std::vector<std::string> dirs;
    if (std::filesystem::exists(std::filesystem::path(ck_arg) / "manifest.json")) dirs.push_back(ck_arg);
    else dirs = runtime::listCheckpoints(ck_arg);
    if (dirs.empty()) return core::notFound("no checkpoints under '" + ck_arg + "'");
    int bad = 0;
    for (const auto& d : dirs) {
      auto st = runtime::verifyCheckpoint(d);
      std::printf("%s  %s\n", st.isOk() ? "OK     " : "CORRUPT", st.isOk() ? d.c_str() : st.message().c_str());
      bad += st.isOk() ? 0 : 1;
    }
    if (bad) return core::dataLoss(std::to_string(bad) + " of " + std::to_string(dirs.size()) + " checkpoints failed verification");
    return core::okStatus();
  });
}

}  // namespace archipelago::cli
