// Shared by the layout tests (pipeline, tensor-parallel, ZeRO): a small
// job over the test corpus, its single-process reference loss curve, and the
// check that a multi-process run's rank-0 curve follows it.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "archipelago/data/dataset.h"
#include "archipelago/model/transformer.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime::testutil {

inline std::string jobYaml(const fs::path &run_dir, const std::string &islands,
                           int steps, const std::string &model_extra,
                           const std::string &strategy,
                           const std::string &train_extra = "") {
  std::ostringstream o;
  o << "cluster:\n  islands:\n"
    << islands << "\n"
    << "model: {dim: 32, n_layers: 4, n_heads: 2, max_seq_len: 32"
    << model_extra << "}\n"
    << "data: {dir: " << tinyDataDir().string() << ", seq_len: 32}\n"
    << "train: {steps: " << steps
    << ", global_batch: 8, micro_batch: 2, lr: 0.003, warmup_steps: 3, "
       "eval_every: 0, "
    << "rebalance: false" << train_extra << "}\n"
    << "strategy: " << strategy << "\n"
    << "checkpoint: {every: 0, keep_last: 3}\n"
    << "run_dir: " << run_dir.string() << "\n";
  return o.str();
}

// The losses of `yaml` trained by one process in this one (the reference
// curve); with `metrics`, its metrics.jsonl in the job's run_dir too.
inline std::vector<double> referenceOf(const std::string &yaml,
                                       const std::string &name,
                                       bool metrics = false) {
  auto job = loadJobText(yaml, name);
  TrainerOptions o;
  o.job = job;
  o.run_dir = job.run_dir;
  o.write_metrics = metrics;
  auto s = runTrainer(o);
  EXPECT_TRUE(s.isOk()) << s.status().toString();
  return s.isOk() ? s->losses : std::vector<double>{};
}

inline std::vector<double> reference(const std::string &name, int steps,
                                     const std::string &model_extra) {
  return referenceOf(jobYaml(scratchRoot() / name, "    - {name: a, count: 1}",
                             steps, model_extra, "{kind: sync}"),
                     name);
}

// Gradient clipping at `clip`, far below these runs' gradient norms, so
// every step's update depends on the global norm: a part that counts a
// tensor twice (or not at all) leaves the curve.
inline std::string clipped(std::string yaml, double clip = 0.05) {
  yaml.replace(yaml.find("rebalance: false"), 16,
               "rebalance: false, grad_clip: " + std::to_string(clip));
  return yaml;
}

// The single-process reference of a clipped job, its metrics (step records
// with the global norm, for expectGradNorms) in scratchRoot() / name.
inline std::vector<double> clippedReference(const std::string &name, int steps,
                                            const std::string &model_extra) {
  return referenceOf(clipped(jobYaml(scratchRoot() / name, "    - {name: a, count: 1}",
                                     steps, model_extra, "{kind: sync}")),
                     name, true);
}

// Every step's global gradient norm (rank 0's step records) equals the
// reference run's within `tol` relative: a part that counts a tensor twice
// or not at all moves it by far more than summation order does. A run cut
// short compares its steps up to `last_step` (-1: every reference step).
inline void expectGradNorms(const fs::path &run, const fs::path &ref_run,
                            double tol, const std::string &what, int64_t last_step = -1) {
  auto norms = [&](const fs::path &dir) {
    std::map<int64_t, double> out;
    for (const auto &j : metricLines(dir, "step")) {
      const int64_t step = j["step"].get<int64_t>();
      if (j.value("rank", -1) == 0 && (last_step < 0 || step <= last_step))
        out[step] = j["grad_norm"].get<double>();
    }
    return out;
  };
  const auto got = norms(run), want = norms(ref_run);
  ASSERT_FALSE(want.empty()) << what << ": no reference step records";
  ASSERT_EQ(got.size(), want.size()) << what;
  for (const auto &[step, n] : want) {
    ASSERT_TRUE(got.count(step)) << what << ": step " << step;
    EXPECT_NEAR(got.at(step), n, tol * n) << what << ": grad norm of step " << step;
  }
}

// What rank 0 of a launched run logged.
inline std::string rank0Log(const fs::path &run) {
  std::ostringstream log;
  log << std::ifstream(run / "logs" / "rank0.log").rdbuf();
  return log.str();
}

