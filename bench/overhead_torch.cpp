// Framework overhead of the trainer (issue: trainer bench). Same model, same
// batch, one process: (a) a bare libtorch loop (forward, backward,
// torch::optim::AdamW, fixed batch already in memory) and (b) the real
// trainer (runTrainer with no communicator: sampler, flat AdamW, clipping,
// metrics, trace). Prints both step times and the ratio (target <= 1.10) as
// a table and one JSON line.
//   bench_overhead_torch [DATA_DIR] [STEPS]
#include <cstdio>
#include <filesystem>
#include <string>

#include <torch/torch.h>

#include "archipelago/core/clock.h"
#include "archipelago/core/config.h"
#include "archipelago/core/host_memory.h"
#include "archipelago/data/dataset.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/trainer.h"

using namespace archipelago;

int main(int argc, char** argv) {
  const std::string data_dir = argc > 1 ? argv[1] : "data/prepared/sotu-byte";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 30;
  auto ds = data::PreparedDataset::open(data_dir);
  if (!ds.isOk()) {
    std::fprintf(stderr, "bench_overhead: %s (prepare it with `archipelago data prepare`)\n", ds.status().toString().c_str());
    return 1;
  }
  core::JobConfig job;
  job.cluster.islands = {core::IslandSpec{}};
  job.cluster.islands[0].name = "local";
  job.model.dim = 128;
  job.model.n_layers = 4;
  job.model.n_heads = 4;
  job.model.max_seq_len = 128;
  job.model.vocab_size = (*ds)->vocabSize();
  job.data.dir = data_dir;
  job.data.seq_len = 128;
  job.train.steps = steps;
  job.train.global_batch = 16;
  job.train.eval_every = 0;
  job.train.grad_clip = 0;
  job.train.weight_decay = 0;
  job.checkpoint.at_exit = false;
  job.checkpoint.every = 0;
  // The trainer's process settings for both loops: one compute thread
  // (model::setComputeThreads also bounds OpenBLAS's own pool, which
  // torch::set_num_threads does not reach) and freed memory kept in the
  // process (core::holdFreedMemory).
  model::setComputeThreads(1);
  core::holdFreedMemory();

  // (a) bare libtorch loop on one fixed batch.
  auto net = model::buildModel(job.model, 42);
  if (!net.isOk()) return 1;
  auto sampler = (*ds)->trainSampler(1, 128);
  auto b = sampler->batchAt(0, {16}, 0);
  auto in = torch::from_blob(b.input.data(), {16, 128}, torch::kInt64).clone();
  auto tg = torch::from_blob(b.target.data(), {16, 128}, torch::kInt64).clone();
  torch::optim::AdamW opt((*net)->parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0));
  double bare = 0;
  for (int s = 0; s < steps; ++s) {
    auto t0 = core::Clock::now();
    opt.zero_grad();
    auto out = (*net)->lossAndStats(in, tg);
    out.loss.backward();
    opt.step();
    if (s > 0) bare += core::secondsSince(t0);
  }
  bare /= (steps - 1);

  // (b) the trainer.
  runtime::TrainerOptions o;
  o.job = job;
  o.run_dir = (std::filesystem::temp_directory_path() / "arch_bench_overhead").string();
  std::filesystem::remove_all(o.run_dir);
  std::filesystem::create_directories(o.run_dir);
  auto sum = runtime::runTrainer(o);
  std::filesystem::remove_all(o.run_dir);
  if (!sum.isOk()) {
    std::fprintf(stderr, "bench_overhead: %s\n", sum.status().toString().c_str());
    return 1;
  }
  const double ours = sum->mean_step_s;
  std::printf("%-36s %10s\n", "loop (1 process, 16x128 tokens)", "s/step");
  std::printf("%-36s %10.4f\n", "bare libtorch (fixed batch)", bare);
  std::printf("%-36s %10.4f\n", "archipelago trainer", ours);
  std::printf("ratio %.3f (target <= 1.10)\n", ours / bare);
  std::printf("{\"bench\":\"overhead\",\"bare_step_s\":%.5f,\"trainer_step_s\":%.5f,\"ratio\":%.4f}\n", bare, ours, ours / bare);
  return 0;
}
