// archipelago bench ...
#include "cli/commands.h"

namespace archipelago::cli {

void addBenchCommands(CLI::App& app) {
  // Registered by the bench layer's owner.
  (void)app;
}

}  // namespace archipelago::cli
