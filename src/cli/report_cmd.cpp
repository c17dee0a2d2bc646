// archipelago report RUN_DIR [RUN_DIR...] [--out DIR]: turns run directories
// (or a directory of runs, e.g. the strategies bench's output) into an HTML
// report with SVG charts (report/report.h). Torch-free: the verb is in the
// torch-free build too.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "archipelago/report/report.h"
#include "cli/commands.h"

namespace archipelago::cli {

void addReportCommands(CLI::App& app) {
  static std::vector<std::string> run_dirs;
  static std::string out_dir;
  static size_t max_points = 4000;
  auto* rep = app.add_subcommand(
      "report", "write RUN_DIR/report/index.html (+ summary.txt and SVG charts); several runs are compared");
  rep->add_option("run_dirs", run_dirs,
                  "run directories written by `archipelago train` (the first gets the report), or a directory whose "
                  "sub-directories are runs (compared; the report goes to DIR/report)")
      ->required();
  rep->add_option("--out", out_dir, "write the report here instead of FIRST_RUN_DIR/report (DIR/report for a directory of runs)");
  rep->add_option("--max-points", max_points, "points per chart series before bucket-averaging (0 = all)");
  setAction(rep, [] {
    report::ReportOptions opt;
    opt.out_dir = out_dir;
    opt.max_points = max_points;
    std::vector<std::filesystem::path> dirs(run_dirs.begin(), run_dirs.end());
    auto out = report::writeReport(dirs, opt);
    if (!out.isOk()) return out.status().withContext("report");
    std::fputs(out->summary.c_str(), stdout);
    std::printf("\nreport: %s\n", out->index_html.c_str());
    return core::okStatus();
  });
}

}  // namespace archipelago::cli
