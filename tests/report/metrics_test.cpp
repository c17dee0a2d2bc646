// Tests of the metrics.jsonl schema (report/metrics.h): every record kind
// written with the writer comes back through the reader and the report with
// the same fields, and the reader's tolerance (unknown kinds, old names) holds.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include "archipelago/report/metrics.h"
#include "archipelago/report/report.h"
#include "report/report_test_util.h"

namespace archipelago::report {
namespace {

namespace fs = std::filesystem;

using report::testing::TempDir;

// One record of every kind, with every field set to a value that can be
// told apart from its default.
StepRecord sampleStep(int rank) {
  return StepRecord{.step = 7, .rank = rank, .island = rank == 0 ? "fast" : "slow", .epoch = 2, .loss = 3.25,
                    .local_loss = 3.5, .lr = 0.003, .samples = 8, .tokens = 1024, .compute_s = 0.4, .comm_s = 0.15,
                    .wait_s = 0.05, .data_s = 0.01, .optimizer_s = 0.02, .step_s = 0.6, .compute_cpu_s = 0.39,
                    .cpu_s = 0.45, .minor_faults = 12, .peak_rss_bytes = 3.5e8, .tokens_per_s = 1706.5, .grad_norm = 1.25, .slowdown = 1.5,
                    .share = 8, .commit_s = 0.001, .stage = 1, .micro_batches = 4, .time = 1000.0 + rank};
}

std::vector<MetricsRecord> oneOfEach() {
  std::vector<MetricsRecord> all;
  all.push_back(sampleStep(0));
  all.push_back(sampleStep(1));
  all.push_back(EvalRecord{.step = 7, .val_loss = 3.0, .time = 1001.5});
  all.push_back(OuterRecord{.strategy = "streaming", .step = 7, .sent_step = 5, .round = 3, .fragment = 1, .rank = 1,
                            .island = 1, .params = 4096, .codec = "int8", .bytes_strait = 4200,
                            .bytes_strait_measured = 9000, .shared = 1, .control = true, .sync_s = 0.2,
                            .wait_s = 0.01, .digest = "0123456789abcdef", .time = 1001.6});
  all.push_back(EventRecord{.event = "epoch", .step = 6, .rank = 0, .epoch = 2, .detail = "epoch 1 -> 2",
                            .failed_rank = 3, .workers = {0, 1}, .stall_s = 0.1, .transfer_s = 0.2,
                            .recovery_s = 0.3, .rebuild_s = 0.4, .detected_at = 999.5, .pid = 4242, .time = 1000.5});
  all.push_back(MoeRecord{.step = 7, .rank = 0, .layer = 1, .tokens_per_expert = {30, 10, 20, 4},
                          .dropped_per_expert = {6, 0, 2, 0}, .dropped = 8, .capacity = 24, .aux_loss = 0.01,
                          .expert_parallel = 2, .dispatch_bytes = 2048, .time = 1001.0});
  all.push_back(PipelineRecord{.step = 7, .stages = 2, .micro_batches = 4, .stage_layers = {1, 1},
                               .busy_s = {0.2, 0.25}, .bubble = {0.2, 0.1}, .bubble_mean = 0.15, .window_s = 0.25,
                               .bubble_theory = 0.2, .time = 1001.0});
  all.push_back(ParallelRecord{.pipeline_stages = 2, .stage_layers = {1, 1}, .replicas = 1, .expert_parallel = 2,
                               .expert_begin = {0, 2, 4}, .shares = {8}, .recompute = true, .strategy = "sync",
                               .time = 999.0});
  all.push_back(PredictionRecord{.predicted_step_s = 0.55, .compute_s = 0.4, .comm_s = 0.15, .detail = "2 ranks",
                                 .time = 999.1});
  all.push_back(ReplicaRecord{.rank = 1, .step = 7, .digest = "abcdef", .time = 1002.0});
  all.push_back(SummaryRecord{.steps = 7, .first_step = 0, .wall_s = 4.0, .tokens = 2048, .final_loss = 3.25,
                              .final_val_loss = 3.0, .measured_step_s = 0.6, .bytes_strait = 4200, .lr = 0.003,
                              .stopped_early = false, .time = 1003.0});
  return all;
}

MetricsRecord roundTrip(const MetricsRecord& r) {
  const std::string line = formatMetricsLine(r);
  ParsedMetricsLine p = parseMetricsRecord(line);
  EXPECT_EQ(p.status, ParsedMetricsLine::Status::kRecord) << line;
  EXPECT_TRUE(p.record.has_value()) << line;
  return p.record ? *p.record : MetricsRecord{};
}

TEST(MetricsSchema, EveryKindIsKnownAndNamedOnce) {
  const auto kinds = metricsKinds();
  EXPECT_EQ(kinds.size(), std::variant_size_v<MetricsRecord>);
  EXPECT_EQ(std::set<std::string>(kinds.begin(), kinds.end()).size(), kinds.size());
  for (const char* k : {"step", "eval", "outer", "event", "moe", "pipeline", "parallel", "prediction", "memory",
                        "replica", "summary"}) {
    EXPECT_NE(std::find(kinds.begin(), kinds.end(), k), kinds.end()) << k;
  }
}

TEST(MetricsSchema, StepRoundTripKeepsEveryField) {
  const auto back = std::get<StepRecord>(roundTrip(sampleStep(1)));
  const StepRecord want = sampleStep(1);
  EXPECT_EQ(back.step, want.step);
  EXPECT_EQ(back.rank, want.rank);
  EXPECT_EQ(back.island, want.island);
  EXPECT_EQ(back.epoch, want.epoch);
  using Pair = std::pair<double, double>;
  for (auto [got, exp] : std::initializer_list<Pair>{{back.loss, want.loss}, {back.local_loss, want.local_loss}, {back.lr, want.lr},
                          {back.samples, want.samples}, {back.tokens, want.tokens}, {back.compute_s, want.compute_s},
                          {back.comm_s, want.comm_s}, {back.wait_s, want.wait_s}, {back.data_s, want.data_s},
                          {back.optimizer_s, want.optimizer_s}, {back.step_s, want.step_s},
                          {back.compute_cpu_s, want.compute_cpu_s}, {back.cpu_s, want.cpu_s},
                          {back.minor_faults, want.minor_faults}, {back.peak_rss_bytes, want.peak_rss_bytes},
                          {back.tokens_per_s, want.tokens_per_s},
                          {back.grad_norm, want.grad_norm}, {back.slowdown, want.slowdown}, {back.share, want.share},
                          {back.commit_s, want.commit_s}, {back.micro_batches, want.micro_batches},
                          {back.time, want.time}}) {
    EXPECT_DOUBLE_EQ(got, exp);
  }
  EXPECT_EQ(back.stage, 1);
}

TEST(MetricsSchema, OtherKindsRoundTrip) {
  const auto all = oneOfEach();
  const auto outer = std::get<OuterRecord>(roundTrip(all[3]));
  EXPECT_EQ(outer.strategy, "streaming");
  EXPECT_EQ(outer.sent_step, 5);
  EXPECT_EQ(outer.round, 3);
  EXPECT_EQ(outer.fragment, 1);
  EXPECT_EQ(outer.island, 1);
  EXPECT_EQ(outer.codec, "int8");
  EXPECT_DOUBLE_EQ(outer.bytes_strait, 4200);
  EXPECT_DOUBLE_EQ(outer.bytes_strait_measured, 9000);
  EXPECT_TRUE(outer.control);
  EXPECT_DOUBLE_EQ(outer.wait_s, 0.01);
  EXPECT_EQ(outer.digest, "0123456789abcdef");

  const auto ev = std::get<EventRecord>(roundTrip(all[4]));
  EXPECT_EQ(ev.event, "epoch");
  EXPECT_EQ(ev.step, 6);
  EXPECT_EQ(ev.rank, 0);
  EXPECT_EQ(ev.epoch, 2);
  EXPECT_EQ(ev.failed_rank, 3);
  EXPECT_EQ(ev.workers, (std::vector<int64_t>{0, 1}));
  EXPECT_DOUBLE_EQ(ev.rebuild_s, 0.4);
  EXPECT_DOUBLE_EQ(ev.detected_at, 999.5);
  EXPECT_EQ(ev.pid, 4242);

  const auto moe = std::get<MoeRecord>(roundTrip(all[5]));
  EXPECT_EQ(moe.tokens_per_expert, (std::vector<double>{30, 10, 20, 4}));
  EXPECT_EQ(moe.dropped_per_expert, (std::vector<double>{6, 0, 2, 0}));
  EXPECT_DOUBLE_EQ(moe.capacity, 24);
  EXPECT_DOUBLE_EQ(moe.dispatch_bytes, 2048);

  const auto pipe = std::get<PipelineRecord>(roundTrip(all[6]));
  EXPECT_EQ(pipe.stages, 2);
  EXPECT_EQ(pipe.busy_s, (std::vector<double>{0.2, 0.25}));
  EXPECT_DOUBLE_EQ(pipe.bubble_theory, 0.2);

  const auto par = std::get<ParallelRecord>(roundTrip(all[7]));
  EXPECT_EQ(par.expert_begin, (std::vector<int64_t>{0, 2, 4}));
  EXPECT_TRUE(par.recompute);
  EXPECT_EQ(par.strategy, "sync");

  const auto pred = std::get<PredictionRecord>(roundTrip(all[8]));
  EXPECT_DOUBLE_EQ(pred.predicted_step_s, 0.55);
  EXPECT_EQ(pred.detail, "2 ranks");

  const auto rep = std::get<ReplicaRecord>(roundTrip(all[9]));
  EXPECT_EQ(rep.digest, "abcdef");

  const auto sum = std::get<SummaryRecord>(roundTrip(all[10]));
  EXPECT_EQ(sum.steps, 7);
  EXPECT_EQ(sum.first_step, 0);
  EXPECT_EQ(sum.bytes_strait, 4200);
  EXPECT_EQ(sum.stopped_early, false);
  EXPECT_FALSE(sum.predicted_step_s.has_value());  // not set: not written, reads back absent
}

TEST(MetricsSchema, MissingNumbersAreNotWrittenAndCountsAreIntegers) {
  StepRecord s{.step = 3, .rank = 0, .samples = 8, .tokens = 1024, .step_s = 0.5};
  const std::string line = formatMetricsLine(s);
  EXPECT_EQ(line.rfind(R"({"kind":"step","step":3,"rank":0,)", 0), 0u) << line;  // kind and keys first
  EXPECT_NE(line.find(R"("samples":8,)"), std::string::npos) << line;
  EXPECT_NE(line.find(R"("tokens":1024,)"), std::string::npos) << line;
  EXPECT_EQ(line.find("wait_s"), std::string::npos) << line;  // NaN: absent
  EXPECT_EQ(line.find("stage"), std::string::npos) << line;   // not a pipeline run
  const auto back = std::get<StepRecord>(roundTrip(s));
  EXPECT_TRUE(std::isnan(back.wait_s));
  EXPECT_EQ(back.stage, -1);
}

TEST(MetricsSchema, WriterReaderAndReportAgree) {
  TempDir tmp;
  {
    MetricsSink sink;
    ASSERT_TRUE(sink.open((tmp.path() / "metrics.jsonl").string()).isOk());
    for (const auto& r : oneOfEach()) sink.write(r);
    sink.write(EvalRecord{.step = 8, .val_loss = 2.9});  // no time: the sink stamps it
  }
  auto run = loadRunDir(tmp.path());
  ASSERT_TRUE(run.isOk()) << run.status().toString();
  EXPECT_EQ(run->lines, 12);
  EXPECT_EQ(run->malformed, 0);
  EXPECT_EQ(run->unknown_kinds, 0);
  ASSERT_EQ(run->steps.size(), 2u);
  EXPECT_DOUBLE_EQ(run->steps[1].wait_s, 0.05);
  ASSERT_EQ(run->evals.size(), 2u);
  EXPECT_GT(run->evals[1].time, 1.7e9);  // stamped with the wall clock
  ASSERT_EQ(run->moe.size(), 1u);
  EXPECT_DOUBLE_EQ(run->moe[0].capacity, 24);
  ASSERT_EQ(run->outers.size(), 1u);
  EXPECT_EQ(run->events.size(), 1u);
  EXPECT_EQ(run->pipeline.size(), 1u);
  ASSERT_TRUE(run->parallel.has_value());
  ASSERT_TRUE(run->prediction.has_value());
  EXPECT_EQ(run->replicas.size(), 1u);
  ASSERT_TRUE(run->summary.has_value());

  const RunStats st = computeRunStats(*run);
  ASSERT_EQ(st.workers.size(), 2u);
  EXPECT_DOUBLE_EQ(st.workers[0].mean_wait_s, 0.05);
  EXPECT_DOUBLE_EQ(st.workers[1].mean_comm_s, 0.15);
  ASSERT_TRUE(st.predicted_step_s.has_value());  // the summary has none: the prediction line's
  EXPECT_DOUBLE_EQ(*st.predicted_step_s, 0.55);
  ASSERT_EQ(st.moe_layers.size(), 1u);
  EXPECT_DOUBLE_EQ(st.moe_layers[0].dropped, 8);
  const std::string summary = formatSummary(*run, st);
  EXPECT_EQ(summary.find("unknown kind"), std::string::npos) << summary;
  EXPECT_NE(summary.find("50ms"), std::string::npos) << summary;  // the wait column
}

TEST(MetricsSchema, UnknownKindsAreCountedAndNamed) {
  RunData run;
  parseMetricsLine(R"({"kind":"telemetry","gpu_temp":71})", run);
  parseMetricsLine(R"({"kind":"telemetry","gpu_temp":72})", run);
  parseMetricsLine(formatMetricsLine(EvalRecord{.step = 1, .val_loss = 3.0}), run);
  EXPECT_EQ(run.lines, 3);
  EXPECT_EQ(run.unknown_kinds, 2);
  EXPECT_EQ(run.unknown_kind_names["telemetry"], 2);
  EXPECT_EQ(run.malformed, 0);
  EXPECT_EQ(run.evals.size(), 1u);
  const ParsedMetricsLine p = parseMetricsRecord(R"({"kind":"telemetry"})");
  EXPECT_EQ(p.status, ParsedMetricsLine::Status::kUnknownKind);
  EXPECT_EQ(p.kind, "telemetry");
  const std::string summary = formatSummary(run, computeRunStats(run));
  EXPECT_NE(summary.find("2 of unknown kind (ignored): telemetry"), std::string::npos) << summary;
}

TEST(MetricsSchema, OlderNamesAndShapesStillRead) {
  // Pipeline/expert runs before the shared schema wrote the capacity as "capacity_sum".
  auto p = parseMetricsRecord(R"({"kind":"moe","step":3,"layer":1,"tokens_per_expert":[1,null,3],"capacity_sum":48})");
  ASSERT_EQ(p.status, ParsedMetricsLine::Status::kRecord);
  const auto& m = std::get<MoeRecord>(*p.record);
  EXPECT_DOUBLE_EQ(m.capacity, 48);
  EXPECT_EQ(m.tokens_per_expert, (std::vector<double>{1, 0, 3}));  // a null count reads as 0
  // A key field missing or of the wrong type: malformed.
  EXPECT_EQ(parseMetricsRecord(R"({"kind":"moe","step":3,"layer":1})").status, ParsedMetricsLine::Status::kMalformed);
  EXPECT_EQ(parseMetricsRecord(R"({"kind":"step","step":1.5,"rank":0})").status,
            ParsedMetricsLine::Status::kMalformed);
  EXPECT_EQ(parseMetricsRecord(R"({"kind":"replica","rank":0,"step":1})").status,
            ParsedMetricsLine::Status::kMalformed);
  // An integral float is an integer.
  p = parseMetricsRecord(R"({"kind":"step","step":12.0,"rank":1})");
  ASSERT_EQ(p.status, ParsedMetricsLine::Status::kRecord);
  EXPECT_EQ(std::get<StepRecord>(*p.record).step, 12);
  EXPECT_EQ(parseMetricsRecord("   ").status, ParsedMetricsLine::Status::kBlank);
}

}  // namespace
}  // namespace archipelago::report
