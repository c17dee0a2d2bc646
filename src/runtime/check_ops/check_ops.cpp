// The conformance framework (runtime/check_ops.h): runs each operator check,
// measures its error against the reference, applies the one tolerance rule,
// and reports.
#include "archipelago/runtime/check_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>

#include <nlohmann/json.hpp>

#include "archipelago/model/device.h"
#include "archipelago/model/layers.h"
#include "runtime/check_ops/op_case.h"

namespace archipelago::runtime {

namespace check_ops {

std::string formatName(torch::ScalarType t) {
  switch (t) {
    case torch::kDouble: return "fp64";
    case torch::kFloat: return "fp32";
    case torch::kBFloat16: return "bf16";
    case torch::kHalf: return "fp16";
    default: return c10::toString(t);
  }
}

Operand OpContext::input(torch::IntArrayRef shape, double std, const std::string& name, torch::ScalarType type,
                         double mean) const {
  // Rounded once, on the CPU; the device gets those bytes.
  auto x = model::deterministicNormal(shape, std, seed, name).add(mean).to(type);
  return {x.to(device), x.to(torch::kDouble)};
}

}  // namespace check_ops

namespace {

using check_ops::OpContext;
using check_ops::OpDef;
using check_ops::OpResult;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Test-only hook: ARCHIPELAGO_TEST_BREAK_OP=<op> perturbs that op's device
// result, standing in for a broken kernel (tests/runtime/check_ops_test.cpp).
std::string brokenOp() {
  const char* v = std::getenv("ARCHIPELAGO_TEST_BREAK_OP");
  return v != nullptr ? v : "";
}

// Element 0 moved by its own normaliser (the scale its error is measured
// against), so its relative error is at least 1 - tolerance: far outside
// any tolerance, as a wrong kernel would be.
torch::Tensor perturbed(const torch::Tensor& device, const OpResult& r) {
  torch::NoGradGuard no_grad;
  const double scale = r.normalizer.defined() ? r.normalizer.reshape({-1})[0].item<double>()
                                              : r.reference.abs().max().item<double>();
  auto out = device.detach().clone();
  out.view({-1}).narrow(0, 0, 1).add_(std::max(scale, 1e-30));
  return out;
}

// max_abs = max |device - reference|; max_rel = max of that error over the
// normaliser (per element, or the largest |reference| when none is given).
void measure(const torch::Tensor& device, const OpResult& r, OpCheck& row) {
  auto d = device.detach().to(torch::kCPU).to(torch::kDouble).reshape({-1});
  auto ref = r.reference.to(torch::kDouble).reshape({-1});
  TORCH_CHECK(d.numel() == ref.numel(), "device result has ", d.numel(), " elements, the reference ", ref.numel());
  auto err = (d - ref).abs();
  auto norm = r.normalizer.defined() ? r.normalizer.to(torch::kDouble).reshape({-1})
                                     : torch::full_like(ref, std::max(ref.abs().max().item<double>(), 1e-300));
  // torch's max propagates NaN: a NaN anywhere makes the error NaN, a fail.
  row.max_abs = err.numel() ? err.max().item<double>() : 0.0;
  row.max_rel = err.numel() ? (err / norm).max().item<double>() : 0.0;
}

OpCheck runOne(const OpDef& def, const OpContext& ctx, bool perturb) {
  OpCheck row;
  row.op = def.name;
  row.device = ctx.device.str();
  row.dtype = check_ops::formatName(ctx.dtype);
  try {
    OpResult r = def.run(ctx);
    row.dtype = r.dtype;
    row.tolerance = opTolerance(unitRoundoff(r.rounding_format.empty() ? r.dtype : r.rounding_format), r.roundings,
                                r.reduction);
    measure(perturb ? perturbed(r.device, r) : r.device, r, row);
    row.pass = std::isfinite(row.max_rel) && row.max_rel <= row.tolerance;
    row.note = perturb ? "perturbed on purpose (ARCHIPELAGO_TEST_BREAK_OP)" : r.note;
  } catch (const c10::Error& e) {
    // An op libtorch does not implement for this device / dtype.
    row.max_abs = row.max_rel = row.tolerance = kNaN;
    row.pass = false;
    row.note = "libtorch: " + model::torchErrorLine(e);
  }
  return row;
}

core::Status validate(const CheckOpsOptions& o) {
  if (o.dtype != "fp32" && o.dtype != "bf16" && o.dtype != "fp16" && o.dtype != "fp8") {
    return core::invalidArgument("check ops dtype '" + o.dtype +
                                 "': expected fp32, bf16, fp16 or fp8 (fp8 linears, bf16 elsewhere)");
  }
  return core::okStatus();
}

std::string number(double v) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

}  // namespace

double unitRoundoff(const std::string& format) {
  static const std::map<std::string, double> table = {
      {"fp64", std::ldexp(1.0, -53)},    {"fp32", std::ldexp(1.0, -24)},    {"bf16", std::ldexp(1.0, -8)},
      {"fp16", std::ldexp(1.0, -11)},    {"fp8_e4m3", std::ldexp(1.0, -4)}, {"fp8_e5m2", std::ldexp(1.0, -3)},
      {"int8", 0.5 / 127.0}};
  auto it = table.find(format);
  ARCH_CHECK_MSG(it != table.end(), "no unit roundoff for format '" + format + "'");
  return it->second;
}

double opTolerance(double unit_roundoff, int roundings, int64_t reduction_length) {
  // Sums accumulate in fp32 whatever the format (or in the format, when it
  // is wider): the design's rule for low-precision reductions.
  const double u_acc = std::min(unit_roundoff, unitRoundoff("fp32"));
  return unit_roundoff * static_cast<double>(roundings) +
         2.0 * std::sqrt(static_cast<double>(reduction_length)) * u_acc;
}

core::Result<std::vector<OpCheck>> checkOps(const CheckOpsOptions& o) {
  ARCH_RETURN_IF_ERROR(validate(o));
  ARCH_ASSIGN_OR_RETURN(auto device, model::parseDevice(o.device));
  ARCH_RETURN_IF_ERROR(model::probeDevice(device));
  ARCH_ASSIGN_OR_RETURN(auto dtype, model::computeScalarType(o.dtype));
  OpContext ctx;
  ctx.device = device;
  ctx.dtype = dtype;
  ctx.quick = o.quick;
  ctx.seed = o.seed;
  // The gradient checks need autograd even when the caller runs under a
  // NoGradGuard (a training loop between steps).
  torch::AutoGradMode grad_mode(true);
  std::vector<OpDef> ops = check_ops::modelOps();
  if (o.dtype == "fp8") {
    for (const auto& op : check_ops::fp8Ops()) ops.push_back(op);
  }
  for (const auto& op : check_ops::hostOps()) ops.push_back(op);
  const std::string broken = brokenOp();
  std::vector<OpCheck> out;
  for (const auto& op : ops) out.push_back(runOne(op, ctx, broken == op.name));
  return out;
}

core::Status requireConformance(const std::vector<OpCheck>& checks) {
  std::string failed;
  for (const auto& c : checks) {
    if (c.pass) continue;
    failed += (failed.empty() ? "" : "; ") + c.op + " on " + c.device + " in " + c.dtype;
    failed += c.note.empty() ? " (max rel err " + number(c.max_rel) + " > tolerance " + number(c.tolerance) + ")"
                             : " (" + c.note + ")";
  }
  if (failed.empty()) return core::okStatus();
  return core::failedPrecondition("operators outside tolerance: " + failed +
                                  " (archipelago check ops --device D --dtype T shows the table)");
}

std::string formatOpChecks(const std::vector<OpCheck>& checks) {
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-24s %-8s %-9s %12s %12s %12s  %s\n", "op", "device", "dtype", "max abs err",
                "max rel err", "tolerance", "pass");
  out += line;
  for (const auto& c : checks) {
    std::snprintf(line, sizeof line, "%-24s %-8s %-9s %12s %12s %12s  %s", c.op.c_str(), c.device.c_str(),
                  c.dtype.c_str(), number(c.max_abs).c_str(), number(c.max_rel).c_str(), number(c.tolerance).c_str(),
                  c.pass ? "yes" : "NO");
    out += line;
    if (!c.note.empty()) out += "  " + c.note;
    out += "\n";
  }
  return out;
}

std::string opChecksJson(const CheckOpsOptions& o, const std::vector<OpCheck>& checks) {
  auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
  nlohmann::json rows = nlohmann::json::array();
  bool all = true;
  for (const auto& c : checks) {
    rows.push_back({{"op", c.op},
                    {"device", c.device},
                    {"dtype", c.dtype},
                    {"max_abs", num(c.max_abs)},
                    {"max_rel", num(c.max_rel)},
                    {"tolerance", num(c.tolerance)},
                    {"pass", c.pass},
                    {"note", c.note}});
    all = all && c.pass;
  }
  nlohmann::json j = {{"device", o.device}, {"dtype", o.dtype}, {"quick", o.quick}, {"pass", all}, {"checks", rows}};
  return j.dump();
}

}  // namespace archipelago::runtime
