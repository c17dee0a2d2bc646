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
//
// Rank parts (DiLoCo / streaming): between outer steps every island holds
// its own weights and AdamW moments, and every rank its own error-feedback
// residuals, so the writer's files alone cannot resume the other islands
// exactly. Each other rank writes what only it holds into a sibling
//     RUN_DIR/checkpoints/step_00000050.rank_3/
//       part.safetensors  (its island's weights and moments if it leads that
//                          island, its own outer-sync residuals)
//       state.json, manifest.json   (same atomic write and checksums)
// next to its own storage (in a real deployment each data centre writes
// locally; nothing crosses a strait). The writer's state.json lists the
// parts in extra.parts; a checkpoint whose listed part is missing or
// corrupt is not valid, and resume falls back to the previous one.
#pragma once

#include <atomic>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "archipelago/core/background_queue.h"
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
  // >= 0: this is rank part_rank's part (only `optimizer` and
  // optimizer_step are written, see above); -1: the writer's checkpoint.
  int part_rank = -1;
};

std::string checkpointDirName(int64_t step);  // "step_00000050"

// Writes `state` to RUN_DIR/checkpoints/step_N (or its rank part, see
// part_rank) atomically and prunes to the newest keep_last. Synchronous;
// CheckpointWriter runs it in the background.
core::Status writeCheckpoint(const std::string& run_dir, const CheckpointState& state, int64_t keep_last);

// Verifies manifest and checksums of one checkpoint directory.
core::Status verifyCheckpoint(const std::string& ckpt_dir);
core::Result<CheckpointState> loadCheckpoint(const std::string& ckpt_dir);
// "step_00000050.rank_3": rank 3's part of checkpoint step_00000050.
std::string checkpointPartDirName(int64_t step, int rank);
// Rank `rank`'s part of the checkpoint at ckpt_dir (verified); its tensors
// are in `optimizer`. kNotFound if that checkpoint has no such part.
core::Result<CheckpointState> loadCheckpointPart(const std::string& ckpt_dir, int rank);
// The checkpoint `path` names: itself (with manifest.json), or a run
// directory's newest valid one. kNotFound saying what to pass otherwise.
core::Result<std::string> resolveCheckpointPath(const std::string& path);
// The job a checkpoint was written with (state.json's job_yaml).
core::Result<core::JobConfig> checkpointJob(const CheckpointState& ck);
// Checkpoint directories of a run, newest first.
std::vector<std::string> listCheckpoints(const std::string& run_dir);
// The newest checkpoint that verifies; refused ones are logged with the reason
// and returned in `refused` (dir, reason). kNotFound if none is valid.
core::Result<std::string> latestValidCheckpoint(const std::string& run_dir,
                                                std::vector<std::pair<std::string, std::string>>* refused = nullptr);

// Background writer: submit() hands over a snapshot and returns at once;
// one write runs at a time, newer snapshots queue behind it. A failed write
// does not stop later ones (each is a whole checkpoint of its own, and the
// newest good one is what a restart resumes from); the destructor writes
// what is still queued.
class CheckpointWriter {
 public:
  CheckpointWriter(std::string run_dir, int64_t keep_last);
  void submit(CheckpointState state);
  // Blocks until every submitted snapshot is written; returns the first error.
  core::Status drain();

 private:
  std::string run_dir_;
  int64_t keep_last_;
  // Last: its thread uses run_dir_ and keep_last_, so it is joined first.
  core::BackgroundQueue queue_{core::BackgroundQueue::AfterError::kRun};
};

}  // namespace archipelago::runtime
