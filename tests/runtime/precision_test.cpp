// Devices and dtypes of the training loop (docs/devices.md "Devices",
// "Dtypes"): placement and its errors, fp32 master weights under bf16
// compute, islands computing in different dtypes whose replicas stay
// bit-identical (checked by the loop's replica digest after every step),
// bf16 gradient reduction, and dynamic loss scaling. References: the fp32
// single-process run of the same job, and exact arithmetic where scaling by
// a power of two must change nothing.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/core/workers.h"
#include "archipelago/model/device.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/runtime/checkpoint.h"
#include "archipelago/runtime/flat_params.h"
#include "archipelago/runtime/loss_scaler.h"
#include "archipelago/runtime/placement.h"
#include "archipelago/runtime/trainer.h"
#include "runtime/runtime_test_util.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testutil::loadJobText;
using testutil::metricLines;
using testutil::outputOf;
using testutil::scratchRoot;
using testutil::tinyDataDir;

std::string job(const std::string& name, const std::string& islands, int steps, const std::string& train_extra = "",
                const std::string& model_extra = "", int every = 0) {
  std::ostringstream o;
  o << "cluster:\n  islands:\n" << islands << "\n"
    << "model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32" << model_extra << "}\n"
    << "data: {dir: " << tinyDataDir().string() << ", seq_len: 32}\n"
    << "train: {steps: " << steps << ", global_batch: 8, lr: 0.003, warmup_steps: 3, eval_every: 0, rebalance: false"
    << train_extra << "}\n"
    << "checkpoint: {every: " << every << ", keep_last: 2}\n"
    << "run_dir: " << (scratchRoot() / name).string() << "\n";
  return o.str();
}

core::Result<TrainSummary> single(const std::string& name, const std::string& yaml) {
  auto j = loadJobText(yaml, name);
  TrainerOptions o;
  o.job = j;
  o.run_dir = j.run_dir;
  fs::create_directories(o.run_dir);
  return runTrainer(o);
}

// ---- placement -----------------------------------------------------------------

