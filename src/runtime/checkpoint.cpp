#include "archipelago/runtime/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>

#include "archipelago/core/files.h"
#include "archipelago/core/hash.h"
#include "archipelago/core/log.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/runtime/checkpoint_json.h"
#include "archipelago/runtime/trace.h"

namespace archipelago::runtime {

namespace fs = std::filesystem;
namespace {

constexpr int kFormatVersion = kCheckpointFormatVersion;

// The text of one of the checkpoint's JSON files; checkpoint_json.h parses it.
core::Result<std::string> readText(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return core::notFound("missing '" + p.string() + "'");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return core::dataLoss("cannot read '" + p.string() + "'");
  return text;
}

}  // namespace

std::string checkpointDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

namespace {

// Writes the files of one directory into a temporary sibling, then its
// manifest (sha256 and size of each file, written last: a directory without
// it is never loaded), then publishes it as root/name (replacing an older
// one of the same name).
core::Status writeDirAtomic(const fs::path& root, const std::string& name, int64_t step,
                            const std::function<core::Result<std::vector<std::string>>(const fs::path&)>& write) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return core::unavailable("cannot create '" + root.string() + "': " + ec.message());
  fs::path final_dir = root / name;
  fs::path tmp = root / (name + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return core::unavailable("cannot create '" + tmp.string() + "': " + ec.message());
  ARCH_ASSIGN_OR_RETURN(auto names, write(tmp));
  nlohmann::json files = nlohmann::json::object();
  for (const auto& f : names) {
    ARCH_ASSIGN_OR_RETURN(std::string sha, core::sha256File(tmp / f));
    files[f] = {{"sha256", sha}, {"bytes", fs::file_size(tmp / f)}};
  }
  nlohmann::json manifest = {{"format_version", kFormatVersion}, {"step", step}, {"files", files}};
  ARCH_RETURN_IF_ERROR(core::writeFileAtomic(tmp / "manifest.json", manifest.dump(2)));
  return core::replaceDirectoryAtomic(tmp, final_dir);
}

// Step of "step_00000050" or "step_00000050.rank_3"; -1 for other names.
int64_t stepOfName(const std::string& name) {
  if (name.rfind("step_", 0) != 0) return -1;
  try {
    return std::stoll(name.substr(5, name.find('.') == std::string::npos ? std::string::npos : name.find('.') - 5));
  } catch (const std::exception&) {
    return -1;
  }
}

// Keeps the newest keep_last checkpoints and the rank parts of those (parts
// of a step older than every kept checkpoint belong to nothing anymore).
void prune(const std::string& run_dir, int64_t keep_last) {
  auto all = listCheckpoints(run_dir);
  const size_t keep = static_cast<size_t>(std::max<int64_t>(keep_last, 1));
  std::error_code ec;
  for (size_t i = keep; i < all.size(); ++i) fs::remove_all(all[i], ec);
  if (all.empty()) return;
  const int64_t oldest_kept = stepOfName(fs::path(all[std::min(keep, all.size()) - 1]).filename().string());
  for (const auto& e : fs::directory_iterator(fs::path(run_dir) / "checkpoints", ec)) {
    const auto name = e.path().filename().string();
    if (name.find(".rank_") == std::string::npos || name.find(".tmp") != std::string::npos) continue;
    if (const int64_t st = stepOfName(name); st >= 0 && st < oldest_kept) fs::remove_all(e.path(), ec);
  }
}

core::Status verifyManifest(const fs::path& dir) {
  const fs::path path = dir / "manifest.json";
  ARCH_ASSIGN_OR_RETURN(std::string text, readText(path));
  ARCH_ASSIGN_OR_RETURN(CheckpointManifest manifest, parseCheckpointManifest(text, path.string()));
  for (const auto& entry : manifest.files) {
    // parseCheckpointManifest only lets plain names through: f is inside dir.
    const fs::path f = dir / entry.name;
    std::error_code ec;
    const auto status = fs::status(f, ec);
    if (!fs::exists(status)) return core::dataLoss("checkpoint file '" + f.string() + "' is missing");
    if (!fs::is_regular_file(status)) return core::dataLoss("checkpoint file '" + f.string() + "' is not a regular file");
    const uintmax_t size = fs::file_size(f, ec);
    if (ec) return core::dataLoss("checkpoint file '" + f.string() + "': " + ec.message());
    if (size != entry.bytes) {
      return core::dataLoss("checkpoint file '" + f.string() + "' has " + std::to_string(size) +
                            " bytes, manifest says " + std::to_string(entry.bytes) + " (truncated or replaced)");
    }
    ARCH_ASSIGN_OR_RETURN(std::string sha, core::sha256File(f));
    if (sha != entry.sha256) {
      return core::dataLoss("checkpoint file '" + f.string() + "' fails its sha256 check (corrupted)");
    }
  }
  return core::okStatus();
}

}  // namespace

std::string checkpointPartDirName(int64_t step, int rank) {
  return checkpointDirName(step) + ".rank_" + std::to_string(rank);
}

core::Status writeCheckpoint(const std::string& run_dir, const CheckpointState& s, int64_t keep_last) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  if (s.part_rank >= 0) {
    ARCH_RETURN_IF_ERROR(writeDirAtomic(root, checkpointPartDirName(s.step, s.part_rank), s.step,
                                        [&](const fs::path& tmp) -> core::Result<std::vector<std::string>> {
      ARCH_RETURN_IF_ERROR(model::writeSafetensors((tmp / "part.safetensors").string(), s.optimizer,
                                                   {{"rank", std::to_string(s.part_rank)}, {"step", std::to_string(s.step)}}));
      nlohmann::json state = {{"step", s.step}, {"rank", s.part_rank}, {"optimizer_step", s.optimizer_step},
                              {"extra", s.extra}};
      ARCH_RETURN_IF_ERROR(core::writeFileAtomic(tmp / "state.json", state.dump(2)));
      return std::vector<std::string>{"part.safetensors", "state.json"};
    }));
    prune(run_dir, keep_last);
    return core::okStatus();
  }
  ARCH_RETURN_IF_ERROR(writeDirAtomic(root, checkpointDirName(s.step), s.step,
                                      [&](const fs::path& tmp) -> core::Result<std::vector<std::string>> {
    ARCH_RETURN_IF_ERROR(model::writeSafetensors((tmp / "model.safetensors").string(), s.weights,
                                                 {{"format", "pt"}, {"step", std::to_string(s.step)}}));
    ARCH_RETURN_IF_ERROR(model::writeSafetensors((tmp / "optimizer.safetensors").string(), s.optimizer,
                                                 {{"optimizer", "adamw"}, {"step", std::to_string(s.optimizer_step)}}));
    ARCH_RETURN_IF_ERROR(core::writeFileAtomic(tmp / "config.json", model::hfConfigJson(s.model)));
    nlohmann::json state = {{"step", s.step},
                            {"data_position", s.data_position},
                            {"shares", s.shares},
                            {"optimizer_step", s.optimizer_step},
                            {"membership", s.membership},
                            {"extra", s.extra},
                            {"job_yaml", s.job_yaml}};
    ARCH_RETURN_IF_ERROR(core::writeFileAtomic(tmp / "state.json", state.dump(2)));
    return std::vector<std::string>{"model.safetensors", "optimizer.safetensors", "config.json", "state.json"};
  }));
  prune(run_dir, keep_last);
  return core::okStatus();
}

