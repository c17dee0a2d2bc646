// Pipeline parallelism as a part: this rank is one stage of a pipeline of
// consecutive ranks and runs the 1F1B schedule (PipeDream-flush) over the
// micro-batches of its pipeline's share. Activations go forward and their
// gradients backward point to point through the comm layer, sent from a
// background queue so a stage never blocks on a send while its neighbour
// blocks on a send the other way; through strategy.codec where two stages
// sit on different islands.
//
// The stage's replicated tensors are reduced by a DataParallel part over
// the same-stage ranks of all pipelines; this part only schedules.
#pragma once

#include <memory>
#include <vector>

#include "archipelago/comm/codec.h"
#include "archipelago/comm/communicator.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/parallel/part.h"

namespace archipelago::runtime::parallel {

// One operation of a stage's schedule.
struct PipeOp {
  bool forward = true;
  int64_t micro = 0;
};
// 1F1B (PipeDream-flush): stage s runs min(p-s-1, m) warm-up forwards, then
// alternates one forward and one backward, then drains the backwards.
std::vector<PipeOp> oneFOneBSchedule(int stage, int stages, int64_t micro_batches);
// Idle fraction of a 1F1B pipeline with equal stages: (p-1)/(m+p-1).
double oneFOneBBubble(int stages, int64_t micro_batches);
// Micro-batches per step: ceil(n / micro_batch); without train.micro_batch,
// 2 per stage (a pipeline needs m >> p for a small bubble), at most n.
int64_t pipelineMicroCount(int64_t n, int64_t micro_batch, int stages);

struct PipelineOptions {
  int stage = 0;
  int stages = 1;
  int rank = 0;               // this rank in `world`
  int prev_rank = -1;         // stage - 1's rank at this tensor-parallel rank (world rank)
  int next_rank = -1;         // stage + 1's
  int64_t seq_parts = 1;      // sequence parallelism: activations are [micro, seq_len / seq_parts, dim]
  int64_t micro_batch = 0;    // train.micro_batch
  bool recompute = false;     // train.recompute: keep only stage inputs, recompute in backward
  int64_t dim = 0;            // activation width
  torch::ScalarType dtype = torch::kFloat;  // the model's compute dtype
  comm::CodecKind prev_codec = comm::CodecKind::kNone;  // toward stage - 1
  comm::CodecKind next_codec = comm::CodecKind::kNone;  // toward stage + 1
  double slowdown = 1.0;      // EMULATED
};

class PipelineParallel final : public Part {
 public:
  PipelineParallel(model::Transformer net, std::shared_ptr<comm::Group> world, const PipelineOptions& options);
  ~PipelineParallel() override;
  std::string name() const override { return "pipeline"; }
  // Every pipeline runs `count` micro-batches (expert groups of pipelines
  // meet in all-to-alls); 0: pipelineMicroCount of the own share.
  void setAgreedCount(int64_t count) { agreed_count_ = count; }
  // Told around every pass (ZeRO-3 over the stage's replicas; not owned,
  // null: none). A pipeline with fewer micro-batches than StepInput::passes
  // runs the rest of the schedule as idle operations: the hooks' calls of a
  // forward or backward without compute or activations.
  void setPassHooks(PassHooks* hooks) { passes_ = hooks; }

  core::Status forwardBackward(const StepInput& in, StepStats& stats) override;
  // Forward only, the whole share as one micro-batch, stage by stage; the
  // loss (and tokens) on the last stage, zeros elsewhere.
  core::Status evaluate(const data::Batch& batch, int64_t seq_len, double& ce_sum, double& tokens) override;

 private:
  class Sender;
  struct Stash;
  core::Result<torch::Tensor> receive(std::vector<int64_t> shape, comm::CodecKind codec, int src, uint32_t tag,
                                      TraceRecorder* trace, StepStats* stats, const std::string& what);
  std::pair<torch::Tensor, torch::Tensor> runForward(const StepInput& in, int64_t m, int64_t i,
                                                     const torch::Tensor& input, StepStats* record);
  core::Status forwardOp(const StepInput& in, int64_t m, int64_t micro, Stash& st, StepStats& stats);
  core::Status backwardOp(const StepInput& in, int64_t m, int64_t micro, Stash& st, StepStats& stats);
  void idleOp(const PipeOp& op);
  core::Status evaluateRows(const data::Batch& batch, int64_t seq_len, double& ce_sum, double& tokens);

  model::Transformer net_;
  std::shared_ptr<comm::Group> world_;
  PipelineOptions opt_;
  int64_t agreed_count_ = 0;
  PassHooks* passes_ = nullptr;
  EmulatedSlowdown slowdown_;
  std::unique_ptr<Sender> sender_;
};

}  // namespace archipelago::runtime::parallel