// After every outer step (`outer` records by sent_step) the ranks of each
// pair hold the same tensors in two islands and bit-identical anchors and
// momenta (SHA-256 digests); the pairs hold different tensors.
inline void expectOuterDigestsPaired(const fs::path &run, int steps,
                                     const std::vector<std::pair<int, int>> &pairs,
                                     const std::string &what) {
  std::map<int64_t, std::map<int, std::string>> digests;
  for (const auto &j : metricLines(run, "outer")) {
    digests[j["sent_step"].get<int64_t>()][j["rank"].get<int>()] =
        j["digest"].get<std::string>();
  }
  ASSERT_EQ(digests.size(), static_cast<size_t>(steps)) << what;
  for (const auto &[step, by_rank] : digests) {
    ASSERT_EQ(by_rank.size(), 2 * pairs.size()) << what << ": sent_step " << step;
    for (const auto &[a, b] : pairs) {
      EXPECT_EQ(by_rank.at(a), by_rank.at(b))
          << what << ": ranks " << a << ", " << b << ", sent_step " << step;
    }
    EXPECT_NE(by_rank.at(pairs[0].first), by_rank.at(pairs[1].first)) << what;
  }
}

inline void expectCurve(const fs::path &run, const std::vector<double> &ref,
                        int from_step, int to_step, double tol,
                        const std::string &what) {
  ASSERT_GE(ref.size(), static_cast<size_t>(to_step)) << what << ": reference curve";
  auto losses = testutil::rank0Losses(run);
  for (int s = from_step; s <= to_step; ++s) {
    ASSERT_TRUE(losses.count(s)) << what << ": no loss for step " << s;
    EXPECT_NEAR(losses[s], ref[static_cast<size_t>(s - 1)], tol * ref[0])
        << what << " step " << s;
  }
}

// The planner's memory model (plan/worker_memory.h) counts each worker's
// model state as the runtime allocates it: every rank's `memory` record
// must carry the state_bytes its step records measure from its tensors
// (ZeRO-3's gathered-layer pool excepted: its peak depends on the
// schedule, and the model only approximates it).
inline void expectPredictedStateMatches(const fs::path &run, int ranks, const std::string &what) {
  std::map<int, double> predicted, measured;
  for (const auto &j : metricLines(run, "memory")) predicted[j["rank"].get<int>()] = j["state_bytes"].get<double>();
  for (const auto &j : metricLines(run, "step")) {
    if (j.contains("state_bytes")) measured[j["rank"].get<int>()] = j["state_bytes"].get<double>();
  }
  ASSERT_EQ(static_cast<int>(predicted.size()), ranks) << what << ": memory records";
  for (const auto &[r, bytes] : predicted) {
    ASSERT_TRUE(measured.count(r)) << what << ": no state_bytes of rank " << r;
    EXPECT_NEAR(bytes, measured[r], 1e-9 * measured[r]) << what << ": rank " << r;
  }
}

// The model a checkpoint's job file describes (vocab_size 0 there means
// "from the data", as the trainer resolves it).
inline core::ModelConfig checkpointModel(const CheckpointState &ck) {
  core::ModelConfig mc = loadJobText(ck.job_yaml, "ck_model").model;
  if (mc.vocab_size == 0) {
    auto ds = data::PreparedDataset::open(tinyDataDir());
    EXPECT_TRUE(ds.isOk()) << ds.status().toString();
    if (ds.isOk())
      mc.vocab_size = (*ds)->vocabSize();
  }
  return *model::resolveModelConfig(mc);
}

// Plain SGD, outer lr 1, no momentum, H = 1: DiLoCo is synchronous SGD
// (the identity the data-parallel DiLoCo test uses), so a layout on each of
// two islands must follow the single-process curve.
inline std::string sgdDiloco(std::string yaml) {
  yaml.replace(yaml.find("lr: 0.003, warmup_steps: 3"), 26, "optimizer: sgd, lr: 0.5, grad_clip: 0, warmup_steps: 0");
  return yaml;
}

// The single-process curve of the identity DiLoCo (sgdDiloco), trained in
// scratchRoot() / name: what a DiLoCo run of any layout must follow.
inline std::vector<double> sgdDilocoReference(const std::string &name, int steps,
                                              const std::string &model_extra = "") {
  return referenceOf(sgdDiloco(jobYaml(scratchRoot() / name, "    - {name: a, count: 1}", steps,
                                       model_extra, "{kind: sync}")),
                     name);
}

constexpr int kSteps = 20;
constexpr double kTol =
    2e-5; // relative to the first loss (~5.5): fp32 summation-order noise

// Trains `strategy` on `islands` (clipped every step) through the binary
// and expects the single-process run's curve (kTol) and every step's
// global norm (1e-5) of the same model; returns the run directory.
inline fs::path expectClippedRunMatches(const std::string &name, const std::string &islands, int steps,
                                        const std::string &model_extra, const std::string &strategy,
                                        const std::string &what) {
  auto ref = clippedReference(name + "_ref", steps, model_extra);
  fs::path run = scratchRoot() / name;
  EXPECT_EQ(runTrain(clipped(jobYaml(run, islands, steps, model_extra, strategy)), name), 0) << outputOf(name);
  expectCurve(run, ref, 1, steps, kTol, what);
  expectGradNorms(run, scratchRoot() / (name + "_ref"), 1e-5, what);
  return run;
}

} // namespace archipelago::runtime::testutil