core::Status verifyCheckpoint(const std::string& ckpt_dir) {
  ARCH_RETURN_IF_ERROR(verifyManifest(ckpt_dir));
  const fs::path path = fs::path(ckpt_dir) / "state.json";
  ARCH_ASSIGN_OR_RETURN(std::string text, readText(path));
  ARCH_ASSIGN_OR_RETURN(CheckpointStateFields state, parseCheckpointState(text, path.string()));
  for (const auto& part : state.parts) {
    const fs::path dir = ckpt_dir + ".rank_" + std::to_string(part.rank);
    std::error_code ec;
    if (!fs::exists(dir / "manifest.json", ec)) {
      return core::dataLoss("checkpoint '" + ckpt_dir + "' is incomplete: rank part '" + dir.string() +
                            "' is missing (that rank did not finish writing it)");
    }
    ARCH_RETURN_IF_ERROR(verifyManifest(dir));
  }
  return core::okStatus();
}

core::Result<CheckpointState> loadCheckpoint(const std::string& ckpt_dir) {
  ARCH_RETURN_IF_ERROR(verifyCheckpoint(ckpt_dir));
  fs::path dir(ckpt_dir);
  ARCH_ASSIGN_OR_RETURN(std::string text, readText(dir / "state.json"));
  ARCH_ASSIGN_OR_RETURN(CheckpointStateFields state, parseCheckpointState(text, (dir / "state.json").string()));
  CheckpointState s;
  s.step = state.step;
  s.data_position = state.data_position;
  s.shares = std::move(state.shares);
  s.optimizer_step = state.optimizer_step;
  s.membership = std::move(state.membership);
  s.extra = std::move(state.extra);
  s.job_yaml = std::move(state.job_yaml);
  ARCH_ASSIGN_OR_RETURN(auto weights, model::readSafetensors(dir / "model.safetensors"));
  ARCH_ASSIGN_OR_RETURN(auto optimizer, model::readSafetensors(dir / "optimizer.safetensors"));
  s.weights = std::move(weights.tensors);
  s.optimizer = std::move(optimizer.tensors);
  return s;
}

