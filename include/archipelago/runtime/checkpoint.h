// Checkpoints: snapshot in memory (the only part that blocks training), then
// written in the background into a temporary directory that is renamed into
// place, so a crash mid-write never leaves a checkpoint that looks complete.
//
//   RUN_DIR/checkpoints/step_00000050/
//     model.safetensors      weights, Hugging Face tensor names
//     config.json            HF-style architecture description
//     optimizer.safetensors  AdamW exp_avg / exp_avg_sq (flat, full) + step
//     state.json             step, data position, batch shares, membership, job
//     manifest.json          format version, step, sha256 + size of every file
//
// A checkpoint is valid only if manifest.json exists and every file matches
// its sha256; loading picks the newest valid one and says which were refused.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::runtime {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct CheckpointState {
  int64_t step = 0;           // optimizer steps completed
  int64_t data_position = 0;  // samples consumed by the training sampler
  std::vector<int64_t> shares;
  int64_t optimizer_step = 0;
  nlohmann::json membership;  // ranks, islands, epoch
  nlohmann::json extra;       // strategy state (outer step, rebalancer, ...)
  std::string job_yaml;       // the resolved job
  core::ModelConfig model;    // for config.json
  NamedTensors weights;       // CPU fp32 copies (HF names)
  NamedTensors optimizer;     // CPU copies ("exp_avg", "exp_avg_sq", ...)
};

std::string checkpointDirName(int64_t step);  // "step_00000050"

// Writes `state` to RUN_DIR/checkpoints/step_N atomically and prunes to the
// newest keep_last. Synchronous; CheckpointWriter runs it in the background.
core::Status writeCheckpoint(const std::string& run_dir, const CheckpointState& state, int64_t keep_last);

// Verifies manifest and checksums of one checkpoint directory.
core::Status verifyCheckpoint(const std::string& ckpt_dir);
core::Result<CheckpointState> loadCheckpoint(const std::string& ckpt_dir);
// Checkpoint directories of a run, newest first.
std::vector<std::string> listCheckpoints(const std::string& run_dir);
// The newest checkpoint that verifies; refused ones are logged with the reason
// and returned in `refused` (dir, reason). kNotFound if none is valid.
core::Result<std::string> latestValidCheckpoint(const std::string& run_dir,
                                                std::vector<std::pair<std::string, std::string>>* refused = nullptr);

// Background writer: submit() hands over a snapshot and returns at once;
// one write runs at a time, newer snapshots queue behind it.
class CheckpointWriter {
 public:
  CheckpointWriter(std::string run_dir, int64_t keep_last);
  ~CheckpointWriter();
  void submit(CheckpointState state);
  // Blocks until every submitted snapshot is written; returns the first error.
  core::Status drain();

 private:
  void loop();
  std::string run_dir_;
  int64_t keep_last_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<CheckpointState> queue_;
  bool busy_ = false;
  bool stop_ = false;
  core::Status error_;
  std::thread thread_;
};

}  // namespace archipelago::runtime
