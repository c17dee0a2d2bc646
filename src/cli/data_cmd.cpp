// archipelago data ...
#include "cli/commands.h"

namespace archipelago::cli {

void addDataCommands(CLI::App& app) {
  // Registered by the data layer's owner.
  (void)app;
}

}  // namespace archipelago::cli
