// bench_data_prepare [CORPUS_DIR] [--spm-vocab N] [--no-spm]
//
// Runs `data prepare` on a corpus (default data/corpus/sotu) with the byte
// tokenizer and with SentencePiece, and reports MB/s of input text. Baseline,
// measured in the same run: reading the same files and hashing them with
// SHA-256 (the least any prepare must do). Prints a table, then one JSON line
// per row.
#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "archipelago/core/clock.h"
#include "archipelago/core/hash.h"
#include "archipelago/data/prepare.h"

namespace fs = std::filesystem;
using namespace archipelago;

namespace {

struct Row {
  std::string name;
  double seconds = 0;
  double input_bytes = 0;
  std::string note;
};

std::vector<std::string> corpusFiles(const std::string& dir) {
  std::vector<std::string> files;
  for (auto& e : fs::recursive_directory_iterator(dir)) {
    auto ext = e.path().extension().string();
    if (e.is_regular_file() && (ext == ".txt" || ext == ".json" || ext == ".jsonl")) files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

Row baseline(const std::vector<std::string>& files) {
  Row r{"read+sha256 (baseline)", 0, 0, ""};
  auto t0 = core::Clock::now();
  std::vector<char> buf(1 << 20);
  std::string last;
  for (auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    core::Sha256 h;
    while (in) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      auto got = in.gcount();
      if (got > 0) {
        h.update(buf.data(), static_cast<size_t>(got));
        r.input_bytes += static_cast<double>(got);
      }
    }
    auto d = h.finish();
    last = core::toHex(d);
  }
  r.seconds = core::secondsSince(t0);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string corpus = "data/corpus/sotu";
  int64_t spm_vocab = 8000;
  bool spm = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--spm-vocab") && i + 1 < argc) {
      spm_vocab = std::atoll(argv[++i]);
    } else if (!std::strcmp(argv[i], "--no-spm")) {
      spm = false;
    } else if (argv[i][0] == '-') {
      std::fprintf(stderr, "usage: bench_data_prepare [CORPUS_DIR] [--spm-vocab N] [--no-spm]\n");
      return 2;
    } else {
      corpus = argv[i];
    }
  }
  if (!fs::is_directory(corpus)) {
    std::fprintf(stderr, "bench_data_prepare: corpus directory '%s' not found (run scripts/setup.sh or pass a path)\n",
                 corpus.c_str());
    return 1;
  }
  auto files = corpusFiles(corpus);
  std::string templ = (fs::temp_directory_path() / "bench-data-XXXXXX").string();
  std::vector<char> tb(templ.begin(), templ.end());
  tb.push_back('\0');
  if (::mkdtemp(tb.data()) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  fs::path tmp(tb.data());

  std::vector<Row> rows;
  baseline(files);  // warm the page cache so both sides read from memory
  rows.push_back(baseline(files));

  auto run = [&](const std::string& name, const std::string& tokenizer, int64_t vocab) {
    data::PrepareOptions o;
    o.inputs = {corpus};
    o.out = (tmp / name).string();
    o.tokenizer = tokenizer;
    o.vocab = vocab;
    auto r = data::prepareDataset(o);
    if (!r.isOk()) {
      std::fprintf(stderr, "bench_data_prepare: %s failed: %s\n", name.c_str(), r.status().toString().c_str());
      return false;
    }
    const auto& m = r->manifest;
    char note[256];
    std::snprintf(note, sizeof(note), "%lld docs kept, %lld dups, %lld train tokens%s", (long long)m.dedup.documents_kept,
                  (long long)m.dedup.duplicates_removed, (long long)m.train.tokens,
                  r->spm_train_seconds > 0 ? (", spm train " + std::to_string(r->spm_train_seconds).substr(0, 5) + " s").c_str()
                                           : "");
    rows.push_back(Row{"prepare " + name, r->seconds, static_cast<double>(r->input_bytes), note});
    return true;
  };
  bool ok = run("byte", "byte", 0);
  if (spm) ok = run("spm" + std::to_string(spm_vocab), "spm", spm_vocab) && ok;
  std::error_code ec;
  fs::remove_all(tmp, ec);

  const double base_mbs = rows[0].input_bytes / 1e6 / rows[0].seconds;
  std::printf("corpus %s: %zu files, %.1f MB\n", corpus.c_str(), files.size(), rows[0].input_bytes / 1e6);
  std::printf("%-28s %10s %10s %10s  %s\n", "what", "seconds", "MB/s", "vs base", "notes");
  for (auto& r : rows) {
    double mbs = r.input_bytes / 1e6 / r.seconds;
    std::printf("%-28s %10.3f %10.1f %9.3fx  %s\n", r.name.c_str(), r.seconds, mbs, mbs / base_mbs, r.note.c_str());
  }
  for (auto& r : rows) {
    nlohmann::json j = {{"bench", "data_prepare"},       {"row", r.name},
                        {"seconds", r.seconds},          {"input_bytes", r.input_bytes},
                        {"mb_per_s", r.input_bytes / 1e6 / r.seconds}, {"baseline_mb_per_s", base_mbs},
                        {"notes", r.note}};
    std::printf("%s\n", j.dump().c_str());
  }
  return ok ? 0 : 1;
}