TEST(Placement, CatalogKindsMapToTorchDeviceTypes) {
  EXPECT_EQ(*torchDeviceOfKind("cpu", "f"), "cpu");
  EXPECT_EQ(*torchDeviceOfKind("cpu-core", "f"), "cpu");
  EXPECT_EQ(*torchDeviceOfKind("h100", "f"), "cuda");
  EXPECT_EQ(*torchDeviceOfKind("mi300x", "f"), "cuda");  // ROCm builds of libtorch report cuda
  EXPECT_EQ(*torchDeviceOfKind("ascend910b", "f"), "privateuseone");
  auto bad = torchDeviceOfKind("tpu-v9", "cluster.islands[1]");
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("cluster.islands[1].device: 'tpu-v9'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("torch_device"));
}

TEST(Placement, IndexComesFromTheSpecThenTheLocalRank) {
  EXPECT_EQ(model::chooseDevice("cuda:3", 1)->str(), "cuda:3");
  EXPECT_EQ(model::chooseDevice("cuda", 2)->str(), "cuda:2");
  EXPECT_EQ(model::chooseDevice("cpu", 5)->str(), "cpu");
  EXPECT_FALSE(model::parseDevice("npu").isOk());  // not a type libtorch knows: its list in the error
  EXPECT_THAT(model::parseDevice("npu").status().message(), HasSubstr("privateuseone"));
}

TEST(Placement, AWorkerOnTheCpuIsProbedAndGetsItsIslandsDtype) {
  auto j = loadJobText(job("place", "    - {name: a, count: 1}\n    - {name: b, count: 1, dtype: bf16, threads: 2}", 1),
                       "place");
  const auto ws = core::workersOf(j);
  auto a = placeWorker(j, ws[0]);
  ASSERT_TRUE(a.isOk()) << a.status().toString();
  EXPECT_TRUE(a->device.is_cpu());
  EXPECT_EQ(a->compute, torch::kFloat32);
  auto b = placeWorker(j, ws[1]);
  ASSERT_TRUE(b.isOk()) << b.status().toString();
  EXPECT_EQ(b->compute, torch::kBFloat16);
  EXPECT_EQ(ws[1].threads, 2);
  EXPECT_EQ(ws[0].threads, 1);
}

TEST(Placement, ADeviceThisHostLacksIsRefusedNamingIslandDeviceAndLibtorch) {
  if (model::probeDevice(torch::Device("cuda:0")).isOk()) GTEST_SKIP() << "this host has a CUDA device";
  auto j = loadJobText(job("nocuda", "    - {name: gpus, device: h100, count: 1}", 1), "nocuda");
  auto p = placeWorker(j, core::workersOf(j)[0]);
  ASSERT_FALSE(p.isOk());
  const std::string m = p.status().message();
  EXPECT_THAT(m, HasSubstr("island 'gpus' (device h100, torch_device auto -> cuda:0)"));
  EXPECT_THAT(m, HasSubstr("libtorch sees 0 cuda devices"));
  EXPECT_THAT(m, HasSubstr("cluster.islands[0].torch_device"));
}

TEST(Placement, TheLauncherStopsTheWholeJobWhenOneIslandHasNoDevice) {
  if (model::probeDevice(torch::Device("cuda:0")).isOk()) GTEST_SKIP() << "this host has a CUDA device";
  const std::string y = job("nocuda_job", "    - {name: cpus, count: 1}\n    - {name: gpus, count: 1, torch_device: cuda}",
                            3, "", "", 1);
  EXPECT_NE(testutil::runTrain(y, "nocuda_job"), 0);
  const std::string out = outputOf("nocuda_job");
  EXPECT_THAT(out, HasSubstr("island 'gpus'"));
  EXPECT_THAT(out, HasSubstr("cuda"));
  // Nothing started half-way: no step was taken, no checkpoint written.
  EXPECT_TRUE(metricLines(scratchRoot() / "nocuda_job", "step").empty());
  EXPECT_FALSE(fs::exists(scratchRoot() / "nocuda_job" / "checkpoints" / checkpointDirName(1)));
}

// ---- flat buffers in a compute dtype ----------------------------------------------

TEST(FlatParamsMixed, ModuleComputesInBf16OnViewsWhileMastersStayFp32) {
  auto w = torch::randn({4, 3});
  auto g = torch::randn({5});
  torch::nn::Linear lin(3, 4);
  std::vector<std::pair<std::string, torch::Tensor>> named{{"w", lin->weight}, {"b", lin->bias}};
  const auto w0 = lin->weight.detach().clone();
  FlatParams f = FlatParams::bind(named, torch::kBFloat16);
  ASSERT_TRUE(f.mixed());
  EXPECT_EQ(lin->weight.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(f.params().scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(f.params().narrow(0, 0, 12).view({4, 3}), w0));  // masters: the exact fp32 values
  EXPECT_TRUE(torch::equal(lin->weight.detach(), w0.to(torch::kBFloat16)));
  // The optimizer moves the masters; syncCompute rounds them into the module.
  f.params().add_(1e-3);
  EXPECT_TRUE(torch::equal(lin->weight.detach(), w0.to(torch::kBFloat16)));
  f.syncCompute();
  EXPECT_TRUE(torch::equal(lin->weight.detach(), (w0 + 1e-3).to(torch::kBFloat16)));
  // Backward writes bf16 gradients; upcastGrads widens them exactly.
  auto y = lin->forward(torch::ones({2, 3}, torch::kBFloat16)).sum();
  y.backward();
  f.upcastGrads(0, f.numel());
  EXPECT_TRUE(torch::equal(f.grads(), f.computeGrads().to(torch::kFloat32)));
  EXPECT_EQ(f.grads().narrow(0, 12, 4).sum().item<double>(), 8.0);  // d(sum)/d(bias) = batch 2, four outputs
}

// ---- loss scaling --------------------------------------------------------------------

TEST(LossScalerRule, HalvesOnOverflowDoublesAfterAWindowAndRoundTrips) {
  core::TrainConfig tc;
  tc.loss_scale = "dynamic";
  tc.loss_scale_init = 1000;  // rounded down to a power of two
  tc.loss_scale_window = 3;
  LossScaler s(tc, "bf16");
  ASSERT_TRUE(s.enabled());
  EXPECT_EQ(s.scale(), 512);
  EXPECT_FALSE(s.update(false));
  EXPECT_EQ(s.scale(), 256);
  EXPECT_TRUE(s.update(true));
  EXPECT_TRUE(s.update(true));
  EXPECT_EQ(s.scale(), 256);
  EXPECT_TRUE(s.update(true));
  EXPECT_EQ(s.scale(), 512);
  EXPECT_EQ(s.skippedSteps(), 1);
  LossScaler t(tc, "bf16");
  ASSERT_TRUE(t.load(s.state()).isOk());
  EXPECT_EQ(t.state(), s.state());
  EXPECT_FALSE(t.load(nlohmann::json{{"scale", -1}, {"good_steps", 0}}).isOk());
  // auto: dynamic only for fp16 compute.
  core::TrainConfig a;
  EXPECT_TRUE(LossScaler(a, "fp16").enabled());
  EXPECT_FALSE(LossScaler(a, "bf16").enabled());
  EXPECT_EQ(LossScaler(a, "fp32").scale(), 1.0);
}

TEST(LossScaling, APowerOfTwoScaleChangesNothing) {
  const std::string isl = "    - {name: a, count: 1}";
  auto plain = single("ls_plain", job("ls_plain", isl, 8));
  auto scaled = single("ls_scaled", job("ls_scaled", isl, 8, ", loss_scale: dynamic, loss_scale_init: 1024"));
  ASSERT_TRUE(plain.isOk()) << plain.status().toString();
  ASSERT_TRUE(scaled.isOk()) << scaled.status().toString();
  EXPECT_EQ(plain->losses, scaled->losses);  // scaling and unscaling by 2^10 are exact in fp32
}

TEST(LossScaling, OverflowSkipsStepsHalvingTheScaleThenTrains) {
  const std::string isl = "    - {name: a, count: 1}";
  auto s = single("ls_over", job("ls_over", isl, 12, ", loss_scale: dynamic, loss_scale_init: 1.7e38", "", 12));
  ASSERT_TRUE(s.isOk()) << s.status().toString();
  const auto events = metricLines(scratchRoot() / "ls_over", "event");
  int skipped = 0;
  double last_scale = 0;
  for (const auto& e : events) {
    if (e.value("event", "") != "loss_scale") continue;
    ++skipped;
    const std::string d = e.value("detail", "");
    last_scale = std::stod(d.substr(d.rfind(' ') + 1));
  }
  ASSERT_GE(skipped, 1) << "a loss scale of 2^126 must overflow the fp32 gradients";
  EXPECT_LT(skipped, 12);
  EXPECT_EQ(last_scale, std::exp2(126 - skipped));  // 1.7e38 rounds down to 2^126
  EXPECT_LT(s->losses.back(), s->losses.front());
  // The checkpoint carries the scaler: a resume continues with its scale.
  auto ck = loadCheckpoint((scratchRoot() / "ls_over" / "checkpoints" / checkpointDirName(12)).string());
  ASSERT_TRUE(ck.isOk()) << ck.status().toString();
  EXPECT_EQ(ck->extra["loss_scale"]["skipped_steps"].get<int>(), skipped);
}

// ---- compute dtypes --------------------------------------------------------------------

TEST(MixedPrecision, Bf16ComputeFollowsTheFp32CurveWithFp32Masters) {
  const std::string isl = "    - {name: a, count: 1}";
  auto ref = single("mp_fp32", job("mp_fp32", isl, 20));
  auto bf = single("mp_bf16", job("mp_bf16", isl, 20, "", ", dtype: bf16", 20));
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  ASSERT_TRUE(bf.isOk()) << bf.status().toString();
  ASSERT_EQ(bf->losses.size(), ref->losses.size());
  for (size_t i = 0; i < ref->losses.size(); ++i) {
    // bf16 keeps 8 significant bits: the curves agree to about 1%.
    EXPECT_NEAR(bf->losses[i], ref->losses[i], 0.02 * ref->losses[i]) << "step " << i + 1;
  }
  EXPECT_NE(bf->losses, ref->losses);  // it did compute in bf16
  // The checkpoint holds the fp32 masters: most weights are not bf16 values.
  auto ck = loadCheckpoint((scratchRoot() / "mp_bf16" / "checkpoints" / checkpointDirName(20)).string());
  ASSERT_TRUE(ck.isOk()) << ck.status().toString();
  ASSERT_FALSE(ck->weights.empty());
  const auto& w = ck->weights.front().second;
  EXPECT_EQ(w.scalar_type(), torch::kFloat32);
  const double exact = (w.to(torch::kBFloat16).to(torch::kFloat32) == w).to(torch::kDouble).mean().item<double>();
  EXPECT_LT(exact, 0.5);
}

// Two islands computing in bf16 and fp32: the replica digest is compared
// after every step (checkpoint.every: 1) and any divergence is logged and
// repaired as a "resync" event; there must be none.
TEST(MixedPrecision, IslandsInBf16AndFp32StayBitIdenticalEveryStep) {
  const int steps = 10;
  auto ref = single("mix_ref", job("mix_ref", "    - {name: a, count: 1}", steps));
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  const std::string y = job("mix_islands", "    - {name: a, count: 1, dtype: bf16}\n    - {name: b, count: 1}", steps,
                            "", "", 1);
  ASSERT_EQ(testutil::runTrain(y, "mix_islands"), 0) << outputOf("mix_islands");
  const fs::path run = scratchRoot() / "mix_islands";
  const std::string log0 = testutil::fileText(run / "logs" / "rank0.log");
  const std::string log1 = testutil::fileText(run / "logs" / "rank1.log");
  EXPECT_THAT(log0, HasSubstr("cpu bf16 compute"));
  EXPECT_THAT(log1, HasSubstr("cpu fp32 compute"));
  EXPECT_THAT(log0 + log1, ::testing::Not(HasSubstr("differ from the majority")));
  for (const auto& e : metricLines(scratchRoot() / "mix_islands", "event")) EXPECT_NE(e.value("event", ""), "resync");
  const auto losses = testutil::rank0Losses(scratchRoot() / "mix_islands");
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps));
  for (int s = 1; s <= steps; ++s) {
    EXPECT_NEAR(losses.at(s), ref->losses[static_cast<size_t>(s - 1)], 0.02 * ref->losses[0]) << "step " << s;
  }
}

