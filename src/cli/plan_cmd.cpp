// archipelago plan ...
#include "cli/commands.h"

namespace archipelago::cli {

void addPlanCommands(CLI::App& app) {
  // Registered by the plan layer's owner.
  (void)app;
}

}  // namespace archipelago::cli
