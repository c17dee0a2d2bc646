// A small deterministic mutation fuzzer for the ordinary test suites.
//
// The libFuzzer targets in tests/fuzz/ need clang and -DARCHIPELAGO_FUZZ=ON,
// which CI does not build. So that every CI run still throws broken input at
// every parser, each layer's *_fuzz_smoke_test.cpp compiles the same target
// and drives it with runMutationLoop() from that target's checked-in seed
// corpus (tests/fuzz/corpus/<name>/). There is no coverage guidance and no
// sanitizer here: what this catches is a crash, an exception escaping a
// parser, a hang (through the test's CTest timeout) and the targets' own
// invariant checks (__builtin_trap) on inputs close to valid ones.
//
// Everything is a function of the loop's seed, so a failure repeats on
// every machine. The iteration count is the bound; max_seconds only cuts
// the loop short on a very slow machine (the inputs run are then a prefix
// of the same sequence). To find the input that crashed, set
// ARCHIPELAGO_FUZZ_SAVE=FILE: each input is written there before it runs,
// so FILE holds the culprit afterwards. ARCHIPELAGO_FUZZ_SCALE=K runs K
// times as many inputs (a longer local run without clang).
//
// Header-only and torch-free: every test suite includes it.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace archipelago::fuzz {

// The files of one corpus directory, sorted by name so the loop sees them
// in the same order everywhere. Empty when the directory is missing.
inline std::vector<std::string> readCorpus(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.is_regular_file()) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  std::vector<std::string> out;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    out.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return out;
}

struct LoopOptions {
  uint64_t seed = 1;
  size_t iterations = 20000;  // mutants of the seeds
  size_t random_inputs = 0;   // then this many inputs of random bytes
  size_t max_size = 1 << 16;  // mutants are cut to this many bytes
  // Safety stop on a very slow machine: CPU seconds of this process (so a
  // loaded machine does not cut the loop), or ten times that on the wall
  // clock (for targets that mostly wait on file I/O). Never before min_runs
  // inputs (seeds included): a test's coverage does not depend on the
  // machine's speed or load.
  double max_seconds = 3.0;
  size_t min_runs = 1000;
};

struct LoopResult {
  size_t runs = 0;         // inputs run (seeds included)
  bool cut_short = false;  // max_seconds ran out first
  double seconds = 0;
};

// Produces mutants of a set of seeds: 1 to 6 edits each, mixing byte-level
// edits (bit flips, inserts, deletes, truncation, repeats, splices, binary
// boundary integers) with text-level ones (a number replaced by a huge,
// negative or fractional one; JSON/YAML punctuation dropped in).
class Mutator {
 public:
  Mutator(uint64_t seed, const std::vector<std::string>& seeds) : rng_(seed), seeds_(seeds) {
    if (seeds_.empty()) seeds_.push_back("");
  }

  std::string next(size_t max_size) {
    std::string s = seeds_[pick(seeds_.size())];
    const size_t edits = 1 + pick(6);
    for (size_t i = 0; i < edits; ++i) edit(s);
    if (s.size() > max_size) s.resize(max_size);
    return s;
  }

  std::string randomBytes(size_t max_len) {
    std::string s(pick(max_len + 1), '\0');
    for (auto& c : s) c = static_cast<char>(rng_());
    return s;
  }

 private:
  size_t pick(size_t n) { return n == 0 ? 0 : static_cast<size_t>(rng_() % n); }