TEST(MixedPrecision, Bf16GradientReductionKeepsReplicasIdentical) {
  const int steps = 8;
  auto ref = single("bfred_ref", job("bfred_ref", "    - {name: a, count: 1}", steps));
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  const std::string y = job("bfred", "    - {name: a, count: 2}", steps, ", reduce_dtype: bf16", "", 1);
  ASSERT_EQ(testutil::runTrain(y, "bfred"), 0) << outputOf("bfred");
  for (const char* log : {"rank0.log", "rank1.log"}) {
    EXPECT_THAT(testutil::fileText(scratchRoot() / "bfred" / "logs" / log), ::testing::Not(HasSubstr("differ from")));
  }
  const auto losses = testutil::rank0Losses(scratchRoot() / "bfred");
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps));
  for (int s = 1; s <= steps; ++s) {
    EXPECT_NEAR(losses.at(s), ref->losses[static_cast<size_t>(s - 1)], 0.01 * ref->losses[0]) << "step " << s;
  }
}

// FP8 linears (EMULATED on the CPU) on one island, bf16 on the other: the
// same replica rule holds (activation scales differ per rank, the reduced
// gradient does not), and the curve stays near the fp32 one.
TEST(MixedPrecision, AnFp8IslandBesideABf16IslandKeepsReplicasIdentical) {
  const int steps = 6;
  auto ref = single("fp8_ref", job("fp8_ref", "    - {name: a, count: 1}", steps));
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  const std::string y = job("fp8_mix", "    - {name: a, count: 1, dtype: fp8}\n    - {name: b, count: 1, dtype: bf16}",
                            steps, "", "", 1);
  ASSERT_EQ(testutil::runTrain(y, "fp8_mix"), 0) << outputOf("fp8_mix");
  const fs::path run = scratchRoot() / "fp8_mix";
  const std::string log0 = testutil::fileText(run / "logs" / "rank0.log");
  EXPECT_THAT(log0, HasSubstr("fp8: 14 linear layers, delayed scaling, EMULATED"));
  for (const char* log : {"rank0.log", "rank1.log"}) {
    EXPECT_THAT(testutil::fileText(run / "logs" / log), ::testing::Not(HasSubstr("differ from")));
  }
  const auto losses = testutil::rank0Losses(run);
  ASSERT_EQ(losses.size(), static_cast<size_t>(steps));
  for (int s = 1; s <= steps; ++s) {
    EXPECT_NEAR(losses.at(s), ref->losses[static_cast<size_t>(s - 1)], 0.03 * ref->losses[0]) << "step " << s;
  }
}

