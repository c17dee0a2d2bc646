// Operator conformance (runtime/check_ops.h): the CPU conforms in fp32, bf16
// and fp8; an operator libtorch lacks is a failing row, not a crash; every
// operator's check catches a broken kernel (ARCHIPELAGO_TEST_BREAK_OP); the
// JSON parses; the CLI's exit status says whether the device conforms.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "archipelago/runtime/check_ops.h"

namespace archipelago::runtime {
namespace {

namespace fs = std::filesystem;

std::vector<OpCheck> run(const std::string& dtype, bool quick) {
  CheckOpsOptions o;
  o.dtype = dtype;
  o.quick = quick;
  auto r = checkOps(o);
  EXPECT_TRUE(r.isOk()) << r.status().toString();
  return r.isOk() ? *r : std::vector<OpCheck>{};
}

const OpCheck* find(const std::vector<OpCheck>& checks, const std::string& op) {
  for (const auto& c : checks) {
    if (c.op == op) return &c;
  }
  return nullptr;
}

// Sets an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) { ::setenv(name, value.c_str(), 1); }
  ~ScopedEnv() { ::unsetenv(name_); }

 private:
  const char* name_;
};

TEST(CheckOps, EveryOperatorConformsOnTheCpu) {
  for (const std::string dtype : {"fp32", "bf16", "fp8"}) {
    for (bool quick : {true, false}) {
      auto checks = run(dtype, quick);
      ASSERT_GE(checks.size(), 15u);
      for (const auto& c : checks) {
        EXPECT_TRUE(c.pass) << dtype << (quick ? " quick " : " full ") << c.op << ": max rel " << c.max_rel
                            << " > tolerance " << c.tolerance << " " << c.note;
        EXPECT_GT(c.tolerance, 0.0) << c.op;
        EXPECT_EQ(c.device, "cpu");
      }
      EXPECT_TRUE(requireConformance(checks).isOk());
      for (const char* op : {"matmul", "attention", "rmsnorm", "rotary", "swiglu", "moe_route",
                             "moe_dispatch_combine", "cross_entropy", "cross_entropy_grad", "adamw", "codec_bf16",
                             "codec_fp16", "codec_int8", "codec_fp8_e4m3", "codec_fp8_e5m2"}) {
        EXPECT_NE(find(checks, op), nullptr) << op;
      }
      EXPECT_EQ(find(checks, "fp8_linear_block") != nullptr, dtype == "fp8");
    }
  }
}

TEST(CheckOps, TheFp8RowsSayTheyAreEmulated) {
  auto checks = run("fp8", true);
  for (const char* op : {"fp8_linear_delayed", "fp8_linear_delayed_grad", "fp8_linear_block", "fp8_linear_block_grad"}) {
    const OpCheck* c = find(checks, op);
    ASSERT_NE(c, nullptr) << op;
    EXPECT_EQ(c->note, "EMULATED (quantise-dequantise)") << op;
    EXPECT_EQ(c->dtype, "fp8");
  }
  EXPECT_EQ(find(checks, "matmul")->dtype, "bf16");  // fp8 islands compute everything else in bf16
}

// libtorch 1.13 has no fp16 matmul on the CPU: a failing row carrying
// libtorch's message, while the operators it does have still pass.
TEST(CheckOps, Fp16OnTheCpuReportsWhatLibtorchLacks) {
  auto checks = run("fp16", true);
  const OpCheck* mm = find(checks, "matmul");
  ASSERT_NE(mm, nullptr);
  EXPECT_FALSE(mm->pass);
  EXPECT_NE(mm->note.find("libtorch: "), std::string::npos) << mm->note;
  EXPECT_NE(mm->note.find("Half"), std::string::npos) << mm->note;
  EXPECT_EQ(mm->note.find('\n'), std::string::npos) << "only the first line";
  EXPECT_TRUE(std::isnan(mm->max_rel));
  EXPECT_TRUE(find(checks, "codec_int8")->pass);
  auto st = requireConformance(checks);
  ASSERT_FALSE(st.isOk());
  EXPECT_EQ(st.code(), core::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("matmul on cpu in fp16"), std::string::npos) << st.message();
}

// Every operator's comparison catches a wrong result: each in turn is
// perturbed and must fail, naming op, device and dtype, while the others pass.
TEST(CheckOps, ABrokenKernelIsCaughtForEveryOperator) {
  const auto names = run("fp8", true);
  for (const auto& target : names) {
    ScopedEnv env("ARCHIPELAGO_TEST_BREAK_OP", target.op);
    auto checks = run("fp8", true);
    for (const auto& c : checks) EXPECT_EQ(c.pass, c.op != target.op) << "breaking " << target.op << ": " << c.op;
    auto st = requireConformance(checks);
    ASSERT_FALSE(st.isOk()) << target.op;
    EXPECT_NE(st.message().find(target.op + " on cpu in " + target.dtype), std::string::npos) << st.message();
  }
}

// Not a timing target (that figure is in docs/devices.md, measured warm):
// the bound only catches a quick check that stopped being quick, e.g. one
// running the full shapes (~50x slower), with room for a loaded CI machine.
TEST(CheckOps, QuickRunsTheSmallShapes) {
  for (const std::string dtype : {"fp32", "bf16", "fp8"}) {
    run(dtype, true);  // first use: libtorch's lazy initialisation
    const auto t0 = std::chrono::steady_clock::now();
    run(dtype, true);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("check ops --quick --dtype %s: %.1f ms\n", dtype.c_str(), ms);
    EXPECT_LT(ms, 2000.0) << dtype;
  }
}

TEST(CheckOps, BadOptionsNameTheField) {
  CheckOpsOptions o;
  o.dtype = "fp64";
  auto r = checkOps(o);
  ASSERT_FALSE(r.isOk());
  EXPECT_EQ(r.status().code(), core::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("dtype 'fp64'"), std::string::npos);
  o.dtype = "fp32";
  o.device = "nonsense";
  EXPECT_FALSE(checkOps(o).isOk());
}

TEST(CheckOps, ToleranceRule) {
  // bf16 result rounded once, 64-term sums in fp32: 2^-8 + 2 * 8 * 2^-24.
  EXPECT_DOUBLE_EQ(opTolerance(std::ldexp(1.0, -8), 1, 64), std::ldexp(1.0, -8) + std::ldexp(1.0, -20));
  EXPECT_DOUBLE_EQ(opTolerance(std::ldexp(1.0, -24), 2, 0), std::ldexp(1.0, -23));
  EXPECT_DOUBLE_EQ(opTolerance(std::ldexp(1.0, -53), 1, 4), 5 * std::ldexp(1.0, -53));
  // Half the spacing of values just above 1: 2^-(stored mantissa bits + 1).
  EXPECT_EQ(unitRoundoff("fp32"), std::ldexp(1.0, -24));
  EXPECT_EQ(unitRoundoff("bf16"), std::ldexp(1.0, -8));
  EXPECT_EQ(unitRoundoff("fp16"), std::ldexp(1.0, -11));
  EXPECT_EQ(unitRoundoff("fp8_e4m3"), std::ldexp(1.0, -4));
  EXPECT_EQ(unitRoundoff("fp8_e5m2"), std::ldexp(1.0, -3));
}

TEST(CheckOps, JsonParsesWithNullForMissingErrors) {
  CheckOpsOptions o;
  o.dtype = "fp16";
  o.quick = true;
  auto checks = run("fp16", true);
  auto j = nlohmann::json::parse(opChecksJson(o, checks));
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["dtype"], "fp16");
  EXPECT_EQ(j["pass"], false);
  ASSERT_EQ(j["checks"].size(), checks.size());
  for (const auto& row : j["checks"]) {
    if (row["op"] == "matmul") {
      EXPECT_TRUE(row["max_rel"].is_null());
      EXPECT_EQ(row["pass"], false);
    }
    if (row["op"] == "codec_int8") {
      EXPECT_TRUE(row["max_rel"].is_number());
    }
  }
}

