// libFuzzer target: requests to the coordinator (CoordinatorServer::handle),
// what any authenticated connection may send. Corpus:
// tests/fuzz/corpus/coordinator_request. CI runs it through
// tests/comm/coordinator_fuzz_smoke_test.cpp.
//
// Input: one JSON request per line, all sent to one fresh server, so a
// sequence (register, report a failure, join, enter ...) drives the
// membership state machine; a final {"op":"state"} is appended. The server
// is stopped before the first request: requests that wait (members, enter,
// kv_get) then answer at once instead of after their timeout.
//
// Invariants: handle() never throws; every reply is a JSON object the
// client's parser accepts or turns into an error (never an exception);
// every membership in a reply passes the client's checks (ranks that
// exist, ascending, one island and pid per rank); the epoch never goes
// back.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/log.h"
#include "comm/coordinator_messages.h"

namespace archipelago::comm {
// The seam declared as a friend in coordinator.h.
class CoordinatorHandleForTesting {
 public:
  static std::string handle(CoordinatorServer& s, const std::string& request) { return s.handle(request); }
};
}  // namespace archipelago::comm

namespace archipelago::fuzz {

// Checks one reply; returns its epoch (or `last` when it carries none).
inline uint32_t checkCoordinatorReply(const std::string& reply, uint32_t last) {
  auto j = comm::parseCoordinatorReply(reply);
  if (!j.isOk()) {
    const auto raw = nlohmann::json::parse(reply, nullptr, false);
    // The server's own error replies are well-formed objects with a reason.
    if (raw.is_discarded() || !raw.is_object() || raw.value("ok", true) || !raw.contains("error")) __builtin_trap();
    return last;
  }
  uint32_t epoch = last;
  if (j->contains("epoch")) {
    epoch = (*j)["epoch"].get<uint32_t>();
    if (epoch < last) __builtin_trap();
  }
  if (j->contains("alive") && !comm::membershipFromJson(*j).isOk()) __builtin_trap();
  return epoch;
}

inline int fuzzCoordinatorRequest(const uint8_t* data, size_t size) {
  comm::CoordinatorServer server("fuzz-secret");
  server.stop();
  std::string_view in(reinterpret_cast<const char*>(data), size);
  uint32_t epoch = 0;
  int requests = 0;
  while (!in.empty() && requests++ < 64) {
    const size_t nl = in.find('\n');
    const std::string line(in.substr(0, nl));
    in.remove_prefix(nl == std::string_view::npos ? in.size() : nl + 1);
    epoch = checkCoordinatorReply(comm::CoordinatorHandleForTesting::handle(server, line), epoch);
  }
  checkCoordinatorReply(comm::CoordinatorHandleForTesting::handle(server, R"({"op":"state"})"), epoch);
  return 0;
}

}  // namespace archipelago::fuzz

// The smoke tests include this file and call fuzzCoordinatorRequest themselves.
#ifndef ARCHIPELAGO_FUZZ_SMOKE
// Every membership change logs a line; millions of them would drown the
// fuzzer's own output.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  archipelago::core::setLogLevel("error");
  return 0;
}
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return archipelago::fuzz::fuzzCoordinatorRequest(data, size);
}
#endif