// FP8 delayed scaling records by step (runtime/loop/fp8_steps.cpp): each
// tensor's amax is the largest over the step's micro-batches and every rank
// that computes it, the amax of the whole batch; and a checkpoint keeps the
// histories.
std::map<std::string, torch::Tensor> fp8Histories(const fs::path& run, int64_t step) {
  auto ck = loadCheckpoint((run / "checkpoints" / checkpointDirName(step)).string());
  EXPECT_TRUE(ck.isOk()) << ck.status().toString();
  std::map<std::string, torch::Tensor> out;
  if (!ck.isOk()) return out;
  for (const auto& [name, t] : ck->optimizer) {
    if (name.rfind("fp8.", 0) == 0) out[name] = t;
  }
  return out;
}

// Step 1 starts from the same weights, so its weight amaxes are those of
// the same tensors: a slice's or a holder's maximum, reduced, is the whole
// tensor's. So are the input amaxes where each sample's arithmetic is the
// same as in one process (data parallelism, pipeline stages), up to one bf16
// ulp (a batch of 4 and one of 8 round a few products differently), where a
// rank's own part (half the batch, a stage's micro-batch) misses the largest
// amax of many tensors. `input_tol` is looser where it is not: the first
// step, with empty histories, quantises each operand by its own amax (a
// weight slice's, the tokens an expert got in one call), so activations
// downstream move by FP8 roundings. Gradients pass E5M2 (two mantissa bits)
// on their way down, which turns those ulps into a few percent; later steps
// start from weights that differ in the last bits (the sum's order), so only
// step 1 is compared.
void expectWholeBatchAmaxes(const std::string& name, const std::string& strategy, const std::string& model_extra,
                            size_t linears, double input_tol = 0.01) {
  const int steps = 2;
  const std::string fp8 = ", fp8_amax_history: 4";
  auto ref = single(name + "_ref", job(name + "_ref", "    - {name: a, count: 1, dtype: fp8}", steps, fp8, model_extra));
  ASSERT_TRUE(ref.isOk()) << ref.status().toString();
  const std::string y = job(name, "    - {name: a, count: 2, dtype: fp8}", steps, fp8, model_extra) + strategy;
  ASSERT_EQ(testutil::runTrain(y, name), 0) << outputOf(name);
  const auto want = fp8Histories(scratchRoot() / (name + "_ref"), steps);
  const auto got = fp8Histories(scratchRoot() / name, steps);
  ASSERT_EQ(want.size(), linears * 3);  // input, weight, grad
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [tensor, w] : want) {
    ASSERT_TRUE(got.count(tensor)) << tensor;
    const torch::Tensor g = got.at(tensor);
    ASSERT_EQ(w.numel(), 5) << tensor;  // 4 amaxes newest first, then the step count
    EXPECT_EQ(w[4].item<float>(), steps) << tensor;
    EXPECT_EQ(g[4].item<float>(), steps) << tensor;
    ASSERT_GT(w[1].item<double>(), 0) << tensor;
    const double tol = tensor.ends_with(".grad") ? 0.1 : tensor.ends_with(".input") ? input_tol : 0.01;
    EXPECT_NEAR(g[1].item<double>(), w[1].item<double>(), tol * w[1].item<double>()) << tensor << ": step 1";
  }
  const auto losses = testutil::rank0Losses(scratchRoot() / name);
  for (int s = 1; s <= steps; ++s) EXPECT_NEAR(losses.at(s), ref->losses[static_cast<size_t>(s - 1)], 1e-3) << s;
}

