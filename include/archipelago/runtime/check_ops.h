// Operator conformance (docs/devices.md "Operator conformance"): every
// operator the model and the training loop use, run on one device in one
// dtype and compared with a CPU fp64 reference, as ggml's test-backend-ops
// checks every backend against the CPU.
//
// What it is for: islands of different vendors train one model, and a
// kernel that computes something else on one of them (a driver bug, a
// vendor plug-in's approximate softmax, a libtorch build without an fp16
// matmul) would silently pull its replicas away from the others or spoil
// the model. `archipelago check ops` prints the table; every worker runs the
// quick version before its first step and refuses a device outside
// tolerance (train.check_ops).
//
// Tolerance, one rule for every op: a result rounded r times in a format of
// unit roundoff u, from sums of n terms accumulated in fp32 (unit roundoff
// u32; the format itself when it is wider), is within
//     r u + 2 sqrt(n) u32
// of the exact result, measured normwise (relative to the largest reference
// value, or per element where an op says so). Each op declares its r and n
// where it is defined; sqrt(n) is the probabilistic growth of rounding
// errors over a sum (Higham and Mary, 2019). A kernel that accumulates in
// bf16 or fp16 fails it, on purpose: the design reduces low-precision
// values in fp32.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "archipelago/core/status.h"

namespace archipelago::runtime {

struct CheckOpsOptions {
  std::string device = "cpu";   // any torch device string: cpu, cuda, cuda:1, xpu, privateuseone
  std::string dtype = "fp32";   // fp32 | bf16 | fp16 | fp8 (fp8 linears, bf16 elsewhere)
  bool quick = false;           // small shapes: well under 100 ms on one CPU core
  uint64_t seed = 1;            // inputs are normal(0, 1) from this seed
};

// One row of the table.
struct OpCheck {
  std::string op, device, dtype;  // dtype: the format the op computed in
  double max_abs = 0, max_rel = 0, tolerance = 0;
  bool pass = false;
  std::string note;  // why it failed when it did not compute (libtorch's first message line)
};

// Runs every check. An op the device cannot run (libtorch throws) is a
// failing row with libtorch's message, not an error; the Result is an error
// only when the options are invalid or the device is not usable at all.
core::Result<std::vector<OpCheck>> checkOps(const CheckOpsOptions& o);

// ok, or failedPrecondition naming every failing op with its device and dtype.
core::Status requireConformance(const std::vector<OpCheck>& checks);

// The rule above: r u + 2 sqrt(n) min(u, u32).
double opTolerance(double unit_roundoff, int roundings, int64_t reduction_length);
// Unit roundoff (half the spacing of values around 1, relative) of
// fp64 | fp32 | bf16 | fp16 | fp8_e4m3 | fp8_e5m2 | int8 (symmetric, 127
// levels per side: half a level relative to the block's amax).
double unitRoundoff(const std::string& format);

// The table (op, device, dtype, max abs err, max rel err, tolerance, pass, note).
std::string formatOpChecks(const std::vector<OpCheck>& checks);
// {"device", "dtype", "quick", "pass", "checks": [{op, device, dtype, max_abs,
// max_rel, tolerance, pass, note}]}; a non-finite error is null.
std::string opChecksJson(const CheckOpsOptions& o, const std::vector<OpCheck>& checks);

}  // namespace archipelago::runtime