// ---- the CLI ----------------------------------------------------------------------

struct CliRun {
  int exit_code;
  std::string out;
};

CliRun cli(const std::string& args, const std::string& env = "") {
  const fs::path out = fs::temp_directory_path() / ("arch_check_ops_" + std::to_string(::getpid()) + ".out");
  const std::string cmd = env + " " + ARCHIPELAGO_BINARY + " check ops " + args + " > " + out.string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream f(out);
  CliRun r{WIFEXITED(rc) ? WEXITSTATUS(rc) : 128, std::string(std::istreambuf_iterator<char>(f), {})};
  fs::remove(out);
  return r;
}

TEST(CheckOpsCli, ExitStatusSaysWhetherTheDeviceConforms) {
  auto ok = cli("--quick");
  EXPECT_EQ(ok.exit_code, 0) << ok.out;
  EXPECT_NE(ok.out.find("moe_dispatch_combine"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find("max rel err"), std::string::npos) << ok.out;

  auto fp16 = cli("--quick --dtype fp16");
  EXPECT_EQ(fp16.exit_code, 1) << fp16.out;
  EXPECT_NE(fp16.out.find("matmul on cpu in fp16"), std::string::npos) << fp16.out;

  auto broken = cli("--quick --dtype bf16", "ARCHIPELAGO_TEST_BREAK_OP=rmsnorm");
  EXPECT_EQ(broken.exit_code, 1) << broken.out;
  EXPECT_NE(broken.out.find("rmsnorm on cpu in bf16"), std::string::npos) << broken.out;

  auto bad = cli("--dtype fp64");
  EXPECT_EQ(bad.exit_code, 2) << bad.out;
}

TEST(CheckOpsCli, JsonOutputParses) {
  auto r = cli("--quick --dtype fp8 --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  // The JSON object is one line (libtorch may have warned on stderr before it).
  const auto start = r.out.rfind("\n{\"");
  auto j = nlohmann::json::parse(start == std::string::npos ? r.out : r.out.substr(start + 1));
  EXPECT_EQ(j["pass"], true);
  bool saw_fp8 = false;
  for (const auto& row : j["checks"]) saw_fp8 = saw_fp8 || row["op"] == "fp8_linear_delayed";
  EXPECT_TRUE(saw_fp8);
}

}  // namespace
}  // namespace archipelago::runtime
