// archipelago <verb> ...: the single entry point (see DESIGN.md "cli").
#include <cstdio>
#include <map>

#include "archipelago/core/log.h"
#include "cli/commands.h"

namespace archipelago::cli {
namespace {
std::map<const CLI::App*, Action>& actions() {
  static std::map<const CLI::App*, Action> m;
  return m;
}
}  // namespace

void setAction(CLI::App* sub, Action action) { actions()[sub] = std::move(action); }

}  // namespace archipelago::cli

int main(int argc, char** argv) {
  using namespace archipelago;
  core::initLoggingFromEnv();
  core::setLogIdentity("cli");

  CLI::App app{"archipelago: train one large model on mixed accelerators across islands"};
  app.require_subcommand(1);
  std::string log_level;
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off (or ARCHIPELAGO_LOG_LEVEL)");
  app.parse_complete_callback([&] {
    if (!log_level.empty() && !core::setLogLevel(log_level)) {
      throw CLI::ValidationError("--log-level", "'" + log_level + "' is not one of trace|debug|info|warn|error|off");
    }
  });

  cli::addConfigCommands(app);
  cli::addDataCommands(app);
  cli::addBenchCommands(app);
  cli::addPlanCommands(app);
  cli::addReportCommands(app);
  cli::addSecretsCommands(app);
#if defined(ARCHIPELAGO_HAS_TORCH)
  cli::addTrainCommands(app);
  cli::addHfCommands(app);
  cli::addCheckCommands(app);
#endif

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  // Find the deepest parsed subcommand that has an action.
  const CLI::App* node = &app;
  cli::Action action;
  while (true) {
    auto it = cli::actions().find(node);
    if (it != cli::actions().end()) action = it->second;
    auto subs = node->get_subcommands();
    if (subs.empty()) break;
    node = subs.front();
  }
  if (!action) {
    std::fprintf(stderr, "archipelago: '%s' needs a subcommand; see --help\n", node->get_name().c_str());
    return 2;
  }
  core::Status st;
  try {
    st = action();
  } catch (const std::exception& e) {
    st = core::internalError(std::string("unhandled exception: ") + e.what());
  }
  if (!st.isOk()) {
    std::fprintf(stderr, "archipelago: error: %s\n", st.toString().c_str());
    return st.code() == core::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