TEST(Fp8Steps, TwoReplicasRecordTheAmaxesOfTheWholeBatch) {
  expectWholeBatchAmaxes("fp8s", "", "", 14);  // 2 layers x 7 linears
}

// Layouts that split the model reduce by linear name: the replicas of a
// stage or an expert, and a tensor-parallel group's slices of one weight
// and one batch, meet in the same row.
TEST(Fp8Steps, SplitLayoutsRecordTheAmaxesOfTheWholeBatch) {
  expectWholeBatchAmaxes("fp8s_pp", "strategy: {kind: sync, pipeline_stages: 2}\n", "", 14);
  expectWholeBatchAmaxes("fp8s_tp", "strategy: {kind: sync, tensor_parallel: 2}\n", "", 14, 0.1);
  // 2 layers x (4 attention + 4 experts x 3) linears
  expectWholeBatchAmaxes("fp8s_ep", "strategy: {kind: sync, expert_parallel: 2}\n", ", moe: {num_experts: 4, top_k: 2}",
                         32, 0.1);
}

void expectResumeScalesAsUninterrupted(const std::string& name, const std::string& strategy) {
  const int k = 4;
  const std::string islands = "    - {name: a, count: 2, dtype: fp8}";
  const std::string full = name + "_full", cut = name + "_cut";
  ASSERT_EQ(testutil::runTrain(job(full, islands, 2 * k, "", "", k) + strategy, full), 0) << outputOf(full);
  const std::string y = job(cut, islands, 2 * k, "", "", k) + strategy;
  EXPECT_NE(testutil::runTrain(y, cut + "1", {"--exit-after-step", std::to_string(k)}), 0);
  ASSERT_TRUE(fs::exists(scratchRoot() / cut / "checkpoints" / checkpointDirName(k))) << outputOf(cut + "1");
  ASSERT_EQ(testutil::runTrain(y, cut + "2", {"--resume"}), 0) << outputOf(cut + "2");
  const auto weights = [&](const std::string& run) {
    return testutil::fileText(scratchRoot() / run / "checkpoints" / checkpointDirName(2 * k) / "model.safetensors");
  };
  ASSERT_FALSE(weights(full).empty());
  EXPECT_TRUE(weights(full) == weights(cut)) << name << ": FP8 weights after the resume differ from the uninterrupted run";
  const auto a = fp8Histories(scratchRoot() / full, 2 * k), b = fp8Histories(scratchRoot() / cut, 2 * k);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [tensor, t] : a) EXPECT_TRUE(torch::equal(t, b.at(tensor))) << name << ": " << tensor;
}

