#include "archipelago/core/log.h"

#include <cstdlib>
#include <memory>
#include <mutex>

#include <spdlog/sinks/stdout_sinks.h>

namespace archipelago::core {
namespace {

std::shared_ptr<spdlog::logger>& instance() {
  static std::shared_ptr<spdlog::logger> l = [] {
    // stderr, so that stdout stays clean for tables and JSON lines.
    auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
    auto lg = std::make_shared<spdlog::logger>("archipelago", sink);
    lg->set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    lg->set_level(spdlog::level::info);
    lg->flush_on(spdlog::level::warn);
    return lg;
  }();
  return l;
}

}  // namespace

spdlog::logger& logger() { return *instance(); }

void setLogIdentity(std::string_view identity) {
  std::string pattern = "[%H:%M:%S.%e] [%^%l%$] [" + std::string(identity) + "] %v";
  instance()->set_pattern(pattern);
}

bool setLogLevel(std::string_view level) {
  auto lv = spdlog::level::from_str(std::string(level));
  if (lv == spdlog::level::off && level != "off") return false;
  instance()->set_level(lv);
  return true;
}

void initLoggingFromEnv() {
  if (const char* v = std::getenv("ARCHIPELAGO_LOG_LEVEL")) {
    if (!setLogLevel(v)) {
      logger().warn("ARCHIPELAGO_LOG_LEVEL='{}' is not one of trace|debug|info|warn|error|off; keeping info", v);
    }
  }
}

}  // namespace archipelago::core
