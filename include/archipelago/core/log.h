// One logger for the whole process (spdlog underneath). Every line carries
// the process identity ("coordinator", "island0/2", "cli") so interleaved
// output from many workers stays readable. The level is switched at run time
// (ARCHIPELAGO_LOG_LEVEL=trace|debug|info|warn|error|off or setLogLevel).
#pragma once

#include <string>
#include <string_view>

#include <spdlog/spdlog.h>

namespace archipelago::core {

// Sets the identity prefix of every following line, e.g. "island1/0 r3".
void setLogIdentity(std::string_view identity);
// Returns false (and leaves the level) for an unknown level name.
bool setLogLevel(std::string_view level);
// Reads ARCHIPELAGO_LOG_LEVEL once; called by the CLI at start-up.
void initLoggingFromEnv();
spdlog::logger& logger();

}  // namespace archipelago::core

#define ARCH_LOG_TRACE(...) ::archipelago::core::logger().trace(__VA_ARGS__)
#define ARCH_LOG_DEBUG(...) ::archipelago::core::logger().debug(__VA_ARGS__)
#define ARCH_LOG_INFO(...) ::archipelago::core::logger().info(__VA_ARGS__)
#define ARCH_LOG_WARN(...) ::archipelago::core::logger().warn(__VA_ARGS__)
#define ARCH_LOG_ERROR(...) ::archipelago::core::logger().error(__VA_ARGS__)