TEST(Fp8Steps, AResumedRunScalesAsTheUninterruptedOne) {
  expectResumeScalesAsUninterrupted("fp8r", "");
  expectResumeScalesAsUninterrupted("fp8r_pp", "strategy: {kind: sync, pipeline_stages: 2}\n");
}

// train.check_ops: a worker whose device computes an operator outside
// tolerance (a broken kernel, stood in for by the test hook) refuses to
// start, naming the op, the device and the dtype; nothing is trained.
TEST(Placement, AWorkerWhoseKernelIsWrongRefusesTheJob) {
  const std::string y = job("broken_op", "    - {name: a, count: 2}", 3, "", "", 1);
  ::setenv("ARCHIPELAGO_TEST_BREAK_OP", "rmsnorm", 1);
  const int rc = testutil::runTrain(y, "broken_op");
  ::unsetenv("ARCHIPELAGO_TEST_BREAK_OP");
  EXPECT_NE(rc, 0);
  const std::string all = outputOf("broken_op") + testutil::fileText(scratchRoot() / "broken_op" / "logs" / "rank0.log");
  EXPECT_THAT(all, HasSubstr("rmsnorm"));
  EXPECT_THAT(all, HasSubstr("cpu"));
  EXPECT_THAT(all, HasSubstr("train.check_ops"));
  EXPECT_TRUE(metricLines(scratchRoot() / "broken_op", "step").empty());
}

}  // namespace
}  // namespace archipelago::runtime
