// The verbs of the `archipelago` binary. Each verb group lives in its own
// file and registers its subcommands here; a subcommand's action returns a
// Status, which main() turns into one clear line and a non-zero exit.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

#include "archipelago/core/status.h"

namespace archipelago::cli {

using Action = std::function<core::Status()>;

// Binds an action to a (leaf) subcommand; main() runs the action of the
// subcommand that was parsed.
void setAction(CLI::App* sub, Action action);

void addConfigCommands(CLI::App& app);   // config_cmd.cpp
void addDataCommands(CLI::App& app);     // data_cmd.cpp
void addBenchCommands(CLI::App& app);    // bench_cmd.cpp
void addPlanCommands(CLI::App& app);     // plan_cmd.cpp
void addReportCommands(CLI::App& app);   // report_cmd.cpp
void addSecretsCommands(CLI::App& app);  // secrets_cmd.cpp
#if defined(ARCHIPELAGO_HAS_TORCH)
void addTrainCommands(CLI::App& app);    // train_cmd_torch.cpp
void addHfCommands(CLI::App& app);       // hf_cmd_torch.cpp
void addCheckCommands(CLI::App& app);    // check_cmd_torch.cpp
#endif

}  // namespace archipelago::cli