core::Result<CheckpointState> loadCheckpointPart(const std::string& ckpt_dir, int rank) {
  const fs::path dir = ckpt_dir + ".rank_" + std::to_string(rank);
  std::error_code ec;
  if (!fs::exists(dir / "manifest.json", ec)) {
    return core::notFound("checkpoint '" + ckpt_dir + "' has no part of rank " + std::to_string(rank));
  }
  ARCH_RETURN_IF_ERROR(verifyManifest(dir));
  ARCH_ASSIGN_OR_RETURN(std::string text, readText(dir / "state.json"));
  ARCH_ASSIGN_OR_RETURN(CheckpointPartFields state, parseCheckpointPartState(text, (dir / "state.json").string()));
  CheckpointState s;
  s.step = state.step;
  s.part_rank = state.rank;
  s.optimizer_step = state.optimizer_step;
  s.extra = std::move(state.extra);
  ARCH_ASSIGN_OR_RETURN(auto tensors, model::readSafetensors(dir / "part.safetensors"));
  s.optimizer = std::move(tensors.tensors);
  return s;
}

std::vector<std::string> listCheckpoints(const std::string& run_dir) {
  std::vector<std::string> out;
  fs::path root = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    auto name = e.path().filename().string();
    if (e.is_directory() && name.rfind("step_", 0) == 0 && name.find('.') == std::string::npos) {
      out.push_back(e.path().string());
    }
  }
  std::sort(out.begin(), out.end(), std::greater<>());
  return out;
}

core::Result<std::string> latestValidCheckpoint(const std::string& run_dir,
                                                std::vector<std::pair<std::string, std::string>>* refused) {
  for (const auto& dir : listCheckpoints(run_dir)) {
    core::Status st = verifyCheckpoint(dir);
    if (st.isOk()) return dir;
    ARCH_LOG_WARN("refusing checkpoint {}: {}", dir, st.message());
    if (refused) refused->push_back({dir, st.message()});
  }
  return core::notFound("no valid checkpoint under '" + run_dir + "/checkpoints'");
}

CheckpointWriter::CheckpointWriter(std::string run_dir, int64_t keep_last)
    : run_dir_(std::move(run_dir)), keep_last_(keep_last) {}

void CheckpointWriter::submit(CheckpointState state) {
  // shared_ptr: the queue's tasks are copyable std::functions; the snapshot is not copied.
  auto s = std::make_shared<CheckpointState>(std::move(state));
  queue_.submit([this, s]() -> core::Status {
    core::Status st = writeCheckpoint(run_dir_, *s, keep_last_);
    if (!st.isOk()) ARCH_LOG_ERROR("checkpoint at step {} failed: {}", s->step, st.toString());
    return st;
  });
}

core::Status CheckpointWriter::drain() { return queue_.drain(); }

core::Result<std::string> resolveCheckpointPath(const std::string& path) {
  std::error_code ec;
  if (fs::exists(fs::path(path) / "manifest.json", ec)) return path;
  if (fs::is_directory(fs::path(path) / "checkpoints", ec)) return latestValidCheckpoint(path);
  return core::notFound("'" + path + "' is neither a checkpoint (no manifest.json) nor a run directory (no "
                        "checkpoints/): pass RUN_DIR or RUN_DIR/checkpoints/step_N");
}

core::Result<core::JobConfig> checkpointJob(const CheckpointState& ck) {
  if (ck.job_yaml.empty()) return core::notFound("the checkpoint's state.json holds no job");
  // loadJob reads files (a job may name its cluster file beside it); the
  // checkpoint's job is self-contained, so a private temporary file will do.
  ARCH_ASSIGN_OR_RETURN(fs::path tmp, core::makeSiblingTempDir(fs::temp_directory_path() / "archipelago-job", "-"));
  const fs::path file = tmp / "job.yaml";
  core::Status st = core::writeFile(file, ck.job_yaml);
  core::Result<core::LoadedJob> job = st.isOk() ? core::loadJob(file.string(), core::LoadOptions{.use_process_env = false}) : st;
  std::error_code ec;
  fs::remove_all(tmp, ec);
  if (!job.isOk()) return job.status().withContext("the checkpoint's job (state.json job_yaml)");
  return job->job;
}

}  // namespace archipelago::runtime