  void edit(std::string& s) {
    const size_t pos = pick(s.size() + 1);
    switch (pick(11)) {
      case 0:  // flip one bit
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1u << pick(8));
        break;
      case 1:  // overwrite one byte
        if (!s.empty()) s[pick(s.size())] = static_cast<char>(rng_());
        break;
      case 2:  // insert random bytes
        s.insert(pos, randomBytes(16));
        break;
      case 3:  // delete a range
        s.erase(pos, 1 + pick(std::max<size_t>(s.size() / 4, 1)));
        break;
      case 4:  // truncate
        s.resize(pos);
        break;
      case 5:  // repeat a range a few times (deep nesting, long lists)
        repeat(s, pos);
        break;
      case 6:  // splice in a piece of another seed
        splice(s, pos);
        break;
      case 7:  // a binary boundary integer, little-endian, 1..8 bytes wide
        binaryInteger(s, pos);
        break;
      case 8:
      case 9:  // a textual number replaced by a boundary one
        textNumber(s, pos);
        break;
      default:  // punctuation and keywords of the text formats
        s.insert(pos, kTokens[pick(std::size(kTokens))]);
        break;
    }
  }

  void repeat(std::string& s, size_t pos) {
    if (pos >= s.size()) return;
    const std::string piece = s.substr(pos, 1 + pick(std::min<size_t>(s.size() - pos, 16)));
    std::string run;
    for (size_t k = 1 + pick(64); k > 0; --k) run += piece;
    s.insert(pos, run);
  }

  void splice(std::string& s, size_t pos) {
    const std::string& other = seeds_[pick(seeds_.size())];
    const size_t from = pick(other.size() + 1);
    const std::string piece = other.substr(from, pick(other.size() - from + 1));
    if (pick(2) == 0) {
      s.insert(pos, piece);
    } else {
      s.resize(pos);
      s += piece;
    }
  }

  void binaryInteger(std::string& s, size_t pos) {
    static constexpr uint64_t kValues[] = {0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x10000,
                                           0x7fffffff, 0x80000000u, 0xffffffffu, 0x100000000ull,
                                           0x4000000000000000ull, 0x7fffffffffffffffull,
                                           0x8000000000000000ull, ~0ull};
    static constexpr size_t kWidths[] = {1, 2, 4, 8};
    const size_t width = kWidths[pick(4)];
    if (s.size() < width) return;
    const uint64_t v = kValues[pick(std::size(kValues))];
    const size_t at = std::min(pos, s.size() - width);
    for (size_t i = 0; i < width; ++i) s[at + i] = static_cast<char>(v >> (8 * i));
  }

  // Replaces the first run of digits at or after pos (with its sign) by a
  // boundary value: what a parser gets when someone hand-edits a file.
  void textNumber(std::string& s, size_t pos) {
    static constexpr const char* kNumbers[] = {
        "0", "-1", "1", "2", "-0", "0.5", "1e308", "-1e308", "1e-308", "1e400", "127", "128", "255", "256",
        "65535", "65536", "2147483647", "2147483648", "-2147483649", "4294967295", "4294967296",
        "9223372036854775807", "9223372036854775808", "-9223372036854775809", "18446744073709551615",
        "18446744073709551616", "99999999999999999999999999999", "1.5", "-1.5", "0.9999999", "NaN", "inf"};
    size_t b = pos;
    while (b < s.size() && !(s[b] >= '0' && s[b] <= '9')) ++b;
    if (b == s.size()) {
      s.insert(pos, kNumbers[pick(std::size(kNumbers))]);
      return;
    }
    size_t e = b;
    while (e < s.size() && ((s[e] >= '0' && s[e] <= '9') || s[e] == '.' || s[e] == 'e' || s[e] == 'E')) ++e;
    if (b > 0 && s[b - 1] == '-') --b;
    s.replace(b, e - b, kNumbers[pick(std::size(kNumbers))]);
  }

  static constexpr const char* kTokens[] = {
      "{", "}", "[", "]", "\"", ":", ",", "null", "true", "false", "\n", "\n  ", "- ", ": ", "&a ", "*a",
      "!!binary ", "? ", "\\u0000", "\\ud800", "\t", "#", "---\n", "...\n", "<<: *a\n", "\xff", "\xc3\x28",
      "{\"a\":", "[[[[[[[[[[[[[[[[", "]]]]]]]]]]]]]]]]", "{{{{{{{{", "\"\":", "\"__metadata__\":"};

  std::mt19937_64 rng_;
  std::vector<std::string> seeds_;
};

inline double cpuSeconds(std::clock_t since) {
  return static_cast<double>(std::clock() - since) / CLOCKS_PER_SEC;
}

// Runs `target` (an LLVMFuzzerTestOneInput-shaped function) on every seed,
// then on o.iterations mutants and o.random_inputs random inputs.
template <typename Target>
LoopResult runMutationLoop(const std::vector<std::string>& seeds, Target&& target, const LoopOptions& options = {}) {
  LoopOptions o = options;
  if (const char* scale = std::getenv("ARCHIPELAGO_FUZZ_SCALE"); scale != nullptr && std::atof(scale) > 0) {
    const double k = std::atof(scale);
    o.iterations = static_cast<size_t>(static_cast<double>(o.iterations) * k);
    o.random_inputs = static_cast<size_t>(static_cast<double>(o.random_inputs) * k);
    o.max_seconds *= k;
  }
  const char* save = std::getenv("ARCHIPELAGO_FUZZ_SAVE");
  auto run = [&](const std::string& in) {
    if (save != nullptr && *save != '\0') std::ofstream(save, std::ios::binary | std::ios::trunc) << in;
    target(reinterpret_cast<const uint8_t*>(in.data()), in.size());
  };
  LoopResult r;
  const auto start = std::chrono::steady_clock::now();
  const std::clock_t cpu_start = std::clock();
  const auto until = start + std::chrono::duration<double>(10 * o.max_seconds);
  for (const auto& s : seeds) {
    run(s);
    ++r.runs;
  }
  Mutator m(o.seed, seeds);
  const size_t total = o.iterations + o.random_inputs;
  for (size_t i = 0; i < total; ++i, ++r.runs) {
    if (r.runs >= o.min_runs && i % 32 == 0 &&
        (cpuSeconds(cpu_start) > o.max_seconds || std::chrono::steady_clock::now() > until)) {
      r.cut_short = true;
      break;
    }
    run(i < o.iterations ? m.next(o.max_size) : m.randomBytes(256));
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // One line in the test log, so a slow machine's cut shows (CPU time too:
  // on a loaded machine the wall clock says little about the loop's cost).
  std::printf("mutation loop: %zu inputs in %.2f s (%.2f s CPU)%s\n", r.runs, r.seconds,
              cpuSeconds(cpu_start),
              r.cut_short ? ", cut short by max_seconds" : "");
  return r;
}

}  // namespace archipelago::fuzz
